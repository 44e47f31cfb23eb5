"""
Evaluate a checkpoint: its loss on a prepared split, bits per byte, HellaSwag as lm-evaluation-harness
scores it, and any lm-evaluation-harness task:

    python eval_bio.py --ckpt=out-shakespeare-char-cpu/ckpt.pt --tasks=val,bpb
    python eval_bio.py --ckpt=gpt2 --tasks=val,hellaswag --dataset=openwebtext --out=results.json
    python eval_bio.py --ckpt=wigglegpt-shakespeare --harness_tasks=arc_easy,lambada_openai   (pip install lm-eval)

--ckpt is anything a script loads (checkpoints.py): a ckpt.pt, an exported folder, hf:OWNER/REPO[/FILE.pt],
or gpt2, gpt2-medium, gpt2-large, gpt2-xl. --tasks (comma-separated) takes:
- val: the mean loss in nats per token on data/<dataset>/<split>.bin (the checkpoint's own dataset unless
  --dataset names one; its tokenizer must be the model's), over the whole split or its first --max_tokens
  tokens. The tokens are cut into windows of the model's block_size that do not overlap: the window at
  token i predicts tokens i+1 .. i+block_size from tokens i .. i+block_size-1, and the last one may be
  shorter, so every token but the first is predicted once. --batch_size windows run per forward.
- bpb: bits per byte, which compares models across tokenizers (characters, GPT-2 BPE), as
  lm-evaluation-harness defines it: the summed loss / ln 2 / the UTF-8 bytes of the whole of --text_path (a
  UTF-8 text) or, without one, of the split val reads, scored as its loglikelihood_rolling scores a
  document: every token after <|endoftext|> (a character model's first character begins it, unscored), in
  windows of block_size predicted tokens, the last after a full context. A token's bytes are its bytes in
  GPT-2's BPE (<|endoftext|> counts the 13 of its name) or its character's.
- hellaswag: the 10,042 items of HellaSwag's validation set (the first --limit), zero-shot, scored exactly
  as lm-evaluation-harness 0.4 scores its hellaswag task. The context is "<activity_label>: <ctx_a>
  <ctx_b, capitalized>" and each choice an ending, both cleaned as the harness cleans them (stripped,
  " [title]" made ". ", other [bracketed] WikiHow markers dropped, double spaces made single); a choice
  continues the context after one space. As the harness splits them, spaces ending the context move to
  the continuation, and the continuation's tokens are those of encoding context + continuation whole
  past the context's own tokens; inputs longer than block_size + 1 tokens lose their start. acc: the
  choice of the highest summed log-likelihood of its tokens is the labelled one; acc_norm: the same with
  each sum divided by the choice's length in characters (without the space). An item's choices run in
  one batch. The official file is downloaded once into data/hellaswag/; --hellaswag_path reads a local
  file in its format (one JSON object a line: activity_label, ctx_a, ctx_b, endings, label).
--harness_tasks (comma-separated) runs lm-evaluation-harness tasks (pip install lm-eval) through a model
of this checkpoint: loglikelihood through the scoring of hellaswag above (--batch_size requests per
forward), loglikelihood_rolling in the harness's windows of block_size tokens after <|endoftext|>, and
generate_until one request at a time with generation.py (greedy, or at the request's temperature from
a generator seeded 1337; a prompt cut from the left to leave room for max_gen_toks, as the harness cuts it),
stopping at the request's strings, <|endoftext|> or max_gen_toks (256 unless the task sets it). A character model has no <|endoftext|>: an empty context starts at the text's first
character, which is not scored. --harness_include_path adds a folder of task YAMLs (lm-eval's
--include_path), e.g. tasks on local files; --limit applies too. The harness's metrics are recorded
without their ",none" filter suffix, with n, the items scored.

Results print as a table on stdout (with each task's speed; progress bars go to stderr). --out=FILE also
writes them as JSON, {"ckpt": CKPT, "val": {"loss", "tokens", "dataset", "split"}, "bpb": {"bpb", "bytes",
"tokens", "source"}, "hellaswag": {"acc", "acc_norm", "n"}, "harness": {task: {metric: value}}}; a file of
earlier results for the same --ckpt is merged (a task run again replaces its old entry), one for another
checkpoint is refused. An exported folder (export_hub.py) also keeps its results: they are merged into
its eval_results.json, and its README.md gets them as the table between the markers of its Evaluation
section (added at its end if missing; the rest of the card, edited by hand or not, stays as it is).
Scores are computed in float32 unless --dtype says otherwise (the harness scores GPT-2 so); batches
made up differently round differently, by about 1e-5 nats in float32. An exported folder in the hub's
cache (a download) is not written into; one being written (by export_hub.py, another evaluation) is refused,
as evaluating holds its lock (files.py). Files are written whole or not at all, never through a link (a new temp
file, then a rename). Every mistake in the settings, or in a file given, is one line `error: ...` and exit
status 2, before anything is written; so is data prepared with another vocabulary than the checkpoint's, and a
result that is not finite (NaN weights or logits), of which nothing is written.
"""

import json
import math
import os
import re
import signal
import sys
import time
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import devices
import prepared_data
from checkpoints import error_line, is_hub_name, load_model, note_local_gpt2
from codec import dataset_tokenizer, gpt2_encoding, is_dataset_name, load_codec, tokenizer_difference, tokenizer_facts
from eval_results import RESULTS_FILE, TASKS, card_section, merged, read_results, result_rows, with_card_section, write_json
from files import claim_folder, create_new, remove_entry, write_file

ckpt = ''  # what to evaluate: a path, an exported folder, hf:OWNER/REPO[/FILE.pt], or gpt2 (-medium, -large, -xl)
tasks = ''  # comma-separated: val, bpb, hellaswag
dataset = ''  # val and bpb: data/<dataset>/; '' is the checkpoint's training dataset
split: 'one of train, val' = 'val'
max_tokens: '>= 0' = 0  # val and bpb: only the first max_tokens tokens; 0 is all
text_path = ''  # bpb: a UTF-8 text file in place of the split
hellaswag_path = ''  # a HellaSwag file in the official jsonl format; '' is the official one, downloaded once
limit = 0  # hellaswag and harness tasks: only the first limit items (at least 1); 0, the default, is all
batch_size: '>= 1' = 8  # val and bpb windows, or harness requests, per forward
harness_tasks = ''  # comma-separated lm-evaluation-harness tasks (pip install lm-eval)
harness_include_path = ''  # a folder of lm-evaluation-harness task YAMLs (its --include_path)
out = ''  # a JSON file for the results; '' prints them only
device = 'auto'
dtype = 'float32'  # as the harness scores GPT-2; 'auto' (bfloat16 on most GPUs) is faster, its scores ~1e-2 off
# -----------------------------------------------------------------------------
from configurator import check_folder, configure, declared_rules, fail, settings_in  # noqa: E402

DEFAULTS = settings_in(globals())  # the settings alone: taken before the names below join them
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
HELLASWAG_URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'
HELLASWAG_CACHE = os.path.join(DATA_DIR, 'hellaswag', 'hellaswag_val.jsonl')  # .gitignore keeps data/*/*.jsonl out
HELLASWAG_ITEMS = 10042  # in the official validation file
HELLASWAG_MAX_BYTES = 2 ** 27  # the official file has about 11 MB: a download far past that is something else
GENERATION_SEED = 1337


def score_continuations(model, pairs, autocast):
    """(summed log-likelihood of the continuation's tokens, whether greedy decoding gives them all) for each
    (context ids, continuation ids) of pairs, in one forward: each row is context + continuation cut from
    the left to block_size + 1 tokens, less its last, right-padded (the model is causal, so the padding
    changes no logit that is read). Every loglikelihood of this script is computed here."""
    block_size = model.config.block_size
    rows = [(context + continuation)[-(block_size + 1):][:-1] for context, continuation in pairs]
    for (context, continuation), row in zip(pairs, rows):
        if len(continuation) > len(row):
            raise ValueError(f'a continuation of {len(continuation)} tokens does not fit the model\'s context of '
                             f'{block_size} tokens')
    device = next(model.parameters()).device
    # at least one column: a row may be empty (a character model's one-character text, nothing to score)
    idx = torch.zeros((len(rows), max(1, *(len(row) for row in rows))), dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, :len(row)] = torch.tensor(row)
    with torch.no_grad(), autocast:
        logits, _ = model(idx.to(device), all_positions=True)
    scores = []
    for i, (row, (_, continuation)) in enumerate(zip(rows, pairs)):
        log_probs = F.log_softmax(logits[i, len(row) - len(continuation):len(row)].float(), dim=-1)
        target = torch.tensor(continuation, dtype=torch.long, device=device)
        loglikelihood = log_probs.gather(1, target[:, None]).sum().item()
        scores.append((loglikelihood, bool((log_probs.argmax(-1) == target).all())))
    return scores


def encode_pair(encode, context, continuation, start_id):
    """(context ids, continuation ids) as lm-evaluation-harness splits a request (its TemplateLM): spaces
    that end the context move to the continuation, and the continuation's ids are those of the whole text
    past the context's own. An empty context is the start token (<|endoftext|>), unless the continuation
    begins with it; a character model has none (start_id None), so its first token serves instead."""
    if not context:
        ids = encode(continuation)
        return (ids[:1], ids[1:]) if start_id is None or ids[:1] == [start_id] else ([start_id], ids)
    kept = context.rstrip()
    context, continuation = kept, context[len(kept):] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


def score_all(model, pairs, batch_size, autocast, desc):
    """score_continuations of many pairs, batch_size at a time, longest first (so a batch pads little);
    returned in the order of pairs."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    scores = [None] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit='batch'):
        batch = order[start:start + batch_size]
        for i, score in zip(batch, score_continuations(model, [pairs[i] for i in batch], autocast)):
            scores[i] = score
    return scores


def rolling_windows(ids, prefix, block_size):
    """(context, continuation) pairs that predict every token of ids once, as lm-evaluation-harness's rolling
    log-likelihood does (its get_rolling_token_windows with context_len=1, made disjoint): the first predicts
    ids[:block_size] after prefix, each later one the next block_size tokens (the rest, at the end) after the
    tokens before them, as many as fit in block_size + 1 with it (so the last keeps a full context)."""
    pairs = []
    for start in range(0, len(ids), block_size):
        end = min(start + block_size, len(ids))
        pairs.append(([prefix] if start == 0 else ids[end - block_size - 1:start], ids[start:end]))
    return pairs


def rolling_nats(model, ids, start_id, batch_size, autocast, desc):
    """(summed loss in nats, tokens scored) of ids as the harness's loglikelihood_rolling scores a document: every
    token after <|endoftext|> (start_id); a character model has none, so its first token begins, unscored."""
    ids = [int(i) for i in ids]
    prefix, scored = (start_id, ids) if start_id is not None else (ids[0], ids[1:])
    pairs = rolling_windows(scored, prefix, model.config.block_size)
    return -sum(loglikelihood for loglikelihood, _ in score_all(model, pairs, batch_size, autocast, desc)), len(scored)


def summed_loss(model, tokens, batch_size, autocast, desc):
    """The summed loss (nats) of tokens[1:], each predicted once, in windows of block_size that do not
    overlap (the last may be shorter), batch_size windows per forward."""
    block_size = model.config.block_size
    device = next(model.parameters()).device
    starts = range(0, len(tokens) - 1, block_size)
    total = 0.0
    with tqdm(total=len(tokens) - 1, desc=desc, unit='tok') as bar:
        for first in range(0, len(starts), batch_size):
            windows = [np.asarray(tokens[i:i + block_size + 1], dtype=np.int64) for i in starts[first:first + batch_size]]
            width = max(len(w) for w in windows) - 1
            x = torch.zeros((len(windows), width), dtype=torch.long)
            y = torch.full((len(windows), width), -1, dtype=torch.long)  # -1: padding, not scored
            for row, window in enumerate(windows):
                x[row, :len(window) - 1] = torch.from_numpy(window[:-1])
                y[row, :len(window) - 1] = torch.from_numpy(window[1:])
            with torch.no_grad(), autocast:
                logits, _ = model(x.to(device), all_positions=True)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1,
                                     reduction='sum').item()
            bar.update(sum(len(w) - 1 for w in windows))
    return total


def token_bytes(facts):
    """The UTF-8 bytes of each token id's text, as an array indexed by id (the tokenizer's ids alone)."""
    if facts['type'] == 'characters':
        return np.array([len(c.encode('utf-8')) for c in facts['chars']], dtype=np.int64)
    encoding = gpt2_encoding()  # the only other tokenizer codec.check_tokenizer lets through
    return np.array([len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)], dtype=np.int64)


def read_split(dataset, split, max_tokens, facts, token_count):
    """data/<dataset>/<split>.bin (uint16 token ids, as train_bio.py reads them), or its first max_tokens
    tokens, as a memmap, once its files, its tokenizer and its ids are known to fit the model; ValueError otherwise."""
    data_dir = os.path.join(DATA_DIR, dataset)
    path = os.path.join(data_dir, f'{split}.bin')
    shown, prepare = f'data/{dataset}/{split}.bin', f'python data/{dataset}/prepare.py'
    if not os.path.isfile(path):
        raise ValueError(f'{shown} not found; prepare it first ({prepare}) or name another --dataset')
    note = prepared_data.check(data_dir, [f'{split}.bin'], prepare)
    if note:
        print(note, file=sys.stderr)
    difference = tokenizer_difference(dataset_tokenizer(data_dir), facts)
    if difference:
        raise ValueError(f'data/{dataset} was prepared with another vocabulary than the model was trained on '
                         f'({difference}); evaluate it on the data it was made for (--dataset), or prepare '
                         f'data/{dataset} as it was')
    size = os.path.getsize(path)
    if size % 2:
        raise ValueError(f'{shown} has an odd number of bytes, so it is not uint16 token ids; run {prepare} again')
    count = min(size // 2, max_tokens or size // 2)
    if count < 2:
        raise ValueError(f'{shown} holds {count} token{"" if count == 1 else "s"} (up to --max_tokens): at least 2 '
                         'are needed, one to predict from and one to predict')
    tokens = np.memmap(path, dtype=np.uint16, mode='r', shape=(count,))
    largest = int(tokens.max())
    if largest >= token_count:
        raise ValueError(f'{shown} holds token id {largest}, outside the model\'s {token_count}-token vocabulary; '
                         f'run {prepare} again')
    return tokens


def read_text_tokens(path, encode, max_tokens):
    """A UTF-8 text file's token ids (its first max_tokens, if that is not 0); ValueError in one line otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f'--text_path={path} is {"a folder" if os.path.isdir(path) else "not found"}; name a text file')
    try:
        with open(path, encoding='utf-8', newline='') as f:  # its bytes as they are: \r\n stays two characters
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f'--text_path={path} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); '
                         'save it as UTF-8') from None
    except OSError as e:
        raise ValueError(f'--text_path={path} cannot be read ({error_line(e)})') from None
    try:
        ids = encode(text)
    except ValueError as e:
        raise ValueError(f'--text_path={path} has {e}') from None
    ids = np.array(ids[:max_tokens or len(ids)], dtype=np.int64)
    if len(ids) < 2:
        raise ValueError(f'--text_path={path} gives {len(ids)} token{"" if len(ids) == 1 else "s"}: at least 2 are '
                         'needed, one to predict from and one to predict')
    return ids


def harness_clean(text):
    """HellaSwag text as lm-evaluation-harness cleans it (tasks/hellaswag/utils.py): stripped, ' [title]'
    made a sentence end, WikiHow's other [bracketed] markers dropped, then one pass of double spaces to single."""
    text = re.sub(r'\[.*?\]', '', text.strip().replace(' [title]', '. '))
    return text.replace('  ', ' ')


def read_hellaswag(path):
    """The items of a HellaSwag file in the official jsonl format as (context, choices, label), cleaned as
    the harness cleans them; ValueError naming the line of the first malformed item."""
    if not os.path.isfile(path):
        raise ValueError(f'--hellaswag_path={path} is {"a folder" if os.path.isdir(path) else "not found"}; name '
                         'a jsonl file in the official format')
    items = []
    with open(path, 'rb') as f:
        for number, line in enumerate(f, 1):
            where = f'{path} line {number}'
            try:
                item = json.loads(line.decode('utf-8')) if line.strip() else None
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ValueError(f'{where} is not a JSON object ({error_line(e)})') from None
            if item is None:
                continue
            texts = ('activity_label', 'ctx_a', 'ctx_b')
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in texts):
                raise ValueError(f'{where} is not a HellaSwag item: it needs "activity_label", "ctx_a" and "ctx_b" '
                                 'as text')
            endings, label = item.get('endings'), item.get('label')
            if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
                raise ValueError(f'{where} is not a HellaSwag item: its "endings" must be a list of at least 2 texts')
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
                raise ValueError(f'{where} is not a HellaSwag item: its "label" must be a whole number from 0 to '
                                 f'{len(endings) - 1} (the place of the right ending)')
            context = harness_clean(f"{item['activity_label']}: {item['ctx_a']} {item['ctx_b'].capitalize()}")
            items.append((context, [harness_clean(e) for e in endings], label))
    if not items:
        raise ValueError(f'{path} holds no HellaSwag items')
    return items


def download_hellaswag(path):
    """Download the official HellaSwag validation file to path, whole or not at all: into a temp file,
    kept (renamed) once it reads as 10,042 items. ValueError in one line if it cannot be had."""
    tmp = path + '.tmp'
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f'downloading {HELLASWAG_URL} to {path}', file=sys.stderr)
    try:
        remove_entry(tmp)
        with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as response, create_new(tmp) as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                if f.tell() > HELLASWAG_MAX_BYTES:
                    raise ValueError(f'the download passed {HELLASWAG_MAX_BYTES:,} bytes, far more than the file has')
        count = len(read_hellaswag(tmp))
        if count != HELLASWAG_ITEMS:
            raise ValueError(f'it holds {count:,} items, not {HELLASWAG_ITEMS:,}')
    except (OSError, ValueError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f'could not download HellaSwag from {HELLASWAG_URL} ({error_line(e)}); download it yourself '
                         'and pass it with --hellaswag_path=FILE') from None
    os.replace(tmp, path)


def first_not_finite(results):
    """'task metric' of the first number among results ({task: {metric: value}}, harness tasks nested) that
    is not finite, or None."""
    for task, metrics in results.items():
        if task == 'harness':
            found = first_not_finite(metrics)
            if found:
                return found
            continue
        for name, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                return f'{task} {name}'
    return None


def hellaswag_loglikelihoods(model, items, encode, start_id, autocast):
    """Each item's summed log-likelihood of each choice, its choices in one batch."""
    scores = []
    for context, choices, _ in tqdm(items, desc='hellaswag', unit='item'):
        pairs = [encode_pair(encode, context, ' ' + choice, start_id) for choice in choices]
        scores.append([loglikelihood for loglikelihood, _ in score_continuations(model, pairs, autocast)])
    return scores


def hellaswag_accuracy(items, scores):
    """acc and acc_norm, as the harness's multiple_choice tasks count them (api/task.py process_results): the
    highest log-likelihood wins (the first on a tie), for acc_norm divided by the choice's length in characters."""
    right = right_norm = 0
    for (_, choices, label), loglikelihoods in zip(items, scores):
        lengths = np.array([float(len(choice)) for choice in choices])
        with np.errstate(divide='ignore', invalid='ignore'):  # an ending the cleaning leaves empty, as in the harness
            right_norm += int(np.argmax(np.array(loglikelihoods) / lengths) == label)
        right += int(np.argmax(loglikelihoods) == label)
    return {'acc': right / len(items), 'acc_norm': right_norm / len(items), 'n': len(items)}


def harness_model(model, encode, decode, start_id, batch_size, autocast):
    """An lm-evaluation-harness model (a subclass of its lm_eval.api.model.LM) that runs the loaded checkpoint."""
    from lm_eval.api.model import LM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    block_size = model.config.block_size
    end_text = None if start_id is None else decode([start_id])

    class WiggleGPTHarnessModel(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            pairs = [encode_pair(encode, context, continuation, start_id) for context, continuation in
                     (request.args for request in requests)]
            return score_all(model, pairs, batch_size, autocast, 'loglikelihood')

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            windows, owners = [], []
            for n, (text,) in enumerate(request.args for request in requests):
                ids = encode(text)
                # a character model has no start token: its first character begins the text, unscored
                prefix, ids = (start_id, ids) if start_id is not None else (ids[0] if ids else None, ids[1:])
                for window in rolling_windows(ids, prefix, block_size):
                    windows.append(window)
                    owners.append(n)
            totals = [0.0] * len(requests)
            for n, (loglikelihood, _) in zip(owners, score_all(model, windows, batch_size, autocast, 'rolling')):
                totals[n] += loglikelihood
            return totals

        def generate_until(self, requests, disable_tqdm=False):
            from generation import generate_tokens
            generator = torch.Generator(device=next(model.parameters()).device).manual_seed(GENERATION_SEED)
            texts = []
            for context, gen_kwargs in tqdm([request.args for request in requests], desc='generate', unit='request'):
                settings = normalize_gen_kwargs(gen_kwargs, 256)
                stops = [stop for stop in handle_stop_sequences(settings['until'], end_text) if stop]
                # as the harness cuts a prompt: from the left, to leave max_gen_toks of the context (none slides)
                prompt = (encode(context) or ([start_id] if start_id is not None else []))[-max(block_size - settings['max_gen_toks'], 1):]
                if not prompt:
                    raise ValueError('a generate_until request has an empty context, and a character model has no '
                                     'start token to generate from')
                # sampling at 1.0 where a task asks for it without a temperature, as transformers' generate does
                temperature = settings.get('temperature', 1.0) if settings['do_sample'] else 0.0
                ids = []
                with autocast:
                    for token in generate_tokens(model, prompt, settings['max_gen_toks'], temperature=temperature,
                                                 top_k=None, generator=generator):
                        ids.append(token)
                        if any(stop in decode(ids) for stop in stops):
                            break
                # as the harness cuts a generation: before each stop string in turn (a partial one at the end stays)
                text = decode(ids)
                for stop in stops:
                    text = text.split(stop)[0]
                texts.append(text)
            return texts

    return WiggleGPTHarnessModel()


def same_checkpoint(a, b):
    """Whether two --ckpt values name the same checkpoint (a local path however it is spelled)."""
    return a == b or (not is_hub_name(a) and not is_hub_name(b) and os.path.abspath(a) == os.path.abspath(b))


def in_hub_cache(folder):
    """Whether folder is a snapshot in huggingface_hub's cache (models--OWNER--NAME/snapshots/COMMIT/...)."""
    parts = os.path.abspath(folder).split(os.sep)
    return any(part == 'snapshots' and i > 0 and parts[i - 1].startswith('models--') for i, part in enumerate(parts))


def harness_results(evaluation):
    """{task: {metric: value, ..., 'n': items}} of what lm_eval.simple_evaluate returns, its metrics named
    without the ',none' of their default filter (other filters keep theirs)."""
    results = {}
    for task, metrics in evaluation['results'].items():
        # a standard error of a single item is NaN (or 'N/A'): only finite numbers are results
        kept = {name.removesuffix(',none'): value for name, value in metrics.items()
                if ',' in name and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
        if task in evaluation.get('n-samples', {}):
            kept['n'] = evaluation['n-samples'][task]['effective']
        results[task] = kept
    return results


if __name__ == '__main__':
    given = set()
    globals().update(configure(DEFAULTS, sys.argv[1:], declared_rules(__file__), given))
    # Ctrl-C is one line, not a traceback (results files are written whole or not at all)
    signal.signal(signal.SIGINT, lambda signum, frame: fail('interrupted (Ctrl-C)'))
    # -------------------------------------------------------------------------
    # every setting checked, and every file read that can be, before the model loads
    task_list = list(dict.fromkeys(t.strip() for t in tasks.split(',') if t.strip()))
    harness_list = list(dict.fromkeys(t.strip() for t in harness_tasks.split(',') if t.strip()))
    for task in task_list:
        if task not in TASKS:
            fail(f"unknown task {task!r}: --tasks takes {', '.join(TASKS)} "
                 '(lm-evaluation-harness tasks go in --harness_tasks)')
    if not task_list and not harness_list:
        fail('no tasks to run: name some with --tasks=val,bpb,hellaswag or --harness_tasks=TASK,...')
    if not ckpt:
        fail('no checkpoint: name one with --ckpt (a ckpt.pt, an exported folder, hf:OWNER/REPO, gpt2)')
    if 'limit' in given and limit < 1:
        fail(f'limit = {limit} is not allowed: it must be at least 1 (leave it out to score every item)')
    if dataset and not is_dataset_name(dataset):
        fail(f'dataset={dataset!r} must be the name of a folder in data/, such as shakespeare_char')
    if harness_include_path and not os.path.isdir(harness_include_path):
        fail(f'--harness_include_path={harness_include_path} is not a folder; name a folder of task YAML files')
    if hellaswag_path and 'hellaswag' in task_list and not os.path.isfile(hellaswag_path):
        fail(f'--hellaswag_path={hellaswag_path} is {"a folder" if os.path.isdir(hellaswag_path) else "not found"}; '
             'name a jsonl file in the official format')
    previous = {}
    if out:
        if os.path.isdir(out):
            fail(f'--out={out} is a folder; name a JSON file to write')
        check_folder('--out', os.path.dirname(out) or '.')
        try:
            previous = read_results(out)
        except ValueError as e:
            fail(str(e))
        if not same_checkpoint(previous.get('ckpt', ckpt), ckpt):
            fail(f"{out} holds the results of another checkpoint ({previous['ckpt']!r:.80}); write these to "
                 'another --out')
    # an exported folder keeps its own results (its card shows them), unless it is a download in the hub's
    # cache, whose files are links into its store
    export_folder = ckpt if os.path.isdir(ckpt) and not is_hub_name(ckpt) and not in_hub_cache(ckpt) else None
    folder_results, card = {}, ''
    if export_folder:
        card_path = os.path.join(export_folder, 'README.md')
        try:
            claim_folder(export_folder, 'model')  # its results and card have one writer
            # a link planted at either is not read (its target's text would land in the card): it is replaced
            results_path = os.path.join(export_folder, RESULTS_FILE)
            folder_results = {} if os.path.islink(results_path) else read_results(results_path)
            if os.path.exists(card_path) and not os.path.islink(card_path):  # read now: one that cannot be rewritten stops the run first
                with open(card_path, encoding='utf-8', newline='') as f:
                    card = f.read()
        except (OSError, UnicodeDecodeError) as e:  # UnicodeDecodeError before ValueError: it is one
            fail(f'{card_path} cannot be read as text ({error_line(e)}); move it away, or evaluate a copy of the folder')
        except ValueError as e:
            fail(str(e))
    harness_manager = None
    if harness_list:
        try:
            import lm_eval  # noqa: F401
            from lm_eval.tasks import TaskManager
        except ImportError:
            fail('--harness_tasks needs lm-eval: pip install lm-eval')
        harness_manager = TaskManager(include_path=harness_include_path or None)
        known = set(harness_manager.all_tasks)
        for task in harness_list:
            if task not in known:
                fail(f'unknown lm-evaluation-harness task {task!r} (`lm-eval ls tasks` lists them; tasks of your own '
                     'go in a folder named by --harness_include_path)')
    try:
        device = devices.pick_device(device)
        dtype = devices.pick_dtype(device, dtype)
        note_local_gpt2(ckpt, 'ckpt', (ckpt,))
        model, checkpoint = load_model(ckpt, device)
        encode, decode = load_codec(checkpoint)
        facts = tokenizer_facts(checkpoint)
    except ValueError as e:
        fail(str(e))
    model.eval()
    autocast = devices.autocast(device, dtype)
    start_id = facts.get('eot_id')  # GPT-2 BPE's <|endoftext|>; characters have no such token
    bytes_of = token_bytes(facts) if 'bpb' in task_list or 'val' in task_list else None
    inputs = {}
    try:
        if 'val' in task_list or ('bpb' in task_list and not text_path):
            dataset = dataset or checkpoint.get('config', {}).get('dataset') or ''
            if not is_dataset_name(dataset):
                fail('the checkpoint names no dataset of data/ that it was trained on; name one with --dataset')
            inputs['split'] = read_split(dataset, split, max_tokens, facts, len(bytes_of))
        if 'bpb' in task_list and text_path:
            inputs['text'] = read_text_tokens(text_path, encode, max_tokens)
        if 'hellaswag' in task_list:
            if not hellaswag_path and not os.path.isfile(HELLASWAG_CACHE):
                download_hellaswag(HELLASWAG_CACHE)
            inputs['hellaswag'] = read_hellaswag(hellaswag_path or HELLASWAG_CACHE)[:limit or None]
    except ValueError as e:
        fail(str(e))

    # -------------------------------------------------------------------------
    results, speeds = {}, {}  # speeds: each task's items or tokens per second
    for task in task_list:
        started = time.perf_counter()
        if task == 'val':
            tokens = inputs['split']
            loss = summed_loss(model, tokens, batch_size, autocast, 'val') / (len(tokens) - 1)
            results['val'] = {'loss': loss, 'tokens': len(tokens) - 1, 'dataset': dataset, 'split': split}
            count, unit = len(tokens) - 1, 'tokens'
        elif task == 'bpb':
            tokens = inputs['text'] if text_path else inputs['split']
            nats, scored = rolling_nats(model, tokens, start_id, batch_size, autocast, 'bpb')
            n_bytes = int(bytes_of[np.asarray(tokens, dtype=np.int64)].sum())  # the whole text's, as the harness counts
            results['bpb'] = {'bpb': nats / math.log(2) / n_bytes, 'bytes': n_bytes, 'tokens': scored,
                              'source': text_path or f'data/{dataset}/{split}.bin'}
            count, unit = scored, 'tokens'
        else:
            items = inputs['hellaswag']
            try:
                scores = hellaswag_loglikelihoods(model, items, encode, start_id, autocast)
            except ValueError as e:
                fail(f'hellaswag: {e}')
            if not all(math.isfinite(s) for item_scores in scores for s in item_scores):
                results['hellaswag'] = {'loglikelihood': math.nan}  # the accuracy of NaN scores is no result
            else:
                results['hellaswag'] = hellaswag_accuracy(items, scores)
            count, unit = len(items), 'items'
        speeds[task] = f'{count / (time.perf_counter() - started):,.1f} {unit}/s'
    if harness_list:
        started = time.perf_counter()
        harness_lm = harness_model(model, encode, decode, start_id, batch_size, autocast)
        try:
            evaluation = lm_eval.simple_evaluate(model=harness_lm, tasks=harness_list, task_manager=harness_manager,
                                                 limit=limit or None, log_samples=False)
        except Exception as e:  # a task's data that cannot be had, a request the model cannot take: one line
            fail(f'lm-evaluation-harness stopped: {error_line(e)}')
        results['harness'] = harness_results(evaluation)
        scored, seconds = sum(result.get('n', 0) for result in results['harness'].values()), time.perf_counter() - started
        harness_speed = f'lm-evaluation-harness: {scored:,} items in {seconds:.1f} s ({scored / seconds:,.1f} items/s)'

    not_finite = first_not_finite(results)
    if not_finite:  # a result no one can use, and that would make the folder's files unreadable: nothing is written
        fail(f"{not_finite} is not finite: the model's output is NaN or infinite (its weights, or float16's range: "
             'try --dtype=float32); nothing was written')
    rows = result_rows(results)
    width = max(len(task) for task, _ in rows)
    for task, text in rows:
        print(f'{task:<{width}}  {text}' + (f'  [{speeds[task]}]' if task in speeds else ''))
    if harness_list:
        print(harness_speed)
    try:
        if export_folder:  # the card first: results recorded in the folder must be what its card shows
            folder_results = merged(folder_results, results)
            card_path = os.path.join(export_folder, 'README.md')
            write_file(card_path, with_card_section(card, card_section(folder_results)))
            write_json(os.path.join(export_folder, RESULTS_FILE), folder_results)
            print(f'recorded the results in {export_folder} ({RESULTS_FILE}, README.md)', file=sys.stderr)
        if out:
            os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
            write_json(out, {'ckpt': ckpt, **merged({k: v for k, v in previous.items() if k != 'ckpt'}, results)})
            print(f'wrote {out}', file=sys.stderr)
    except ValueError as e:
        fail(f'could not write the results ({e})')
