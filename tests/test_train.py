"""train_bio.py run as users run it: a subprocess with a real command line, on a tiny model and dataset."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from conftest import REPO, TINY, message_lines, run_script

GATED = TINY + ['--use_bio_mlp=True', '--use_sparse_gate=True', '--dropout=0.1']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_training_writes_log_checkpoints_and_the_original_formats(workdir):
    proc = run_script(workdir, 'train_bio.py', *GATED, '--max_iters=6', '--eval_interval=3', '--out_dir=out')
    assert 'step 0: train loss ' in proc.stdout and 'step 6: train loss ' in proc.stdout
    assert 'iter 6: loss ' in proc.stdout and 'mfu n/a' in proc.stdout and 'sparsity ' in proc.stdout
    ckpt = load(workdir / 'out' / 'ckpt.pt')
    for key in ('model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config', 'format_version',
                'scaler', 'rng'):
        assert key in ckpt, key
    assert ckpt['iter_num'] == 6
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    assert os.path.isfile(workdir / 'out' / 'ckpt_best.pt')
    log = read_log(workdir / 'out')
    steps = [r for r in log if 'loss' in r]
    evals = [r for r in log if 'val_loss' in r]
    assert [r['iter'] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r['iter'] for r in evals] == [0, 3, 6]
    assert set(steps[0]) == {'iter', 'loss', 'lr', 'time_ms', 'mfu', 'sparsity', 'tokens'}
    assert 0 < steps[0]['sparsity'] < 1
    assert steps[-1]['tokens'] == 6 * 4 * 2 * 16  # iterations x batch x accumulation x block
    assert evals[-1]['val_loss'] == ckpt['best_val_loss'] or evals[-1]['val_loss'] > ckpt['best_val_loss']


def test_resume_is_bit_exact(workdir):
    run_script(workdir, 'train_bio.py', *GATED, '--max_iters=8', '--eval_interval=4', '--out_dir=straight')
    run_script(workdir, 'train_bio.py', *GATED, '--max_iters=4', '--eval_interval=4', '--out_dir=split')
    run_script(workdir, 'train_bio.py', *GATED, '--max_iters=8', '--eval_interval=4', '--out_dir=split',
               '--init_from=resume')
    straight, split = load(workdir / 'straight' / 'ckpt.pt'), load(workdir / 'split' / 'ckpt.pt')
    assert straight['iter_num'] == split['iter_num'] == 8
    for name, tensor in straight['model'].items():
        assert torch.equal(tensor, split['model'][name]), name
    for a, b in zip(straight['optimizer']['state'].values(), split['optimizer']['state'].values()):
        assert torch.equal(a['exp_avg_sq'], b['exp_avg_sq'])
    # the log survives the resume: every iteration once, in order
    straight_log, split_log = read_log(workdir / 'straight'), read_log(workdir / 'split')
    assert [r['iter'] for r in split_log] == [r['iter'] for r in straight_log]
    assert [r['loss'] for r in split_log if 'loss' in r] == [r['loss'] for r in straight_log if 'loss' in r]


def test_ctrl_c_saves_a_checkpoint_of_that_iteration(workdir):
    cmd = [sys.executable, 'train_bio.py', *TINY, '--use_bio_mlp=True', '--max_iters=100000',
           '--eval_interval=100000', '--out_dir=out']
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last_iter = 0
    for line in proc.stdout:
        if line.startswith('iter '):
            last_iter = int(line.split()[1].rstrip(':'))
            if last_iter == 5:
                proc.send_signal(signal.SIGINT)
                break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert 'Traceback' not in err
    printed = [int(line.split()[1].rstrip(':')) for line in out.splitlines() if line.startswith('iter ')]
    last_iter = max([last_iter] + printed)
    from model_bio import load_model
    _, ckpt = load_model(str(workdir / 'out' / 'ckpt.pt'), 'cpu')
    assert ckpt['iter_num'] == last_iter >= 5
    assert f'saved checkpoint at iter {last_iter}' in out


def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    # the second save is killed (SIGKILL, no cleanup) after writing part of the file
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {REPO!r})
        import model_bio
        model_bio.save_checkpoint({{'iter_num': 1, 'w': torch.ones(1000)}}, {str(tmp_path / 'ckpt.pt')!r})
        def dying_save(obj, f):
            f.write(b'PK partial checkpoint')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        model_bio.save_checkpoint({{'iter_num': 2, 'w': torch.zeros(1000)}}, {str(tmp_path / 'ckpt.pt')!r})
    """)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    ckpt = load(tmp_path / 'ckpt.pt')
    assert ckpt['iter_num'] == 1 and torch.equal(ckpt['w'], torch.ones(1000))


def test_torchrun_two_processes_rank0_alone_writes(workdir):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train_bio.py',
           *TINY, '--use_bio_mlp=True', '--backend=gloo', '--max_iters=4', '--eval_interval=2', '--out_dir=out']
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count('step 2: train loss') == 1
    assert proc.stdout.count('saved checkpoint at iter 4') == 1
    log = read_log(workdir / 'out')
    assert [r['iter'] for r in log] == [0, 1, 2, 2, 3, 4, 4]  # one line each, not one per process
    ckpt = load(workdir / 'out' / 'ckpt.pt')
    assert ckpt['iter_num'] == 4 and len(ckpt['rng']['data']) == 2
    assert sorted(os.listdir(workdir / 'out')) == ['ckpt.pt', 'ckpt_best.pt', 'log.jsonl']
    # gradient accumulation is shared: 2 steps in total, 1 per process
    assert log[-2]['tokens'] == 4 * 4 * 2 * 16


def test_nonfinite_loss_stops_without_overwriting_the_checkpoint(workdir):
    run_script(workdir, 'train_bio.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=out')
    good = load(workdir / 'out' / 'ckpt.pt')
    proc = run_script(workdir, 'train_bio.py', *TINY, '--max_iters=30', '--eval_interval=2', '--out_dir=out',
                      '--init_from=resume', '--learning_rate=1e30', '--warmup_iters=0', '--grad_clip=0.0',
                      check=False)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    assert 'not finite' in proc.stderr or 'loss is nan' in proc.stderr or 'loss is inf' in proc.stderr
    after = load(workdir / 'out' / 'ckpt.pt')
    for name, tensor in after['model'].items():
        assert torch.isfinite(tensor).all(), name
    assert after['iter_num'] >= good['iter_num']


def test_user_mistakes_are_one_line_errors(workdir):
    cases = [
        (['--max_iter=5'], 2, "unknown config key 'max_iter' (did you mean 'max_iters'?)"),
        (['--max_iters=abc'], 2, '--max_iters expects int'),
        (['nope_config.py'], 2, 'nope_config.py'),
        (['--dataset=missing'], 1, 'python data/missing/prepare.py'),
        (['--init_from=resume', '--out_dir=empty'], 1, 'does not exist'),
    ]
    for args, code, message in cases:
        proc = run_script(workdir, 'train_bio.py', *TINY, *args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert len(message_lines(proc.stderr)) == 1, proc.stderr
        assert 'Traceback' not in proc.stderr
