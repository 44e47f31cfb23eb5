"""
What the tests share: a scratch copy of the scripts with a tiny dataset (workdir), a finished tiny run to
read (tiny_run), running a script as a user runs it (run_script: a process of its own from that folder,
with its command line, streams and exit status; python(): the interpreter to start one with Popen or
torchrun), the simulated machines (simulated_env), and small checkpoints and hub caches to load.

    python -m pytest tests                  everything, on a CPU (about two minutes on 2 cores)
    python -m pytest tests -m "not slow"    without the tests that take seconds (training runs,
                                            torchrun, the data scripts, a compile), for a quick check
                                            while editing (about half a minute); it still starts every
                                            script once, in a fresh interpreter, as far as its settings
    TESTS_FRESH_PYTHON=1 python -m pytest tests    every script in a fresh interpreter (four times slower)

tests/pytest.ini runs the tests side by side, a process per core (pytest-xdist): each test keeps to its
own folders and ports. Each process computes on one thread (OMP_NUM_THREADS=1 unless set): models this
small run no faster on more, and far slower when processes share the cores with threads that spin.
A script's process is forked from a Python that has imported torch already (tests/preloaded.py says what
stays the same as a fresh interpreter, and when a fresh one is started instead): a run starts in a tenth
of a second, not three. One run of each script, a happy path (fresh=True), and the resumed half of each
straight-and-resumed pair start in a fresh interpreter, where a module the script uses without importing it,
or an order that changes with the hash seed, would show.

What a CPU cannot show is simulated in tests/simulated/, loaded at interpreter start
(sitecustomize.py, which lists every variable) when a test sets one of its variables:
  SIMULATED_GPUS="NVIDIA GeForce RTX 3070" (or two names): torch reports that many CUDA devices,
      their names, capabilities and bf16 support, and validates set_device as torch does; the first
      real CUDA tensor stops the process with the file and line that made it. Every script must get
      that far: device setup, dtype choice, MFU peak, and torchrun's per-process GPUs.
  SIMULATED_HUB=hub.json: datasets.load_dataset behaves as datasets >= 4 does with hub names
      (refusing loading scripts, serving converted Parquet files from local copies).
  SIMULATED_OOM_AFTER=N, SIMULATED_NAN_LOSSES=3,4: a CUDA out-of-memory error or NaN losses at
      chosen points of a run.
  SIMULATED_MISSING=lion_pytorch,bitsandbytes: those packages are not installed.
  SIMULATED_HUB_UPLOADS=folder: export_hub.py --push_to_hub uploads into that folder.

Hub names are tested with a patched hf_hub_download (in-process) and, for the scripts, with the real
huggingface_hub reading a cache laid out as it lays one out, under HF_HUB_OFFLINE=1.
tests/test_web_chat_browser.py drives the web chat with the keyboard in headless Chromium through
Playwright (.ci/run installs both; the test is skipped where either is missing).
test_settings.py and test_script_arguments.py give every script the mistakes a user makes (one
'error: ' line, exit 2, nothing written); test_hostile_files.py gives the loaders cut-short,
garbled and crafted checkpoints, exported folders and meta.pkl files.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

os.environ.setdefault('OMP_NUM_THREADS', '1')  # one thread per process (see above): set before torch loads

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
SIMULATED = os.path.join(REPO, 'tests', 'simulated')
sys.path.insert(0, REPO)
import prepared_data  # noqa: E402
import preloaded  # noqa: E402
os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.join(SHARED, 'tiktoken_cache'))

# a model small enough that a training run takes a second or two on a CPU
TINY = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16',
        '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_iters=2', '--log_interval=1',
        '--warmup_iters=2', '--lr_decay_iters=40', '--learning_rate=1e-2', '--dataset=tiny']


def pytest_unconfigure(config):
    for server in servers:
        server.close()


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes seconds (a script run, torchrun, a compile); '
                                       'pytest -m "not slow" leaves these out for a quick check while editing')


def make_workdir(folder):
    """A copy of the scripts in folder with a small random-token dataset in data/tiny/, so tests never touch the
    repo."""
    for name in os.listdir(REPO):
        if name.endswith('.py'):
            shutil.copy(os.path.join(REPO, name), folder / name)
    shutil.copytree(os.path.join(REPO, 'analysis'), folder / 'analysis', ignore=shutil.ignore_patterns('__pycache__'))
    data = folder / 'data' / 'tiny'
    data.mkdir(parents=True)
    staging = prepared_data.staging_dir(str(data))  # laid out as a prepare script lays out its files
    rng = np.random.default_rng(0)
    rng.integers(0, 50, 4000, dtype=np.uint16).tofile(os.path.join(staging, 'train.bin'))
    rng.integers(0, 50, 1000, dtype=np.uint16).tofile(os.path.join(staging, 'val.bin'))
    with open(os.path.join(staging, 'meta.pkl'), 'wb') as f:
        chars = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX'  # a character-level vocabulary of 50
        pickle.dump({'vocab_size': 50, 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}, f)
    prepared_data.commit(str(data), 'tests/conftest.py')
    return folder


@pytest.fixture
def workdir(tmp_path):
    """make_workdir in the test's own folder."""
    return make_workdir(tmp_path)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    """A finished run of TINY's model (the bio MLP, 4 iterations, evaluated at 0, 2 and 4) on data/tiny, trained
    once per test process for the tests that read one: its folder, holding ckpt.pt, ckpt_best.pt and log.jsonl.
    Copy it into the test's workdir (shutil.copytree(tiny_run, workdir / 'out')) before anything writes there."""
    folder = make_workdir(tmp_path_factory.mktemp('tiny_run'))
    run_script(folder, 'train_bio.py', *TINY, '--max_iters=4', '--eval_interval=2', '--out_dir=out')
    return folder / 'out'


def simulated_env(**variables):
    """The environment for a script run on simulated hardware or services (tests/simulated/sitecustomize.py):
    e.g. simulated_env(SIMULATED_GPUS='NVIDIA GeForce RTX 3070')."""
    return {**os.environ, 'PYTHONPATH': os.pathsep.join([SIMULATED, os.environ.get('PYTHONPATH', '')]),
            **{k: str(v) for k, v in variables.items()}}


servers = []  # this test process's preloaded.Server, started at its first use
starting = threading.Lock()
FRESH_ONLY = os.environ.get('TESTS_FRESH_PYTHON') == '1' or not hasattr(os, 'fork')


def preloaded_server():
    with starting:
        if not servers:
            servers.append(preloaded.Server())
    return servers[0]


def python():
    """The Python that tests start scripts with (torchrun, Popen): a shim that forks them from a Python that has
    imported torch (tests/preloaded.py), or sys.executable itself where TESTS_FRESH_PYTHON=1 or there is no fork."""
    if FRESH_ONLY:
        return sys.executable
    server = preloaded_server()
    server.wait_ready()  # before then the shim would find no server, and start a fresh interpreter
    return server.python


def run_script(workdir, *args, timeout=300, check=True, input='', env=None, fresh=False):
    """Run a script as a user would, from workdir, with input piped to stdin; returns the CompletedProcess.
    The process is forked from a Python that has imported torch (tests/preloaded.py), unless fresh, or env
    sets what only a fresh interpreter reads, or TESTS_FRESH_PYTHON=1 makes every run fresh."""
    env = dict(os.environ if env is None else env)
    proc = None if fresh or FRESH_ONLY else preloaded_server().run(args, workdir, env, input, timeout)
    if proc is None:
        proc = subprocess.run([sys.executable, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                              input=input, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}')
    return proc


def trained_straight_and_in_halves(workdir, script, *args, iters):
    """Train for iters iterations at once (out_dir straight) and in two halves with a resume between (out_dir
    split), the unbroken run beside the first half; returns the unbroken run's CompletedProcess."""
    with ThreadPoolExecutor(2) as pool:
        straight, _ = pool.map(lambda run: run_script(workdir, script, *args, *run),
                               [(f'--max_iters={iters}', '--out_dir=straight'),
                                (f'--max_iters={iters // 2}', '--out_dir=split')])
    # the resumed half in a new interpreter (tests/preloaded.py): its own hash seed, and the script's imports alone
    run_script(workdir, script, *args, f'--max_iters={iters}', '--out_dir=split', '--init_from=resume', fresh=True)
    return straight


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


def write_bpe_checkpoint(out_dir, block_size):
    """A small untrained model over GPT-2's vocabulary: enough to drive chat.py."""
    from checkpoints import save_checkpoint
    from model_bio import GPT, GPTConfig
    model_args = dict(n_layer=1, n_head=2, n_embd=32, block_size=block_size, vocab_size=50304, bias=False,
                      use_bio_mlp=True, use_rmsnorm=True, use_rope=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args))
    out_dir.mkdir()
    save_checkpoint({'model': model.state_dict(), 'model_args': model_args, 'iter_num': 0, 'best_val_loss': 9.0,
                     'config': {'dataset': 'openwebtext'}, 'format_version': 1}, str(out_dir / 'ckpt.pt'))


def write_original_checkpoint(path, vocab_size=64, n_layer=2, n_embd=32):
    """A checkpoint laid out as the original release wrote it (names from the notes, compile prefix, no
    format_version); returns its weights (without the prefix) and model_args."""
    torch.manual_seed(0)
    shapes = {'transformer.wte.weight': (vocab_size, n_embd), 'transformer.ln_f.weight': (n_embd,)}
    for i in range(n_layer):
        h = f'transformer.h.{i}.'
        shapes.update({h + 'ln_1.weight': (n_embd,), h + 'ln_2.weight': (n_embd,),
                       h + 'attn.c_attn.weight': (3 * n_embd, n_embd), h + 'attn.c_proj.weight': (n_embd, n_embd),
                       h + 'mlp.c_fc.weight': (4 * n_embd, n_embd), h + 'mlp.c_proj.weight': (n_embd, 4 * n_embd),
                       h + 'mlp.activation.omega': (4 * n_embd,), h + 'mlp.activation.phi': (4 * n_embd,),
                       h + 'mlp.activation.baseline': (4 * n_embd,)})
    weights = {k: torch.randn(shape) * 0.5 for k, shape in shapes.items()}
    weights['lm_head.weight'] = weights['transformer.wte.weight']
    model_args = dict(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=16, bias=False, vocab_size=vocab_size,
                      dropout=0.0, use_bio_mlp=True, use_rmsnorm=True, use_rope=True, gradient_checkpointing=False)
    original = {'model': {'_orig_mod.' + k: v for k, v in weights.items()}, 'model_args': model_args,
                'optimizer': {}, 'iter_num': 600000, 'best_val_loss': torch.tensor(3.1621),
                'config': {'dataset': 'openwebtext'}}
    torch.save(original, path)
    return weights, model_args


def hub_cache(cache_dir, repo_id, files, revision='main'):
    """Lay files ({path in the repository: local file}) out as huggingface_hub's cache holds a download of
    repo_id at revision (a branch or tag name), so the real library finds them with HF_HUB_OFFLINE=1."""
    import hashlib
    commit = hashlib.sha1(f'{repo_id}@{revision}'.encode()).hexdigest()
    repo = os.path.join(cache_dir, 'models--' + repo_id.replace('/', '--'))
    for name, source in files.items():
        target = os.path.join(repo, 'snapshots', commit, *name.split('/'))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(source, target)
    os.makedirs(os.path.join(repo, 'refs'), exist_ok=True)
    with open(os.path.join(repo, 'refs', revision), 'w') as f:
        f.write(commit)
    return commit


def write_gpt2_hub(cache_dir, name='gpt2', seed=0, **config):
    """A small random GPT-2 made by transformers, laid out in cache_dir as the hub holds OpenAI's
    (openai-community/<name>: config.json and a model.safetensors without the `transformer.` prefix,
    Conv1D weights stored (in, out), no lm_head, and each block's attn.bias / attn.masked_bias buffers),
    so that --ckpt=<name> loads it with HF_HUB_CACHE=cache_dir and HF_HUB_OFFLINE=1. Returns the
    transformers GPT2LMHeadModel, in eval mode and float32."""
    transformers = pytest.importorskip('transformers')
    from safetensors.torch import save_file
    settings = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, initializer_range=0.2)
    settings.update(config)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).eval()
    with torch.no_grad():  # LayerNorms and biases start at 1 and 0: moved, so that every weight's place is tested
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights = {k.removeprefix('transformer.'): v.contiguous() for k, v in model.state_dict().items()
               if k != 'lm_head.weight'}
    length = settings['n_positions']
    for i in range(settings['n_layer']):
        weights[f'h.{i}.attn.bias'] = torch.tril(torch.ones(length, length)).view(1, 1, length, length)
        weights[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    staging = os.path.join(cache_dir, 'staging-' + name)
    os.makedirs(staging)
    save_file(weights, os.path.join(staging, 'model.safetensors'), metadata={'format': 'pt'})
    model.config.to_json_file(os.path.join(staging, 'config.json'))
    hub_cache(cache_dir, f'openai-community/{name}', {f: os.path.join(staging, f) for f in ('config.json', 'model.safetensors')})
    shutil.rmtree(staging)
    return model


@contextmanager
def serving(server):
    """A web_chat.ChatServer serving in a thread while the block runs, then stopped."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(30)
