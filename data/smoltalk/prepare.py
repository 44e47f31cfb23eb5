"""Conversations for instruction fine-tuning (finetune_native.py), with a loss mask.

By default streams HuggingFaceTB/smoltalk2 (config SFT, split
smoltalk_smollm3_smol_magpie_ultra_no_think); --dataset takes a local .json/.jsonl file instead.
A record holds `messages` (a list of {role, content}) or `conversations` (a list of {from, value},
from being human/gpt/system).

Each conversation becomes the chat template text of model_bio.chat_turn in GPT-2 BPE tokens,
followed by <|endoftext|>, and a mask that is 1 on the tokens the model is trained to write: each
assistant reply, its closing <|/assistant|> marker, and the final <|endoftext|> (so it learns to
stop). System and user turns and the turn headers are 0. A conversation longer than --max_tokens
keeps its first whole turns that fit, ending after an assistant reply (cut mid-turn only when not
even the first exchange fits). Records without a user turn and a non-empty assistant reply are
skipped and counted.

Writes beside itself (or to --out_dir), each through a temp file renamed at the end:
  {train,val}.bin           uint16 tokens, conversations back to back
  {train,val}_mask.bin      uint8 loss mask, one per token
  {train,val}_offsets.npy   int64 start of each conversation
  meta.json                 counts and the masked fraction
A seeded draw per conversation sends --val_fraction of them to val.
"""
import argparse
import json
import os
import sys

import numpy as np
import tiktoken
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from model_bio import EOT_ID, chat_turn  # noqa: E402  (the template lives in one place)

HUB_DATASET, HUB_CONFIG = 'HuggingFaceTB/smoltalk2', 'SFT'
HUB_SPLIT = 'smoltalk_smollm3_smol_magpie_ultra_no_think'
ROLE_NAMES = {'system': 'system', 'user': 'user', 'assistant': 'assistant', 'human': 'user', 'gpt': 'assistant'}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--dataset', help='local .json/.jsonl file to use instead of the hub dataset')
parser.add_argument('--max_docs', type=int, default=0, help='stop after this many conversations (0 = all)')
parser.add_argument('--max_tokens', type=int, default=1024, help='longest conversation kept, in tokens')
parser.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)))
parser.add_argument('--val_fraction', type=float, default=0.05)
parser.add_argument('--seed', type=int, default=2357)
args = parser.parse_args()


def fail(message):
    print(f'prepare.py: error: {message}', file=sys.stderr)
    sys.exit(2)


encoding = tiktoken.get_encoding('gpt2')


def turns_of(record):
    """[(role, content)] of a record in either layout, or None when it has no list of turns."""
    if isinstance(record.get('messages'), list):
        raw = [(m.get('role'), m.get('content')) for m in record['messages'] if isinstance(m, dict)]
    elif isinstance(record.get('conversations'), list):
        raw = [(m.get('from'), m.get('value')) for m in record['conversations'] if isinstance(m, dict)]
    else:
        return None
    return [(ROLE_NAMES[r], c.strip()) for r, c in raw if r in ROLE_NAMES and isinstance(c, str) and c.strip()]


def encode_turn(role, content):
    """Tokens and mask of one turn; pieces split at newlines, where GPT-2's BPE never merges across."""
    if role != 'assistant':
        tokens = encoding.encode_ordinary(chat_turn(role, content))
        return tokens, [0] * len(tokens)
    head, reply, tail = '<|assistant|>\n', content + '\n<|/assistant|>', '\n'
    pieces = [(encoding.encode_ordinary(head), 0), (encoding.encode_ordinary(reply), 1),
              (encoding.encode_ordinary(tail), 0)]
    assert ''.join((head, reply, tail)) == chat_turn(role, content)
    return [t for p, _ in pieces for t in p], [m for p, m in pieces for _ in p]


def encode_conversation(turns):
    """(tokens, mask, was_cut) for a conversation within max_tokens; None when nothing trainable is left."""
    if not any(r == 'user' for r, _ in turns) or not any(r == 'assistant' for r, _ in turns):
        return None
    tokens, mask, kept_end = [], [], 0  # kept_end: length after the last assistant turn that fits
    for role, content in turns:
        turn_tokens, turn_mask = encode_turn(role, content)
        if len(tokens) + len(turn_tokens) + 1 > args.max_tokens:
            if kept_end == 0:  # not even one exchange fits: cut inside this turn
                room = args.max_tokens - len(tokens)
                tokens, mask = tokens + turn_tokens[:room], mask + turn_mask[:room]
                return (tokens, mask, True) if any(mask) else None
            return tokens[:kept_end] + [EOT_ID], mask[:kept_end] + [1], True
        tokens, mask = tokens + turn_tokens, mask + turn_mask
        if role == 'assistant':
            kept_end = len(tokens)
    if kept_end == 0:
        return None
    return tokens[:kept_end] + [EOT_ID], mask[:kept_end] + [1], kept_end < len(tokens)


class SplitWriter:
    """tokens, mask and offsets of one split, appended to temp files and renamed at the end."""

    def __init__(self, name):
        self.paths = {kind: os.path.join(args.out_dir, f'{name}{kind}') for kind in ('.bin', '_mask.bin')}
        self.files = {kind: open(path + '.tmp', 'wb') for kind, path in self.paths.items()}
        self.offsets_path = os.path.join(args.out_dir, f'{name}_offsets.npy')
        self.offsets, self.tokens, self.masked = [], 0, 0

    def add(self, tokens, mask):
        self.offsets.append(self.tokens)
        np.array(tokens, dtype=np.uint16).tofile(self.files['.bin'])
        np.array(mask, dtype=np.uint8).tofile(self.files['_mask.bin'])
        self.tokens += len(tokens)
        self.masked += sum(mask)

    def finish(self):
        for kind, f in self.files.items():
            f.close()
            os.replace(self.paths[kind] + '.tmp', self.paths[kind])
        with open(self.offsets_path + '.tmp', 'wb') as f:
            np.save(f, np.array(self.offsets, dtype=np.int64))
        os.replace(self.offsets_path + '.tmp', self.offsets_path)

    def discard(self):
        for kind, f in self.files.items():
            f.close()
            os.remove(self.paths[kind] + '.tmp')


if args.dataset is None:
    from datasets import load_dataset
    records = load_dataset(HUB_DATASET, HUB_CONFIG, split=HUB_SPLIT, streaming=True)
else:
    if not os.path.isfile(args.dataset):
        fail(f'dataset file not found: {args.dataset}')
    if os.path.splitext(args.dataset)[1].lower() not in ('.json', '.jsonl'):
        fail(f'dataset file must end in .json or .jsonl: {args.dataset}')
    from datasets import load_dataset
    records = load_dataset('json', data_files=args.dataset, split='train', streaming=True)

os.makedirs(args.out_dir, exist_ok=True)
rng = np.random.default_rng(args.seed)
splits = {'train': SplitWriter('train'), 'val': SplitWriter('val')}
seen, skipped, cut = 0, 0, 0
for record in tqdm(records, total=args.max_docs or None, unit='conv'):
    if args.max_docs and seen == args.max_docs:
        break
    seen += 1
    to_val = rng.random() < args.val_fraction  # one draw per record, so skipping never shifts the split
    turns = turns_of(record)
    encoded = encode_conversation(turns) if turns else None
    if encoded is None:
        skipped += 1
        continue
    tokens, mask, was_cut = encoded
    cut += was_cut
    splits['val' if to_val else 'train'].add(tokens, mask)

if not splits['train'].offsets and not splits['val'].offsets:
    for split in splits.values():
        split.discard()
    fail(f'none of the {seen} records has a user turn and an assistant reply (fields messages or conversations)')
meta = {'records': seen, 'skipped': skipped, 'cut': cut, 'max_tokens': args.max_tokens}
for name, split in splits.items():
    split.finish()
    meta[name] = {'conversations': len(split.offsets), 'tokens': split.tokens,
                  'masked_fraction': split.masked / max(split.tokens, 1)}
with open(os.path.join(args.out_dir, 'meta.json.tmp'), 'w') as f:
    json.dump(meta, f, indent=2)
os.replace(os.path.join(args.out_dir, 'meta.json.tmp'), os.path.join(args.out_dir, 'meta.json'))
print(f"{seen:,} records: train {meta['train']['conversations']:,} conversations ({meta['train']['tokens']:,} tokens), "
      f"val {meta['val']['conversations']:,} ({meta['val']['tokens']:,} tokens); "
      f"{skipped:,} skipped without a user turn and an assistant reply, {cut:,} cut to {args.max_tokens} tokens")
