"""Character-level tiny Shakespeare: writes train.bin, val.bin and meta.pkl beside this script.

Uses input.txt from this folder when present, otherwise downloads it first.
The first 90% of the text is train, the last 10% val; tokens are np.uint16 character ids.
"""
import os
import pickle
import urllib.request

import numpy as np

SOURCE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Outputs go beside the script, not into whatever directory it was started from.
HERE = os.path.dirname(os.path.abspath(__file__))


def write_replacing(path, write):
    # Write to a temp name then rename, so an interrupted run never leaves a half-written file
    # that a later training run would happily read.
    tmp_path = path + ".tmp"
    with open(tmp_path, "wb") as f:
        write(f)
    os.replace(tmp_path, path)


input_path = os.path.join(HERE, "input.txt")
if not os.path.exists(input_path):
    print(f"downloading {SOURCE_URL}")
    with urllib.request.urlopen(SOURCE_URL) as response:
        downloaded = response.read()
    write_replacing(input_path, lambda f: f.write(downloaded))

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

write_replacing(os.path.join(HERE, "train.bin"), train_ids.tofile)
write_replacing(os.path.join(HERE, "val.bin"), val_ids.tofile)
meta = {"vocab_size": len(chars), "stoi": stoi, "itos": itos}
write_replacing(os.path.join(HERE, "meta.pkl"), lambda f: pickle.dump(meta, f))
