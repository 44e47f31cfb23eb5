"""Conversations for instruction fine-tuning (finetune_native.py), with a loss mask.

By default streams HuggingFaceTB/smoltalk2 (config SFT, split
smoltalk_smollm3_smol_magpie_ultra_no_think); --dataset takes another hub dataset (owner/name,
with --config and --split) or a local .json/.jsonl/.parquet file instead.
A record holds `messages` (a list of {role, content}) or `conversations` (a list of {from, value},
from being human/gpt/system).

Each conversation becomes the chat template text of chat_template.chat_turn in GPT-2 BPE tokens,
followed by <|endoftext|>, and a mask that is 1 on the tokens the model is trained to write: each
assistant reply, its closing <|/assistant|> marker, and the final <|endoftext|> (so it learns to
stop). System and user turns and the turn headers are 0. A conversation longer than --max_tokens
(default 1024) keeps its first whole turns that fit, ending after an assistant reply (cut mid-turn
only when not even the first exchange fits). Records without a user turn and a non-empty assistant
reply are skipped and counted.

Writes beside itself (or to --out_dir), all files together or none (prepared_data.commit):
  {train,val}.bin           uint16 tokens, conversations back to back
  {train,val}_mask.bin      uint8 loss mask, one per token
  {train,val}_offsets.npy   int64 start of each conversation
  meta.json                 counts and the masked fraction
  manifest.json             every file's size, written last
A seeded draw per conversation sends --val_fraction of them (default 5%) to val. --max_docs N stops
after N conversations. A bad argument is one 'error: ' line and exit status 2.
"""
import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import prepared_data  # noqa: E402
from configurator import check_folder, fail, one_line_errors, ruled  # noqa: E402
from chat_template import chat_turn  # noqa: E402  (the template lives in one place)
from codec import EOT_ID, gpt2_encoding  # noqa: E402

HUB_DATASET, HUB_CONFIG = 'HuggingFaceTB/smoltalk2', 'SFT'
HUB_SPLIT = 'smoltalk_smollm3_smol_magpie_ultra_no_think'
ROLE_NAMES = {'system': 'system', 'user': 'user', 'assistant': 'assistant', 'human': 'user', 'gpt': 'assistant'}

parser = one_line_errors(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
parser.add_argument('--dataset', default=HUB_DATASET, help='a hub dataset (owner/name) or a local .json/.jsonl/.parquet file')
parser.add_argument('--config', help=f'the hub dataset\'s config (default: {HUB_CONFIG} for {HUB_DATASET})')
parser.add_argument('--split', help=f'the hub dataset\'s split (default: {HUB_SPLIT} for {HUB_DATASET}, else train)')
parser.add_argument('--max_docs', type=ruled(int, '>= 0'), default=0, help='stop after this many conversations (0 = all)')
# the shortest whole conversation, a one-token question and a one-token reply in the template, is 32 tokens
parser.add_argument('--max_tokens', type=ruled(int, '>= 32'), default=1024, help='longest conversation kept, in tokens')
parser.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)))
# 0 is allowed (every conversation to train); 1 would leave train empty
parser.add_argument('--val_fraction', type=ruled(float, 'in [0, 1)'), default=0.05)
parser.add_argument('--seed', type=ruled(int, '>= 0'), default=2357)  # numpy's generators take no negative seed
args = parser.parse_args()
check_folder('--out_dir', args.out_dir)  # before the dataset opens, which can take a while


try:
    encoding = gpt2_encoding()
except ValueError as e:
    fail(str(e))


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
    """tokens, mask and offsets of one split, written into the staging folder."""

    def __init__(self, name):
        self.name = name
        self.files = {kind: open(os.path.join(staging, f'{name}{kind}'), 'wb') for kind in ('.bin', '_mask.bin')}
        self.offsets, self.tokens, self.masked = [], 0, 0

    def add(self, tokens, mask):
        self.offsets.append(self.tokens)
        prepared_data.write_array(self.files['.bin'], np.array(tokens, dtype=np.uint16))
        prepared_data.write_array(self.files['_mask.bin'], np.array(mask, dtype=np.uint8))
        self.tokens += len(tokens)
        self.masked += sum(mask)

    def close(self):
        for f in self.files.values():
            f.close()
        np.save(os.path.join(staging, f'{self.name}_offsets.npy'), np.array(self.offsets, dtype=np.int64))


if args.dataset == HUB_DATASET:
    args.config, args.split = args.config or HUB_CONFIG, args.split or HUB_SPLIT
try:
    records = prepared_data.open_records(args.dataset, ('.json', '.jsonl', '.parquet'), args.config, args.split or 'train')
except ValueError as e:
    fail(str(e))

os.makedirs(args.out_dir, exist_ok=True)
staging = prepared_data.staging_dir(args.out_dir)
rng = np.random.default_rng(args.seed)
splits = {'train': SplitWriter('train'), 'val': SplitWriter('val')}
seen, skipped, cut = 0, 0, 0
try:
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
except BaseException as error:  # Ctrl-C included: the folder keeps the set it had
    prepared_data.abandon(args.out_dir, error)
    raise

if not splits['train'].offsets and not splits['val'].offsets:
    prepared_data.discard(args.out_dir)
    fail(f'none of the {seen} records has a user turn and an assistant reply (fields messages or conversations)')
meta = {'records': seen, 'skipped': skipped, 'cut': cut, 'max_tokens': args.max_tokens}
try:  # the last buffers are written here: a full disk too is one line, the folder keeping the set it had
    for name, split in splits.items():
        split.close()
        meta[name] = {'conversations': len(split.offsets), 'tokens': split.tokens,
                      'masked_fraction': split.masked / max(split.tokens, 1)}
    with open(os.path.join(staging, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)
except BaseException as error:
    prepared_data.abandon(args.out_dir, error)
    raise
prepared_data.commit(args.out_dir, 'data/smoltalk/prepare.py')
print(f"{seen:,} records: train {meta['train']['conversations']:,} conversations ({meta['train']['tokens']:,} tokens), "
      f"val {meta['val']['conversations']:,} ({meta['val']['tokens']:,} tokens); "
      f"{skipped:,} skipped without a user turn and an assistant reply, {cut:,} cut to {args.max_tokens} tokens")
