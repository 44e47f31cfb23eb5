"""GPT-2 BPE token files for OpenWebText (or another corpus): train.bin and val.bin.

By default streams the HuggingFace dataset Skylion007/openwebtext, so the corpus is never held
in memory or cached in full. That repository is a loading script, which datasets 4 and later do
not run: it is then read from the hub's Parquet conversion of it, which may hold only part of the
corpus, so the script prints how many of OpenWebText's 8,013,769 documents it read. --dataset
takes another hub dataset (owner/name, with its "text" field) or a local file instead:
  .json / .jsonl  one document per record, read from its "text" field
  .parquet        one document per row, its "text" column
  .txt            one document per line
--max_docs N stops after N documents, for quick trials. Documents whose text is empty (blank
lines in a .txt) are skipped and do not count toward --max_docs. A bad argument (--val_fraction
outside [0, 1), a negative --seed, ...) is one 'error: ' line and exit status 2.

Each document becomes its tiktoken gpt2 tokens followed by the end-of-text token (50256),
stored as np.uint16. A seeded RNG sends each document to val with probability --val_fraction
(default 0.0005), so the same input and seed always give the same split. If no document lands
in val (tiny inputs), the last train document is moved there so training still has something to
evaluate; a one-document input therefore gives an empty train.bin.

The files appear together or not at all (prepared_data.commit): an interrupted run leaves the
previous set as it was.
"""
import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import prepared_data  # noqa: E402
from codec import gpt2_encoding  # noqa: E402
from configurator import check_folder, fail, one_line_errors, ruled  # noqa: E402

HUB_DATASET = "Skylion007/openwebtext"
OPENWEBTEXT_DOCS = 8_013_769  # documents in the whole corpus
BATCH_DOCS = 1024  # documents tokenized together; encode_ordinary_batch spreads them over threads
FLUSH_TOKENS = 1 << 22  # buffered tokens per split before appending to disk (8 MiB as uint16)

parser = one_line_errors(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
parser.add_argument("--dataset", default=HUB_DATASET, help="a hub dataset (owner/name) or a local .json/.jsonl/.parquet/.txt file")
parser.add_argument("--max_docs", type=ruled(int, ">= 0"), default=0, help="stop after this many documents (0 = all)")
parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
# 0 is allowed (val then gets the last document, see above); 1 would leave train empty
parser.add_argument("--val_fraction", type=ruled(float, "in [0, 1)"), default=0.0005)
parser.add_argument("--seed", type=ruled(int, ">= 0"), default=2357)  # numpy's generators take no negative seed
args = parser.parse_args()
check_folder('--out_dir', args.out_dir)  # before the dataset opens, which can take a while


try:
    documents = prepared_data.open_records(args.dataset, (".json", ".jsonl", ".parquet", ".txt"))
except ValueError as e:
    fail(str(e))

try:
    encoding = gpt2_encoding()
except ValueError as e:
    fail(str(e))
eot = encoding.eot_token
rng = np.random.default_rng(args.seed)
os.makedirs(args.out_dir, exist_ok=True)
staging = prepared_data.staging_dir(args.out_dir)


class TokenFile:
    """Appends token lists to <staging>/<name>.bin through a bounded in-memory buffer."""

    def __init__(self, name):
        self.file = open(os.path.join(staging, name + ".bin"), "w+b")  # readable too, for pop_last_doc
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
            prepared_data.write_array(self.file, np.concatenate(self.buffer))
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

    def close(self):
        self.flush()
        self.file.close()


train = TokenFile("train")
val = TokenFile("val")


def tokenize_and_split(texts):
    for tokens in encoding.encode_ordinary_batch(texts):
        tokens.append(eot)
        # One draw per document, in document order, so batching never changes the split.
        (val if rng.random() < args.val_fraction else train).add(tokens)


def read_documents():
    """Tokenize the documents into the two splits; returns how many were read."""
    batch = []
    doc_count = 0
    progress = tqdm(total=args.max_docs or None, unit="docs")
    for document in documents:
        if "text" not in document:
            fail(f'the records of {args.dataset} have no "text" field (they have {", ".join(document)})')
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
    return doc_count


try:
    doc_count = read_documents()
except BaseException as error:  # Ctrl-C included: the folder keeps the set it had
    prepared_data.abandon(args.out_dir, error)
    raise
if doc_count == 0:
    prepared_data.discard(args.out_dir)
    fail("no non-empty documents found")
try:  # the last buffers are written here: a full disk too is one line, the folder keeping the set it had
    if val.total == 0:
        val.add(train.pop_last_doc())
    train.close()
    val.close()
except BaseException as error:
    prepared_data.abandon(args.out_dir, error)
    raise
prepared_data.commit(args.out_dir, "data/openwebtext/prepare.py")
print(f"{doc_count:,} documents: train has {train.total:,} tokens, val has {val.total:,} tokens")
if args.dataset == HUB_DATASET and not args.max_docs:
    print(f"that is {100 * doc_count / OPENWEBTEXT_DOCS:.3g}% of OpenWebText's {OPENWEBTEXT_DOCS:,} documents")
