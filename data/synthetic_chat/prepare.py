"""A small synthetic conversation set with short replies, for trying fine-tuning on a CPU.

Writes conversations.jsonl beside itself (--conversations, default 3,000: arithmetic, colours,
counting, repeating a word; a third of them two exchanges long, some with a system prompt), then
turns it into fine-tuning files with data/smoltalk/prepare.py, so the result is laid out like
data/smoltalk:
    python data/synthetic_chat/prepare.py
    python finetune_native.py config_finetune_synthetic.py
Numbers up to 49 appear in training; heldout_prompts.txt asks 20 questions with larger numbers
and unseen words, each in its own conversation, for chat.py:
    python chat.py --out_dir=out-finetune-synthetic < data/synthetic_chat/heldout_prompts.txt
"""
import argparse
import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import fail, one_line_errors, ruled  # noqa: E402
from files import WriteError, write_file  # noqa: E402

COLOURS = {'sky': 'blue', 'grass': 'green', 'snow': 'white', 'coal': 'black', 'sun': 'yellow', 'blood': 'red'}
WORDS = ['apple', 'river', 'candle', 'mountain', 'violin', 'garden', 'pepper', 'window', 'rocket', 'forest']

parser = one_line_errors(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
parser.add_argument('--conversations', type=ruled(int, '>= 1'), default=3000)
parser.add_argument('--seed', type=ruled(int, '>= 0'), default=1337)  # random.Random(-n) is Random(n): no new sets
args = parser.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(args.seed)


def exchange():
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return f'What is {a} plus {b}?', f'{a} plus {b} is {a + b}.'
    if kind == 1:
        thing = rng.choice(list(COLOURS))
        return f'What colour is the {thing}?', f'The {thing} is {COLOURS[thing]}.'
    if kind == 2:
        start = rng.randrange(45)
        end = start + rng.randrange(2, 5)
        return f'Count from {start} to {end}.', ', '.join(str(n) for n in range(start, end + 1)) + '.'
    word = rng.choice(WORDS)
    return f'Say the word {word}.', f'{word.capitalize()}.'


# held-out questions for chat.py (numbers above 49, unseen words), one conversation each
heldout_rng = random.Random(7)
heldout = [f'What is {heldout_rng.randrange(50, 100)} plus {heldout_rng.randrange(50, 100)}?' for _ in range(8)]
for _ in range(4):
    start = heldout_rng.randrange(50, 90)
    heldout.append(f'Count from {start} to {start + heldout_rng.randrange(2, 5)}.')
heldout += [f'Say the word {w}.' for w in ('banana', 'pencil', 'harbor', 'lantern')]
heldout += [f'What colour is the {t}?' for t in ('sky', 'snow', 'coal', 'grass')]
prompts = ''.join(f'{question}\nclear\n' for question in heldout) + 'quit\n'

path = os.path.join(here, 'conversations.jsonl')
lines = []
for _ in range(args.conversations):
    messages = [{'role': 'system', 'content': 'Answer briefly.'}] if rng.random() < 0.2 else []
    for _ in range(2 if rng.random() < 0.33 else 1):
        question, answer = exchange()
        messages += [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}]
    lines.append(json.dumps({'messages': messages}) + '\n')
try:
    write_file(os.path.join(here, 'heldout_prompts.txt'), prompts)
    write_file(path, ''.join(lines))
except WriteError as e:  # a full disk, a folder in the way: one line
    fail(str(e))
smoltalk = os.path.join(os.path.dirname(here), 'smoltalk', 'prepare.py')
sys.exit(subprocess.call([sys.executable, smoltalk, '--dataset', path, '--out_dir', here, '--max_tokens', '256']))
