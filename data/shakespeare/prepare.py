"""Tiny Shakespeare in GPT-2 BPE tokens (train.bin, val.bin; the first 90% of the text is train).

Uses input.txt beside this file, downloading it first if it is missing:
    python data/shakespeare/prepare.py
A small corpus for pretraining a GPT-2-vocabulary model on a CPU, e.g. before trying fine-tuning.
Both files appear together or not at all (prepared_data.commit, with their manifest.json).
It takes no arguments; one given by mistake is an 'error: ' line and exit status 2.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import prepared_data  # noqa: E402
from codec import gpt2_encoding  # noqa: E402
from configurator import one_line_errors  # noqa: E402

# it takes no arguments: one given by mistake (an --out_dir, say) must not pass unnoticed
one_line_errors(argparse.ArgumentParser(description=__doc__)).parse_args()
here = os.path.dirname(os.path.abspath(__file__))
input_path = os.path.join(here, 'input.txt')
try:
    prepared_data.download_once(prepared_data.TINY_SHAKESPEARE_URL, input_path)
except ValueError as e:
    sys.exit(f'error: {e}')
with open(input_path, encoding='utf-8') as f:
    text = f.read()
split_at = int(len(text) * 0.9)
try:
    encoding = gpt2_encoding()
except ValueError as e:
    sys.exit(f'error: {e}')
staging = prepared_data.staging_dir(here)
try:
    for name, part in (('train', text[:split_at]), ('val', text[split_at:])):
        tokens = np.array(encoding.encode_ordinary(part), dtype=np.uint16)
        prepared_data.write_array(os.path.join(staging, f'{name}.bin'), tokens)
        print(f'{name}: {len(tokens):,} tokens')
except BaseException as error:  # a full disk, Ctrl-C: the folder keeps the set it had
    prepared_data.abandon(here, error)
    raise
prepared_data.commit(here, 'data/shakespeare/prepare.py')
