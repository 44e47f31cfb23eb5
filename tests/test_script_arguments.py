"""
The argparse scripts (analysis/*.py, data/*/prepare.py) given a bad argument, as a user types it: each
ends with one 'error: ' line that names the argument, the value and what is allowed, exit status 2,
and writes nothing.

    python -m pytest tests/test_script_arguments.py
"""
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch

from checkpoints import save_checkpoint
from conftest import REPO, run_script
from model_bio import GPT, GPTConfig

XOR = 'analysis/xor_neuron.py'
PLOT = 'analysis/plot_loss.py'
WIGGLE = 'analysis/analyze_wiggle.py'
BRAIN = 'analysis/analyze_brainwaves.py'
COMPARE = 'analysis/compare_runs.py'
OWT = 'data/openwebtext/prepare.py'
SMOL = 'data/smoltalk/prepare.py'
SYNTH = 'data/synthetic_chat/prepare.py'
# every script that could write is given an --out_dir (a --runs_dir) inside the case's folder, so a check gone
# missing shows up as files written there (the shakespeare and synthetic_chat scripts write only beside themselves)
DOCS = ['--dataset', 'docs.jsonl', '--out_dir', 'out']
CHATS = ['--dataset', 'chats.jsonl', '--out_dir', 'out']
ARMS = ['--config', 'config.py', '--runs_dir', 'runs']
NOTES_IS_A_FILE = 'error: --out_dir=notes.txt cannot be a folder: {folder}/notes.txt is a file; name another folder'
CASES = [  # (script, arguments, the one line it must print)
    (XOR, ['--lr', 'nan'], 'error: argument --lr: nan is not allowed: it must be > 0'),
    (XOR, ['--json', '.'], 'error: --json . is a directory; name a file to write'),
    (XOR, ['--out_dir', 'notes.txt'], NOTES_IS_A_FILE),
    (XOR, ['--out_dir', 'notes.txt/sub'],
     'error: --out_dir=notes.txt/sub cannot be a folder: {folder}/notes.txt is a file; name another folder'),
    (PLOT, [], 'error: the following arguments are required: LOG'),
    (PLOT, ['missing/log.jsonl'],
     'error: missing/log.jsonl: no such file; pass a log.jsonl written by train_bio.py, or the run directory holding it'),
    (PLOT, ['run', '--labels', 'a', 'b'], 'error: 1 LOG arguments but 2 --labels; give one label per LOG, or none'),
    (PLOT, ['run', '--out_dir', 'notes.txt'], NOTES_IS_A_FILE),
    (PLOT, ['run', '--smooth', '5'], 'error: unrecognized arguments: --smooth 5'),
    (WIGGLE, ['bio/ckpt.pt', '--out_dir', 'notes.txt'], NOTES_IS_A_FILE),
    (WIGGLE, ['bio/ckpt.pt', '--compare', 'small/ckpt.pt', '--out_dir', 'out'],
     'error: small/ckpt.pt has a different shape from bio/ckpt.pt; compare checkpoints of one model'),
    (BRAIN, ['bio/ckpt.pt', '--out_dir', 'notes.txt'], NOTES_IS_A_FILE),
    (COMPARE, [*ARMS, '--arms', 'bio', 'gelu'],
     "error: arm 'bio': write it NAME:key=value,... (NAME: alone for the config as it is)"),
    (COMPARE, [*ARMS, '--arms', 'big:n_layer=2', 'base:'],
     'error: arms big and base train with the same settings; give each arm a setting of its own'),
    (COMPARE, [*ARMS, '--out_dir', 'notes.txt'], NOTES_IS_A_FILE),
    (OWT, [*DOCS, '--val_fraction', '1'], 'error: argument --val_fraction: 1 is not allowed: it must be in [0, 1)'),
    (OWT, [*DOCS, '--max_docs', '-1'], 'error: argument --max_docs: -1 is not allowed: it must be >= 0'),
    (OWT, [*DOCS, '--seed', '-1'], 'error: argument --seed: -1 is not allowed: it must be >= 0'),
    (OWT, ['--dataset', 'docs.jsonl', '--out_dir', 'notes.txt'], NOTES_IS_A_FILE),
    (SMOL, [*CHATS, '--max_tokens', '31'], 'error: argument --max_tokens: 31 is not allowed: it must be >= 32'),
    (SMOL, [*CHATS, '--max_docs', '1k'], "error: argument --max_docs: '1k' is not an int"),
    (SMOL, [*CHATS, '--val_fraction', '-0.1'], 'error: argument --val_fraction: -0.1 is not allowed: it must be in [0, 1)'),
    (SMOL, [*CHATS, '--seed', '-1'], 'error: argument --seed: -1 is not allowed: it must be >= 0'),
    (SMOL, ['--dataset', 'chats.jsonl', '--out_dir', 'notes.txt'], NOTES_IS_A_FILE),
    (SYNTH, ['--conversations', '0'], 'error: argument --conversations: 0 is not allowed: it must be >= 1'),
    (SYNTH, ['--seed', '-1'], 'error: argument --seed: -1 is not allowed: it must be >= 0'),
    ('data/shakespeare_char/prepare.py', ['--out_dir', 'out'], 'error: unrecognized arguments: --out_dir out'),
    ('data/shakespeare/prepare.py', ['--out_dir', 'out'], 'error: unrecognized arguments: --out_dir out'),
]


def write_fixtures(folder):
    """What the cases name: a file where a folder is asked for, a run's log, two datasets, a config and
    checkpoints of a 2-layer and a 1-layer model."""
    folder.mkdir()
    (folder / 'notes.txt').write_text('not a folder\n')
    (folder / 'run').mkdir()
    (folder / 'run' / 'log.jsonl').write_text(json.dumps({'iter': 0, 'loss': 4.0, 'tokens': 64}) + '\n')
    (folder / 'docs.jsonl').write_text(json.dumps({'text': 'one document'}) + '\n')
    (folder / 'chats.jsonl').write_text(json.dumps({'messages': [{'role': 'user', 'content': 'Hi?'},
                                                                 {'role': 'assistant', 'content': 'Hi.'}]}) + '\n')
    (folder / 'config.py').write_text('n_layer = 2\n')
    for name, n_layer in (('bio', 2), ('small', 1)):
        args = dict(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, vocab_size=50, use_bio_mlp=True)
        torch.manual_seed(0)
        (folder / name).mkdir()
        save_checkpoint({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'iter_num': 0,
                         'best_val_loss': 1.0, 'config': {}, 'format_version': 1}, str(folder / name / 'ckpt.pt'))


def snapshot(folder):
    """Every file and folder under folder, with each file's size and modification time."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = None if name in dirs else (os.path.getsize(path),
                                                                               os.stat(path).st_mtime_ns)
    return found


def run_case(folder, script, args):
    """The script's CompletedProcess, run from folder, and the paths in folder it added, changed or removed."""
    before = snapshot(folder)
    proc = run_script(folder, os.path.join(REPO, script), *args, check=False, timeout=120,
                      env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    return proc, sorted({path for path, _ in set(snapshot(folder).items()) ^ set(before.items())})


def test_every_bad_argument_is_one_error_line_and_writes_nothing(tmp_path):
    write_fixtures(tmp_path / 'fixtures')
    folders = [tmp_path / f'case{i}' for i in range(len(CASES))]  # one each, so what a case writes is its own
    for folder in folders:
        shutil.copytree(tmp_path / 'fixtures', folder)
    # most scripts spend a second or two importing torch before they parse a thing: run them side by side
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run_case, folders, [case[0] for case in CASES], [case[1] for case in CASES]))
    failures = [f"{script} {' '.join(args)}: exit {proc.returncode}, wrote {written}, stderr:\n{proc.stderr}"
                for (script, args, expected), folder, (proc, written) in zip(CASES, folders, results)
                if proc.returncode != 2 or proc.stderr.splitlines() != [expected.replace('{folder}', str(folder))]
                or 'Traceback' in proc.stderr or written]
    assert not failures, '\n\n'.join(failures)
