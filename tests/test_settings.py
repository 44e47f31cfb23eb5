"""
Every setting a user can get wrong, typed as a user types it: one `error:` line naming the setting, its
value and what is allowed, exit status 2, no traceback, and nothing written.

    python -m pytest tests/test_settings.py
"""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import REPO, TINY, load, message_lines, python, read_log, run_script, write_original_checkpoint
import prepared_data

TRAIN = [*TINY, '--use_bio_mlp=False', '--max_iters=2', '--eval_interval=2', '--out_dir=out']

# (script, arguments after the script's defaults, the one line it must print)
CASES = [
    ('train_bio.py', ['--max_iter=5'], "error: unknown config key 'max_iter' (did you mean 'max_iters'?)"),
    ('train_bio.py', ['--max_iters=abc'], "error: --max_iters expects int, got 'abc' (str)"),
    ('train_bio.py', ['nope_config.py'], "error: config file 'nope_config.py' not found"),
    ('train_bio.py', ['--dataset=missing'],
     'error: {workdir}/data/missing/train.bin not found; prepare the data first: python data/missing/prepare.py'),
    ('train_bio.py', ['--init_from=resume', '--out_dir=empty'],
     'error: init_from=resume but empty/ckpt.pt does not exist (train from scratch first, or fix out_dir)'),
    ('train_bio.py', ['--use_sparse_gate=True'], 'error: use_sparse_gate=True gates the bio MLP: it needs mlp=bio (this is mlp=gelu)'),
    ('train_bio.py', ['--use_bio_mlp=True', '--gelu_tanh=True'],
     'error: gelu_tanh=True is a setting of the GELU MLP (mlp=gelu; this is mlp=bio)'),
    ('train_bio.py', ['--stochastic_release=True'],
     'error: stochastic_release=True draws the presynaptic release: it needs use_presynaptic=True'),
    ('train_bio.py', ['--use_presynaptic=True', '--tau_rrp=0'], 'error: tau_rrp=0.0 is not a number of positions above 0'),
    ('train_bio.py', ['--use_fast_weights=True', '--fast_weight_decay=1'],
     'error: fast_weight_decay=1.0 is not from 0 up to (not including) 1'),
    ('train_bio.py', ['--use_fast_weights=True', '--fast_weight_rank=0'],
     'error: fast_weight_rank=0 is not a whole number from 1 to 1,024'),
    ('train_bio.py', ['--use_presynaptic=True', '--synapse_chunk=0'],
     'error: synapse_chunk=0 is not a whole number from 1 to 65,536'),
    ('train_bio.py', ['--bio_variant=v4'], "error: bio_variant='v4' is not one of 'v3', 'v2', 'v1'"),
    ('train_bio.py', ['--mlp=swish'], "error: mlp='swish' is not one of '', 'bio', 'gelu', 'swiglu', 'relu2', 'bio_glu'"),
    ('train_bio.py', ['--mlp=swiglu', '--use_sparse_gate=True'],
     'error: use_sparse_gate=True gates the bio MLP: it needs mlp=bio (this is mlp=swiglu)'),
    ('train_bio.py', ['--mlp=bio_glu', '--gelu_params_like=v3'],
     'error: gelu_params_like=v3 widens mlp gelu, relu2, swiglu: it has no meaning with mlp=bio_glu'),
    ('train_bio.py', ['--mlp=relu2', '--gelu_tanh=True'],
     'error: gelu_tanh=True is a setting of the GELU MLP (mlp=gelu; this is mlp=relu2)'),
    ('train_bio.py', ['--use_bio_mlp=True', '--gelu_params_like=v1'],
     'error: gelu_params_like=v1 widens mlp gelu, relu2, swiglu: it has no meaning with mlp=bio'),
    ('train_bio.py', ['--use_bio_mlp=False', '--bio_variant=v2'], 'error: bio_variant=v2 is a bio MLP: it needs mlp=bio (this is mlp=gelu)'),
    ('train_bio.py', ['--use_bio_mlp=True', '--bio_variant=v1', '--use_sparse_gate=True'],
     "error: use_sparse_gate=True is v3's gate; bio_variant=v1 has its event layer instead"),
    ('train_bio.py', ['--use_bio_mlp=True', '--bio_variant=v1', '--bio_compartments=0'],
     'error: bio_compartments=0 is not a whole number from 1 to 1,024'),
    ('train_bio.py', ['--use_bio_mlp=True', '--bio_variant=v1', '--bio_compartments=12'],
     'error: bio_compartments=12 leaves a compartment without input: n_embd=32 is cut in slices of 3; take fewer'),
    ('train_bio.py', ['--gelu_params_like=v1', '--bio_compartments=64'],
     'error: bio_compartments=64 leaves a compartment without input: n_embd=32 is cut in slices of 1; take fewer'),
    ('train_bio.py', ['--optimizer=sgd'], "error: optimizer='sgd' is not one of adamw, muon, adafactor, lion, adamw8bit"),
    ('train_bio.py', ['--lr_schedule=wsd', '--decay_frac=1.5'],
     'error: decay_frac = 1.5 is not allowed: it must be in (0, 1]'),
    ('train_bio.py', ['--optimizer=muon', '--muon_momentum=1.5'],
     'error: muon_momentum = 1.5 is not allowed: it must be in [0, 1)'),
    ('train_bio.py', ['--gradient_accumulation_steps=0'],
     'error: gradient_accumulation_steps = 0 is not allowed: it must be >= 1'),
    ('train_bio.py', ['--batch_size=0'], 'error: batch_size = 0 is not allowed: it must be >= 1'),
    ('train_bio.py', ['--batch_size=-1'], 'error: batch_size = -1 is not allowed: it must be >= 1'),
    ('train_bio.py', ['--eval_interval=0'], 'error: eval_interval = 0 is not allowed: it must be >= 1'),
    ('train_bio.py', ['--log_interval=0'], 'error: log_interval = 0 is not allowed: it must be >= 1'),
    ('train_bio.py', ['--dropout=1.5'], 'error: dropout=1.5 is not from 0 up to (not including) 1'),
    ('train_bio.py', ['--block_size=0'], 'error: block_size=0 is not a whole number from 1 to 65,536'),
    ('train_bio.py', ['--eval_iters=0'], 'error: eval_iters = 0 is not allowed: it must be >= 1'),
    ('train_bio.py', ['--learning_rate=1e999'], 'error: learning_rate = inf is not allowed: it must be a finite number'),
    ('train_bio.py', ['--seed=99999999999999999999'],
     'error: seed = 99999999999999999999 is not allowed: it must fit in 64 bits'),
    ('train_bio.py', ['--backend=ncl'], "error: backend = 'ncl' is not allowed: it must be one of nccl, gloo, mpi"),
    ('train_bio.py', ['--task=train'], "error: task = 'train' is not allowed: it must be one of pretrain, finetune"),
    ('train_bio.py', ['cfg_zero_batch.py'], 'error: batch_size = 0 is not allowed: it must be >= 1'),
    ('train_bio.py', ['--n_head=3', '--n_embd=128'],
     'error: n_embd=128 is not a multiple of n_head=3'),
    ('train_bio.py', ['--n_head=10', '--n_embd=30'],
     'error: RoPE needs an even head size (n_embd / n_head is 3)'),
    ('train_bio.py', ['--n_layer=5000'],
     'error: n_layer=5000 is not a whole number from 1 to 1,024'),
    ('train_bio.py', ['--rehearsal_iters=1'],
     'error: rehearsal_iters=1 leaves nothing to time after the first iteration, which compiles and allocates; '
     'rehearse at least 2 (20 gives a steadier figure)'),
    ('train_bio.py', ['--dataset=../data/tiny'],
     "error: dataset='../data/tiny' must be the name of a folder in data/, such as shakespeare_char"),
    ('train_bio.py', ['--out_dir=a_file/run'], 'error: out_dir=a_file/run cannot be a folder: {workdir}/a_file is a file; '
     'name another folder'),
    ('train_bio.py', ['--out_dir='], 'error: out_dir is empty; name a folder'),
    ('train_bio.py', ['--freeze_layers=3'], 'error: freeze_layers=3 but the model has 2 layers'),
    ('finetune_native.py', ['--eval_conversations=-1'], 'error: eval_conversations = -1 is not allowed: it must be >= 0'),
    ('sample_bio.py', ['--top_k=-5'], 'error: top_k = -5 is not allowed: it must be >= 0'),
    ('sample_bio.py', ['--top_p=0'], 'error: top_p = 0.0 is not allowed: it must be in (0, 1]'),
    ('sample_bio.py', ['--repetition_penalty=0'],
     'error: repetition_penalty = 0.0 is not allowed: it must be in [0.01, 100]'),
    ('sample_bio.py', ['--start=FILE:latin1.txt'],
     "error: prompt file latin1.txt is not UTF-8 text (byte 3 is b'\\xe9'); save it as UTF-8"),
    ('sample_bio.py', ['--start=FILE:prompts'], 'error: prompt file prompts is not a regular file; name a text file'),
    ('sample_bio.py', ['--start=FILE:/dev/zero'],  # it exists, so it is not 'not found' (nor read forever)
     'error: prompt file /dev/zero is not a regular file; name a text file'),
    ('sample_bio.py', ['--temperature=-1'], 'error: temperature = -1.0 is not allowed: it must be >= 0'),
    ('sample_bio.py', ['--num_samples=0'], 'error: num_samples = 0 is not allowed: it must be >= 1'),
    ('chat.py', ['--web=True', '--temperature=-1'], 'error: temperature = -1.0 is not allowed: it must be >= 0'),
    ('chat.py', ['--web=True', '--temperature=150'], 'error: temperature=150.0 is more than the web chat allows (100)'),
    ('chat.py', ['--top_p=1.5'], 'error: top_p = 1.5 is not allowed: it must be in (0, 1]'),
    ('chat.py', ['--penalty_window=0'], 'error: penalty_window = 0 is not allowed: it must be >= 1'),
    ('chat.py', ['--web=True', '--port=70000'], 'error: port = 70000 is not allowed: it must be in [0, 65535]'),
]


def snapshot(folder):
    """Every file and folder under folder with its size and time: a run that refuses its settings makes,
    changes and removes none of them."""
    paths = [os.path.join(root, name) for root, dirs, names in os.walk(folder) if '__pycache__' not in root
             for name in dirs + names if name != '__pycache__']
    return {path: (os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in paths}


def test_every_bad_setting_is_one_line_and_writes_nothing(workdir):
    (workdir / 'a_file').write_text('not a folder')
    (workdir / 'cfg_zero_batch.py').write_text('batch_size = 0\n')
    (workdir / 'latin1.txt').write_bytes('café'.encode('latin-1'))
    (workdir / 'prompts').mkdir()
    before = snapshot(workdir)

    def run(case):
        script, args, _ = case
        common = TRAIN if script in ('train_bio.py', 'finetune_native.py') else ['--device=cpu', '--out_dir=out']
        return run_script(workdir, script, *common, *args, check=False, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, CASES))
    wrong = [f'{script} {" ".join(args)}: exit {proc.returncode}, {message_lines(proc.stderr)}'
             for (script, args, line), proc in zip(CASES, results)
             if proc.returncode != 2 or message_lines(proc.stderr) != [line.replace('{workdir}', str(workdir))]
             or 'Traceback' in proc.stderr]
    assert not wrong, '\n'.join(wrong)
    assert snapshot(workdir) == before


def test_a_bad_setting_is_reported_before_torch_is_imported(workdir):
    # a torch that cannot be imported, first on the path: the scripts must answer from their settings alone
    (workdir / 'no_torch' / 'torch').mkdir(parents=True)
    (workdir / 'no_torch' / 'torch' / '__init__.py').write_text("raise ImportError('torch was imported')\n")
    env = {**os.environ, 'PYTHONPATH': str(workdir / 'no_torch')}
    for script in ('train_bio.py', 'sample_bio.py', 'chat.py'):
        proc = run_script(workdir, script, '--temperature=-1' if script != 'train_bio.py' else '--batch_size=0',
                          check=False, env=env)
        assert proc.returncode == 2 and len(message_lines(proc.stderr)) == 1, proc.stderr
        assert message_lines(proc.stderr)[0].startswith('error: ') and 'is not allowed' in proc.stderr, proc.stderr


def token_dataset(workdir, name, train_ids, val_ids, meta_from=None):
    """data/<name> holding these token ids (and meta_from's meta.pkl, if given), laid out as a prepare script does."""
    folder = workdir / 'data' / name
    folder.mkdir()
    staging = prepared_data.staging_dir(str(folder))
    for split, ids in (('train', train_ids), ('val', val_ids)):
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(staging, f'{split}.bin'))
    if meta_from:
        shutil.copy(workdir / 'data' / meta_from / 'meta.pkl', os.path.join(staging, 'meta.pkl'))
    prepared_data.commit(str(folder), 'tests/test_settings.py')


@pytest.mark.slow
def test_runs_and_checkpoints_are_never_overwritten_or_misread(workdir):
    run_script(workdir, 'train_bio.py', *TRAIN)

    def refused(*args):
        proc = run_script(workdir, 'train_bio.py', *TRAIN, *args, check=False)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
        lines = message_lines(proc.stderr)  # notes may come first (an original release's checkpoint has some)
        assert [line for line in lines if line.startswith('error: ')] == lines[-1:], proc.stderr
        return lines[-1]

    # a folder holding only a best checkpoint (ckpt.pt deleted, or copied elsewhere) is a run all the same
    (workdir / 'best').mkdir()
    shutil.copy(workdir / 'out' / 'ckpt_best.pt', workdir / 'best' / 'ckpt_best.pt')
    held = (workdir / 'best' / 'ckpt_best.pt').read_bytes()
    expected = ("error: best already holds a run's files (best/ckpt_best.pt); start the new run with another "
                '--out_dir')
    assert refused('--out_dir=best') == expected
    assert refused('--out_dir=best', '--init_from=best/ckpt_best.pt') == expected
    assert os.listdir(workdir / 'best') == ['ckpt_best.pt'] and (workdir / 'best' / 'ckpt_best.pt').read_bytes() == held

    # a character-level checkpoint on GPT-2 BPE data (no meta.pkl), or on data holding ids past its own
    # vocabulary: refused before the run's folder is made
    rng = np.random.default_rng(0)
    token_dataset(workdir, 'bpe', rng.integers(0, 50257, 2000), rng.integers(0, 50257, 500))
    token_dataset(workdir, 'garbled', [*rng.integers(0, 50, 1999), 60], rng.integers(0, 50, 500), meta_from='tiny')
    assert refused('--dataset=garbled', '--out_dir=new') == (
        'error: data/garbled/train.bin holds token id 60, outside its 50-token vocabulary; prepare the data '
        'again: python data/garbled/prepare.py')
    assert refused('--init_from=out/ckpt.pt', '--dataset=bpe', '--out_dir=new') == (
        'error: data/bpe was prepared with another vocabulary than out/ckpt.pt was trained on (the data has gpt2 BPE, '
        'the checkpoint 50 characters); train it on the data it was made for, or prepare data/bpe as it was')
    assert not (workdir / 'new').exists()

    # the original release's checkpoints hold an empty optimizer state: not resumable, in one line
    (workdir / 'original').mkdir()
    write_original_checkpoint(str(workdir / 'original' / 'ckpt.pt'), vocab_size=50)
    assert refused('--out_dir=original', '--init_from=resume') == (
        'error: original/ckpt.pt has no optimizer state, so it cannot be resumed (start a new run from its weights '
        'with --init_from=original/ckpt.pt --out_dir=...)')

    # architecture settings asked of a run started from a checkpoint's weights: the checkpoint's are kept, and said
    # (asked on the command line, even where that is the setting's default)
    proc = run_script(workdir, 'train_bio.py', *TRAIN, '--init_from=out/ckpt.pt', '--out_dir=from', '--n_layer=12')
    assert "note: the checkpoint's architecture is kept: n_layer 2 (asked 12)\n" in proc.stderr
    assert load(workdir / 'from' / 'ckpt.pt')['model_args']['n_layer'] == 2


@pytest.mark.slow
def test_a_short_rehearsal_never_times_the_first_iteration(workdir):
    proc = run_script(workdir, 'train_bio.py', *TRAIN, '--rehearsal_iters=3')
    assert 'rehearsal: 2 iterations timed (after 1 to warm up)' in proc.stdout
    assert not (workdir / 'out').exists()


def test_help_prints_the_docstring_and_every_setting_with_what_it_allows(workdir):
    proc = run_script(workdir, 'sample_bio.py', '--help')
    assert proc.stdout.startswith('Sample text from a trained WiggleGPT checkpoint:')
    assert '  top_p = 1.0  (in (0, 1])\n' in proc.stdout and "  ckpt = 'ckpt.pt'\n" in proc.stdout


@pytest.mark.slow
def test_two_runs_started_into_one_new_folder_at_once_never_share_it(workdir):
    # both pass the start's check while the folder is empty; the first to make it claims it
    procs = [subprocess.Popen([python(), 'train_bio.py', *TRAIN, '--max_iters=6'], cwd=workdir, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refusal = next(message_lines(err) for code, err in results if code == 2)
    # refused by the lock (the other still starting) or by the other's log (the other already gone)
    assert len(refusal) == 1 and refusal[0].startswith('error: out ') and (
        'another --out_dir' in refusal[0] or 'is being written by another process' in refusal[0]), refusal
    iters = [record['iter'] for record in read_log(workdir / 'out') if 'val_loss' in record]
    assert iters == [0, 2, 4, 6]  # one run's evaluations, not two interleaved


@pytest.mark.parametrize('name', sorted(n for n in os.listdir(REPO) if n.startswith('config_') and n.endswith('.py')))
def test_every_config_holds_settings_train_bio_takes(name, capsys):
    from dataclasses import asdict

    from checkpoints import config_problem
    from configurator import configure, declared_rules, script_defaults
    from model_bio import GPTConfig
    train = os.path.join(REPO, 'train_bio.py')
    config = configure(script_defaults(train), [os.path.join(REPO, name)], declared_rules(train))
    model = {k: config[k] for k in asdict(GPTConfig()) if k in config}
    # a run from a checkpoint takes its architecture from there: its own settings are held to their ranges alone
    assert config_problem({**asdict(GPTConfig()), **model}, relations=config['init_from'] == 'scratch') is None
    assert os.path.isfile(os.path.join(REPO, 'data', config['dataset'], 'prepare.py')), config['dataset']
