"""
Sample text from a trained WiggleGPT checkpoint:
    python sample_bio.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:"
`start` may be FILE:prompt.txt to read the prompt from a file. Text is printed as it is generated.
"""

import os
import sys

import torch

import devices
from checkpoints import checkpoint_location, load_model
from codec import load_codec
from generation import generate_tokens, stream_text

out_dir = 'out'
ckpt = 'ckpt.pt'  # in out_dir ('ckpt_best.pt', an exported folder), or a hub name: hf:OWNER/REPO/FILE.pt
start = '\n'  # prompt text, or FILE:path
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 0 is greedy
top_k = 200  # 0 disables
top_p = 1.0  # nucleus sampling; 1.0 disables
repetition_penalty = 1.0  # > 1 makes recently seen tokens less likely; 1.0 disables
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False
# -----------------------------------------------------------------------------
from configurator import configure, fail, settings_in  # noqa: E402

globals().update(configure(settings_in(globals()), sys.argv[1:]))
# -----------------------------------------------------------------------------

try:
    device = devices.pick_device(device)
    dtype = devices.pick_dtype(device, dtype)
except ValueError as e:
    fail(str(e))
autocast = devices.autocast(device, dtype)
if start.startswith('FILE:'):
    if not os.path.isfile(start[5:]):
        fail(f'prompt file {start[5:]} not found')
    with open(start[5:], encoding='utf-8') as f:
        start = f.read()
if not start:
    fail('the prompt is empty; give at least one character with --start')

try:
    model, checkpoint = load_model(checkpoint_location(out_dir, ckpt), device)
    encode, decode = load_codec(checkpoint)
except ValueError as e:
    fail(str(e))
model.eval()
if compile:
    model = torch.compile(model)
try:
    prompt_ids = encode(start)
except ValueError as e:
    fail(f'the prompt has {e}')

generator = torch.Generator(device=device).manual_seed(seed)
for _ in range(num_samples):
    print(start, end='', flush=True)
    with autocast:
        tokens = generate_tokens(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                 top_p=top_p, repetition_penalty=repetition_penalty, generator=generator)
        for piece in stream_text(tokens, decode):
            print(piece, end='', flush=True)
    print('\n---------------')
