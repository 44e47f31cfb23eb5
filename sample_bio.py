"""
Sample text from a trained WiggleGPT checkpoint:
    python sample_bio.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:"
`start` may be FILE:prompt.txt to read the prompt from a file. Text is printed as it is generated.

Settings: out_dir; ckpt (ckpt.pt or ckpt_best.pt in out_dir, or a path, exported folder or hub name
of its own, or OpenAI's gpt2 ... gpt2-xl); start; num_samples; max_new_tokens; temperature (0 is greedy); top_k; top_p;
repetition_penalty; seed; device; dtype; compile (generation.py says how they act).
Character-level checkpoints decode through their dataset's meta.pkl (an exported folder carries
its characters), others through GPT-2's BPE. The settings are echoed on stderr, so
`python sample_bio.py ... > samples.txt` holds only the samples.
"""

import os
import sys

out_dir = 'out'
ckpt = 'ckpt.pt'  # in out_dir ('ckpt_best.pt', an exported folder), a hub name hf:OWNER/REPO/FILE.pt, or gpt2...
start = '\n'  # prompt text, or FILE:path
num_samples: '>= 1' = 3
max_new_tokens: '>= 1' = 500
temperature: '>= 0' = 0.8  # 0 is greedy
top_k: '>= 0' = 200  # 0 disables
top_p: 'in (0, 1]' = 1.0  # nucleus sampling; 1.0 disables
# > 1 makes recently seen tokens less likely, < 1 more likely; 1.0 disables. Bounded because the penalty scales
# logits: 1e-320 or 1e300 is 0 or inf in float32 (NaN probabilities), while within [0.01, 100] logits stay within
# 100x of the model's (finite down to the least temperature that samples, 1e-6), and 100 all but bans a seen token
repetition_penalty: 'in [0.01, 100]' = 1.0
seed: '>= 0' = 1337
device = 'auto'
dtype = 'auto'
compile = False
# -----------------------------------------------------------------------------
from configurator import configure, declared_rules, fail, settings_in  # noqa: E402

globals().update(configure(settings_in(globals()), sys.argv[1:], declared_rules(__file__)))
# imported once the settings are read: a mistake in them is reported at once, not after torch's seconds
import torch  # noqa: E402

import devices  # noqa: E402
from checkpoints import checkpoint_location, error_line, load_model  # noqa: E402
from codec import load_codec  # noqa: E402
from generation import generate_tokens, stream_text  # noqa: E402
# -----------------------------------------------------------------------------

try:
    device = devices.pick_device(device)
    dtype = devices.pick_dtype(device, dtype)
except ValueError as e:
    fail(str(e))
autocast = devices.autocast(device, dtype)
if start.startswith('FILE:'):
    path = start[5:]
    if not os.path.exists(path):
        fail(f'prompt file {path} not found')
    if not os.path.isfile(path):  # a folder, or a device such as /dev/zero that would never end
        fail(f'prompt file {path} is not a regular file; name a text file')
    try:
        with open(path, encoding='utf-8') as f:
            start = f.read()
    except UnicodeDecodeError as e:
        byte = e.object[e.start:e.start + 1]
        fail(f'prompt file {path} is not UTF-8 text (byte {e.start} is {byte!r}); save it as UTF-8')
    except OSError as e:
        fail(f'prompt file {path} cannot be read: {error_line(e)}')
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
    try:
        with autocast:
            tokens = generate_tokens(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                     top_p=top_p, repetition_penalty=repetition_penalty, generator=generator)
            for piece in stream_text(tokens, decode):
                print(piece, end='', flush=True)
    except ValueError as e:
        print(flush=True)
        fail(str(e))
    print('\n---------------')
