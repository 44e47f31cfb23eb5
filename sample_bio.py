"""
Sample text from a trained WiggleGPT checkpoint:
    python sample_bio.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:"
`start` may be FILE:prompt.txt to read the prompt from a file.
"""

import os
import pickle
import sys

import torch

from model_bio import load_model

out_dir = 'out'
ckpt = 'ckpt.pt'  # or 'ckpt_best.pt'
start = '\n'  # prompt text, or FILE:path
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 0 is greedy
top_k = 200
seed = 1337
device = 'auto'
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
from configurator import configure  # noqa: E402

globals().update(configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
# -----------------------------------------------------------------------------

if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
if start.startswith('FILE:'):
    if not os.path.isfile(start[5:]):
        sys.exit(f'error: prompt file {start[5:]} not found')
    with open(start[5:], encoding='utf-8') as f:
        start = f.read()
if not start:
    sys.exit('error: the prompt is empty; give at least one character with --start')
torch.manual_seed(seed)
model, checkpoint = load_model(os.path.join(out_dir, ckpt), device)
model.eval()

# character-level runs decode through their dataset's meta.pkl, the rest through GPT-2's BPE
dataset = checkpoint.get('config', {}).get('dataset')
meta_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', str(dataset), 'meta.pkl')
if os.path.isfile(meta_path):
    with open(meta_path, 'rb') as f:
        meta = pickle.load(f)
    stoi, itos = meta['stoi'], meta['itos']
    unknown = sorted(set(c for c in start if c not in stoi))
    if unknown:
        sys.exit(f'error: the prompt has characters outside the {dataset} vocabulary: {unknown!r}')

    def encode(s):
        return [stoi[c] for c in s]

    def decode(ids):
        return ''.join(itos[i] for i in ids)
else:
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')

    def encode(s):
        return enc.encode(s, allowed_special={'<|endoftext|>'})

    def decode(ids):
        return enc.decode(ids)

prompt = torch.tensor([encode(start)], dtype=torch.long, device=device)
for _ in range(num_samples):
    out = model.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k or None)
    print(decode(out[0].tolist()))
    print('---------------')
