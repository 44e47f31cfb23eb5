import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
SIMULATED = os.path.join(REPO, 'tests', 'simulated')
sys.path.insert(0, REPO)
import prepared_data  # noqa: E402
os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.join(SHARED, 'tiktoken_cache'))

# a model small enough that a training run takes a second or two on a CPU
TINY = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16',
        '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_iters=2', '--log_interval=1',
        '--warmup_iters=2', '--lr_decay_iters=40', '--learning_rate=1e-2', '--dataset=tiny']


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes seconds (a script run, torchrun, a compile); '
                                       'pytest -m "not slow" leaves these out for a quick check while editing')


@pytest.fixture
def workdir(tmp_path):
    """A copy of the scripts with a small random-token dataset in data/tiny/, so tests never touch the repo."""
    for name in os.listdir(REPO):
        if name.endswith('.py'):
            shutil.copy(os.path.join(REPO, name), tmp_path / name)
    shutil.copytree(os.path.join(REPO, 'analysis'), tmp_path / 'analysis', ignore=shutil.ignore_patterns('__pycache__'))
    data = tmp_path / 'data' / 'tiny'
    data.mkdir(parents=True)
    staging = prepared_data.staging_dir(str(data))  # laid out as a prepare script lays out its files
    rng = np.random.default_rng(0)
    rng.integers(0, 50, 4000, dtype=np.uint16).tofile(os.path.join(staging, 'train.bin'))
    rng.integers(0, 50, 1000, dtype=np.uint16).tofile(os.path.join(staging, 'val.bin'))
    with open(os.path.join(staging, 'meta.pkl'), 'wb') as f:
        chars = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX'  # a character-level vocabulary of 50
        pickle.dump({'vocab_size': 50, 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}, f)
    prepared_data.commit(str(data), 'tests/conftest.py')
    return tmp_path


def simulated_env(**variables):
    """The environment for a script run on simulated hardware or services (tests/simulated/sitecustomize.py):
    e.g. simulated_env(SIMULATED_GPUS='NVIDIA GeForce RTX 3070')."""
    return {**os.environ, 'PYTHONPATH': os.pathsep.join([SIMULATED, os.environ.get('PYTHONPATH', '')]),
            **{k: str(v) for k, v in variables.items()}}


def run_script(workdir, *args, timeout=300, check=True, input='', env=None):
    """Run a script as a user would, from workdir, with input piped to stdin; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          input=input, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}')
    return proc


def load(path):
    """A checkpoint as the scripts read it."""
    return torch.load(path, map_location='cpu', weights_only=True)


def read_log(out_dir):
    """The records of a run's log.jsonl."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def message_lines(stderr):
    """stderr without the configurator's `config: ...` echo lines: what a user mistake should leave is one line."""
    return [line for line in stderr.strip().splitlines() if not line.startswith('config: ')]
