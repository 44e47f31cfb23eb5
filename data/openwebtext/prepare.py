"""GPT-2 BPE token files for OpenWebText (or a local text corpus): train.bin and val.bin.

By default streams the HuggingFace dataset Skylion007/openwebtext, so the corpus is never held
in memory or cached in full. --dataset takes a local file instead:
  .json / .jsonl  one document per record, read from its "text" field
  .txt            one document per line
Documents whose text is empty (blank lines in a .txt) are skipped and do not count toward
--max_docs.

Each document becomes its tiktoken gpt2 tokens followed by the end-of-text token (50256),
stored as np.uint16. A seeded RNG sends each document to val with probability --val_fraction,
so the same input and seed always give the same split. If no document lands in val (tiny
inputs), the last train document is moved there so training still has something to evaluate;
a one-document input therefore gives an empty train.bin.
"""
import argparse
import os
import sys

import numpy as np
import tiktoken
from datasets import load_dataset
from tqdm import tqdm

HUB_DATASET = "Skylion007/openwebtext"
BATCH_DOCS = 1024  # documents tokenized together; encode_ordinary_batch spreads them over threads
FLUSH_TOKENS = 1 << 22  # buffered tokens per split before appending to disk (8 MiB as uint16)
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text"}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", help="local .json/.jsonl/.txt file to use instead of the hub dataset")
parser.add_argument("--max_docs", type=int, default=0, help="stop after this many documents (0 = all)")
parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
parser.add_argument("--val_fraction", type=float, default=0.0005)
parser.add_argument("--seed", type=int, default=2357)
args = parser.parse_args()


def fail(message):
    print(f"prepare.py: error: {message}", file=sys.stderr)
    sys.exit(2)


if args.dataset is None:
    documents = load_dataset(HUB_DATASET, split="train", streaming=True)
else:
    if not os.path.isfile(args.dataset):
        fail(f"dataset file not found: {args.dataset}")
    extension = os.path.splitext(args.dataset)[1].lower()
    if extension not in LOCAL_BUILDERS:
        fail(f"dataset file must end in .json, .jsonl or .txt: {args.dataset}")
    documents = load_dataset(LOCAL_BUILDERS[extension], data_files=args.dataset, split="train", streaming=True)

encoding = tiktoken.get_encoding("gpt2")
eot = encoding.eot_token
rng = np.random.default_rng(args.seed)
os.makedirs(args.out_dir, exist_ok=True)


class TokenFile:
    """Appends token lists to <name>.bin.tmp through a bounded in-memory buffer."""

    def __init__(self, out_dir, name):
        self.tmp_path = os.path.join(out_dir, name + ".bin.tmp")
        self.final_path = os.path.join(out_dir, name + ".bin")
        self.file = open(self.tmp_path, "w+b")  # readable too, for pop_last_doc
        self.buffer = []
        self.buffered = 0
        self.total = 0
        self.last_doc_length = 0

    def add(self, tokens):
        self.buffer.append(np.array(tokens, dtype=np.uint16))  # 2 bytes a token, not a Python int
        self.buffered += len(tokens)
        self.total += len(tokens)
        self.last_doc_length = len(tokens)
        if self.buffered >= FLUSH_TOKENS:
            self.flush()

    def flush(self):
        if self.buffer:
            np.concatenate(self.buffer).tofile(self.file)
        self.buffer = []
        self.buffered = 0

    def pop_last_doc(self):
        # Cut the last document off the end of the file and hand its tokens back.
        self.flush()
        start = (self.total - self.last_doc_length) * 2
        self.file.seek(start)
        tokens = np.frombuffer(self.file.read(), dtype=np.uint16)
        self.file.seek(start)
        self.file.truncate()
        self.total -= self.last_doc_length
        return tokens

    def finish(self):
        self.flush()
        self.file.close()
        os.replace(self.tmp_path, self.final_path)

    def discard(self):
        self.file.close()
        os.remove(self.tmp_path)


train = TokenFile(args.out_dir, "train")
val = TokenFile(args.out_dir, "val")


def tokenize_and_split(texts):
    for tokens in encoding.encode_ordinary_batch(texts):
        tokens.append(eot)
        # One draw per document, in document order, so batching never changes the split.
        (val if rng.random() < args.val_fraction else train).add(tokens)


batch = []
doc_count = 0
progress = tqdm(total=args.max_docs or None, unit="docs")
for document in documents:
    if not document["text"]:
        continue
    batch.append(document["text"])
    doc_count += 1
    if len(batch) == BATCH_DOCS:
        tokenize_and_split(batch)
        progress.update(len(batch))
        batch = []
    if doc_count == args.max_docs:
        break
tokenize_and_split(batch)
progress.update(len(batch))
progress.close()

if doc_count == 0:
    train.discard()
    val.discard()
    fail("no non-empty documents found")
if val.total == 0:
    val.add(train.pop_last_doc())

train.finish()
val.finish()
print(f"{doc_count:,} documents: train has {train.total:,} tokens, val has {val.total:,} tokens")
