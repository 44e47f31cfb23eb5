"""
Export a trained checkpoint as a folder ready for the HuggingFace hub, and optionally upload it:
    python export_hub.py --out_dir=out-shakespeare-char-cpu --export_dir=wigglegpt-shakespeare
    python export_hub.py --out_dir=out-wigglegpt-pure-124m --push_to_hub=OWNER/REPO
The folder holds model.safetensors (the weights; the tied embedding stored once), config.json (the
architecture, the tokenizer facts and the run's settings) and README.md, a model card with the
settings and the results of the run's log.jsonl. Every script loads it back by its path or, once
uploaded, as hf:OWNER/REPO:
    python sample_bio.py --ckpt=hf:OWNER/REPO
Exporting again over an earlier export keeps its README.md, which may have been edited by hand, and
writes the new card beside it as README.new.md (never uploaded); --overwrite_card=True replaces it.
The eval_results.json that eval_bio.py keeps in an exported folder stays there too, and its results
are the card's Evaluation table (eval_bio.py refreshes that table alone in README.md as it evaluates),
as long as the export writes the same weights again; over an export of other weights it is removed.

Settings: out_dir and ckpt pick the checkpoint as for sample_bio.py (ckpt.pt or ckpt_best.pt in
out_dir, or a path or hub name of its own); export_dir is the folder to write (default
out_dir/hub); push_to_hub=OWNER/REPO also uploads it; overwrite_card as above. In detail:
model.safetensors stores lm_head.weight, which is tied to transformer.wte.weight, once;
config.json holds the architecture, the tokenizer (a character list, or GPT-2 BPE), the run's
settings, its iteration and its best val loss; the card lists the architecture, the settings and
the evaluations of the log.jsonl beside the checkpoint, its text from the checkpoint shown as code (no
setting can add a heading, a link or HTML to the card). The script writes only into a new or empty folder or over
an earlier export, never over other files and never through a link planted there, and holds the folder's
lock while it writes (files.py), so an evaluation writing into it meanwhile is refused. --push_to_hub creates the repository if
it is missing; log in first with `hf auth login`. The folder loads back wherever a checkpoint is
taken, e.g. --ckpt=wigglegpt-shakespeare.
"""

import json
import math
import os
import sys

from checkpoints import (EXPORT_CONFIG, EXPORT_MODEL_TYPE, EXPORT_WEIGHTS, TIED_COPY, checkpoint_location, error_line,
                         export_model, is_hub_name, load_model)
from codec import tokenizer_facts
from eval_results import RESULTS_FILE, card_section, card_code, read_results
from files import LOCK_NAME, claim_folder, write_file
from prepared_data import HUB_NAME
from run_log import read_log

out_dir = 'out'
ckpt = 'ckpt.pt'  # in out_dir ('ckpt_best.pt'), or a path or hf: name of its own
export_dir = ''  # the folder to write; '' is out_dir/hub
push_to_hub = ''  # OWNER/REPO: also upload the folder to this hub repository (created if missing; needs `hf auth login`)
overwrite_card = False  # over an earlier export, replace its README.md (else kept, as cards are edited by hand)
# -----------------------------------------------------------------------------
from configurator import configure, fail, settings_in  # noqa: E402

globals().update(configure(settings_in(globals()), sys.argv[1:]))
# -----------------------------------------------------------------------------
CARD, NEW_CARD = 'README.md', 'README.new.md'
source = checkpoint_location(out_dir, ckpt)
export_dir = export_dir or os.path.join(out_dir, 'hub')
# checked in full before anything is written: a name the hub refuses would stop the upload after the export
if push_to_hub and not HUB_NAME.fullmatch(push_to_hub):
    fail(f'push_to_hub={push_to_hub!r} must name a hub repository as OWNER/REPO (letters, digits, "-", "_" and "." in each)')
# the folder is written into only if it is new, empty or an earlier export: never over other files
if os.path.isfile(export_dir):
    fail(f'export_dir={export_dir} is a file; name a folder')
if os.path.isdir(export_dir) and set(os.listdir(export_dir)) - {'.cache', LOCK_NAME}:
    try:
        with open(os.path.join(export_dir, EXPORT_CONFIG), encoding='utf-8') as f:
            earlier_export = json.load(f).get('model_type') == EXPORT_MODEL_TYPE
    except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested past Python's stack
        earlier_export = False
    others = sorted(set(os.listdir(export_dir)) - {EXPORT_CONFIG, EXPORT_WEIGHTS, CARD, NEW_CARD, RESULTS_FILE, '.cache', LOCK_NAME})
    if not earlier_export or others:
        fail(f'{export_dir} already holds other files ({", ".join(others or os.listdir(export_dir))}); '
             'export into a new or empty folder (--export_dir=...)')

try:
    model, checkpoint = load_model(source, 'cpu')
    tokenizer = tokenizer_facts(checkpoint)
except ValueError as e:
    fail(str(e))
log_path = os.path.join(os.path.dirname(os.path.abspath(source)), 'log.jsonl')
evals = []
if not is_hub_name(source) and os.path.isfile(log_path):
    evals = [r for r in read_log(log_path) if {'iter', 'train_loss', 'val_loss'} <= r.keys()]


def holds_weights_of(folder, model):
    """Whether the export in folder holds exactly model's weights (it was made from the same checkpoint)."""
    import torch
    from safetensors import safe_open
    weights = {k: v for k, v in model.state_dict().items() if k != TIED_COPY}
    try:
        with safe_open(os.path.join(folder, EXPORT_WEIGHTS), 'pt') as f:
            return set(f.keys()) == set(weights) and all(torch.equal(f.get_tensor(k), weights[k]) for k in weights)
    except Exception:  # unreadable, or another model: not these weights
        return False


try:  # now, before the folder's results and card are read: one writer (another export, eval_bio.py's results)
    claim_folder(export_dir, 'model')
except ValueError as e:
    fail(str(e))
# an earlier export's evaluations (eval_bio.py) describe its weights: kept, in the card too, where the export
# writes the same weights again, and dropped where it writes others
results_path = os.path.join(export_dir, RESULTS_FILE)
try:
    eval_results = {} if os.path.islink(results_path) else read_results(results_path)  # a planted link is not read
except ValueError as e:
    fail(str(e))
stale_results = bool(eval_results) and not holds_weights_of(export_dir, model)
if stale_results:
    eval_results = {}


def model_card():
    """README.md for the hub: what the model is, how it was trained, what it reached, and how to run it."""
    arch, settings = model.config, checkpoint.get('config', {})
    name = push_to_hub or os.path.basename(os.path.abspath(export_dir))
    position = 'RoPE' if arch.use_rope and arch.use_positions else ('learned positions' if arch.use_positions else 'no positional encoding')
    mlp = {'bio': 'its MLP neurons oscillate, sin(omega*x + phi) * tanh(x) + baseline',
           'bio_glu': 'a gated MLP whose gate neurons oscillate, sin(omega*g + phi) * tanh(g) + baseline, times a value',
           'gelu': 'a GELU MLP (a control to the oscillating one)',
           'swiglu': 'a SwiGLU MLP (a control to the oscillating one)',
           'relu2': 'a ReLU² MLP (a control to the oscillating one)'}[arch.mlp]
    if arch.use_sparse_gate:
        mlp += f', sparse gate (threshold {arch.bio_threshold})'
    vocabulary = (f"{len(tokenizer['chars'])} characters" if tokenizer['type'] == 'characters'
                  else f"GPT-2 BPE ({tokenizer['encoding']}, <|endoftext|> = {tokenizer['eot_id']})")
    lines = ['---', 'library_name: wigglegpt', 'pipeline_tag: text-generation',
             'tags: [wigglegpt, oscillating-activation, text-generation]', '---', '',
             f'# {card_code(name)}', '',
             f'A GPT language model of the WiggleGPT repository: {mlp}.', '',
             '| | |', '| --- | --- |',
             f'| parameters | {model.get_num_params(non_embedding=False) / 1e6:.2f}M |',
             f'| layers, heads, width | {arch.n_layer}, {arch.n_head}, {arch.n_embd} |',
             f'| context | {arch.block_size} tokens |',
             f'| norm, positions | {"RMSNorm" if arch.use_rmsnorm else "LayerNorm"}, {position} |',
             f'| vocabulary | {vocabulary} |', '']
    lines += ['## Training', '']
    if settings:
        iters, tokens = checkpoint.get('iter_num'), checkpoint.get('tokens')
        lines += [f"Dataset {card_code(settings.get('dataset', '?'))} ({card_code(settings.get('task', 'pretrain'))})"
                  + (f', {iters:,} iterations' if iters else '') + (f', {tokens:,} tokens' if tokens else '')
                  + '. Settings:', '',
                  '| setting | value |', '| --- | --- |']
        lines += [f'| {card_code(k)} | {card_code(repr(v))} |' for k, v in sorted(settings.items())]
    else:
        lines += ['The checkpoint records no training settings.']
    lines += ['', '## Results', '']
    best = checkpoint.get('best_val_loss', math.inf)
    if evals:
        lines += [f"From the run's log.jsonl: {len(evals)} evaluations; the last at iteration "
                  f"{evals[-1]['iter']:,}: train loss {evals[-1]['train_loss']:.4f}, val loss {evals[-1]['val_loss']:.4f}; "
                  f'best val loss {min(r["val_loss"] for r in evals):.4f}.', '',
                  '| iteration | train loss | val loss |', '| --- | --- | --- |']
        shown = evals if len(evals) <= 12 else evals[::math.ceil(len(evals) / 12)] + evals[-1:]
        lines += [f"| {r['iter']:,} | {r['train_loss']:.4f} | {r['val_loss']:.4f} |" for r in shown]
    elif best != math.inf:
        lines += [f'Best val loss {float(best):.4f} (no log.jsonl was found beside the checkpoint).']
    else:
        lines += ['No results were recorded with the checkpoint.']
    if eval_results:
        lines += ['', card_section(eval_results)]
    hub_name = f'hf:{push_to_hub}' if push_to_hub else 'hf:OWNER/REPO'
    lines += ['', '## Use', '',
              'With the WiggleGPT repository (its `requirements.txt` installed):', '', '```',
              f'python sample_bio.py --ckpt={hub_name} --start="{"ROMEO:" if tokenizer["type"] == "characters" else "Hello"}"']
    if tokenizer['type'] == 'tiktoken':
        lines += [f'python chat.py --ckpt={hub_name}']
    lines += ['```', '', f'`{EXPORT_WEIGHTS}` holds the weights (`lm_head.weight` is tied to `transformer.wte.weight` '
              f'and stored once); `{EXPORT_CONFIG}` the architecture, the tokenizer and the training settings.', '']
    return '\n'.join(lines)


card = model_card()  # before any file is written: a failure here leaves no half-made folder
# an earlier export's card may have been edited by hand since: it is kept unless asked otherwise
card_path = os.path.join(export_dir, CARD)  # a link there is no card of the folder's: it is replaced
card_name = NEW_CARD if os.path.isfile(card_path) and not os.path.islink(card_path) and not overwrite_card else CARD
try:
    export_model(model, checkpoint, tokenizer, export_dir)
    if stale_results:
        os.remove(results_path)
        print(f'note: {results_path} measured the weights exported before, not these: removed (run eval_bio.py '
              'again)', file=sys.stderr)
    write_file(os.path.join(export_dir, card_name), card)
except ValueError as e:  # already one line, naming the file
    fail(f'{e}; choose another --export_dir')
except OSError as e:
    fail(f'cannot write the export to {export_dir} ({e.strerror or e}); choose another --export_dir')
kept = (f'; {CARD} is kept as it was, the new card is {card_name} (--overwrite_card=True replaces {CARD})'
        if card_name == NEW_CARD else '')
print(f'exported {source} to {export_dir} ({EXPORT_WEIGHTS}, {EXPORT_CONFIG}, {card_name}){kept}')

if push_to_hub:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        fail('--push_to_hub needs the huggingface_hub package: pip install huggingface_hub')
    api = HfApi()
    try:
        api.create_repo(push_to_hub, exist_ok=True)
        commit = api.upload_folder(repo_id=push_to_hub, folder_path=export_dir, ignore_patterns=['.cache/*', NEW_CARD, LOCK_NAME],
                                   commit_message=f'WiggleGPT export of {source}')
    except Exception as e:  # no network, no login, no rights, a bad name: whatever stops the upload, in one line
        fail(f'could not upload to the hub repository {push_to_hub} ({error_line(e)}); log in with `hf auth login` '
             'and check the name')
    print(f'uploaded to https://huggingface.co/{push_to_hub} ({getattr(commit, "oid", "") or "done"}); '
          f'load it with --ckpt=hf:{push_to_hub}')
