"""Character-level tiny Shakespeare: writes train.bin, val.bin and meta.pkl beside this script,
all three together or none (prepared_data.commit, with their manifest.json).

Uses input.txt from this folder when present, otherwise downloads it first.
The first 90% of the text is train, the last 10% val; tokens are np.uint16 character ids.
meta.pkl holds vocab_size, stoi and itos (plain data only, as codec.read_meta reads it back).
It takes no arguments; one given by mistake is an 'error: ' line and exit status 2.
"""
import argparse
import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import prepared_data  # noqa: E402
from configurator import one_line_errors  # noqa: E402

# Outputs go beside the script, not into whatever directory it was started from.
HERE = os.path.dirname(os.path.abspath(__file__))

# it takes no arguments: one given by mistake (an --out_dir, say) must not pass unnoticed
one_line_errors(argparse.ArgumentParser(description=__doc__)).parse_args()

input_path = os.path.join(HERE, "input.txt")
try:
    prepared_data.download_once(prepared_data.TINY_SHAKESPEARE_URL, input_path)
except ValueError as e:
    sys.exit(f"error: {e}")

with open(input_path, encoding="utf-8") as f:
    text = f.read()

chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}
print(f"characters in text: {len(text):,}, vocab size: {len(chars)}")

split_at = int(len(text) * 0.9)
train_ids = np.array([stoi[ch] for ch in text[:split_at]], dtype=np.uint16)
val_ids = np.array([stoi[ch] for ch in text[split_at:]], dtype=np.uint16)
print(f"train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens")

staging = prepared_data.staging_dir(HERE)
try:
    prepared_data.write_array(os.path.join(staging, "train.bin"), train_ids)
    prepared_data.write_array(os.path.join(staging, "val.bin"), val_ids)
    with open(os.path.join(staging, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "stoi": stoi, "itos": itos}, f)
except BaseException as error:  # a full disk, Ctrl-C: the folder keeps the set it had
    prepared_data.abandon(HERE, error)
    raise
prepared_data.commit(HERE, "data/shakespeare_char/prepare.py")
