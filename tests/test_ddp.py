"""
DDP as users run it: torchrun with CPU processes on the gloo backend, a tiny model and dataset.

    python -m pytest tests/test_ddp.py              (-m "not slow": the quick ones only)
"""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import REPO, TINY, load, python, read_log, run_script, simulated_env

GELU = TINY + ['--use_bio_mlp=False']  # the activation does not matter here: no fused kernel to compile first


def torchrun(*args):
    return [python(), '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args, '--backend=gloo']


@pytest.mark.slow
def test_torchrun_two_processes_rank0_alone_writes(workdir):
    cmd = torchrun('train_bio.py', *TINY, '--use_bio_mlp=True', '--max_iters=4', '--eval_interval=2', '--out_dir=out')
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count('step 2: train loss') == 1
    assert proc.stdout.count('saved checkpoint at iter 4') == 1
    log = read_log(workdir / 'out')
    assert [r['iter'] for r in log] == [0, 1, 2, 2, 3, 4, 4]  # one line each, not one per process
    ckpt = load(workdir / 'out' / 'ckpt.pt')
    assert ckpt['iter_num'] == 4 and len(ckpt['rng']['torch']) == 2  # dropout states per process, one data stream
    assert sorted(os.listdir(workdir / 'out')) == ['ckpt.pt', 'ckpt_best.pt', 'log.jsonl']
    # gradient accumulation is shared: 2 steps in total, 1 per process
    assert log[-2]['tokens'] == 4 * 4 * 2 * 16


@pytest.mark.slow
def test_finetuning_gradients_do_not_depend_on_the_number_of_processes(workdir):
    # replies of 1, 4, 7, ... words: the two micro-batches of the step hold different numbers of trained
    # tokens, which the loss must weigh as one mean over both, wherever each is computed
    records = [{'messages': [{'role': 'user', 'content': f'Question {i}?'},
                             {'role': 'assistant', 'content': ' '.join(['word'] * (1 + 3 * i))}]} for i in range(12)]
    (workdir / 'conversations.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    run_script(workdir, os.path.join(REPO, 'data', 'smoltalk', 'prepare.py'), '--dataset=conversations.jsonl',
               f'--out_dir={workdir / "data" / "conversations"}', '--val_fraction=0.2')
    # the gated oscillating MLP: every one of its parameters must reach DDP's gradient reduction
    step = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=64',
            '--mlp=bio_glu', '--dataset=conversations', '--batch_size=1', '--gradient_accumulation_steps=2',
            '--max_iters=1', '--eval_interval=100', '--eval_conversations=1', '--grad_clip=0.0', '--warmup_iters=0',
            '--log_interval=1']
    run_script(workdir, 'finetune_native.py', *step, '--out_dir=one')
    proc = subprocess.run(torchrun('finetune_native.py', *step, '--out_dir=two'), cwd=workdir, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = load(workdir / 'one' / 'ckpt.pt'), load(workdir / 'two' / 'ckpt.pt')
    assert one['iter_num'] == two['iter_num'] == 1
    # after one AdamW step, exp_avg is (1 - beta1) times the gradient
    assert one['optimizer']['state'].keys() == two['optimizer']['state'].keys()
    for index, state in one['optimizer']['state'].items():
        assert state['exp_avg'].abs().sum() > 0
        torch.testing.assert_close(two['optimizer']['state'][index]['exp_avg'], state['exp_avg'], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(read_log(workdir / 'two')[-2]['loss'], read_log(workdir / 'one')[-2]['loss'])


def start_long_run(workdir):
    """torchrun training for good (no log line or evaluation after iter 0), once it has saved iter 0."""
    cmd = torchrun('train_bio.py', *GELU, '--max_iters=10000000', '--eval_interval=10000000',
                   '--log_interval=10000000', '--out_dir=out')
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith('saved checkpoint at iter 0'):
            break
    time.sleep(2)  # training now
    return proc


@pytest.mark.slow
@pytest.mark.parametrize('how', ['ctrl-c', 'sigterm'])
def test_a_signal_under_torchrun_saves_well_inside_its_grace(workdir, how):
    # Ctrl-C at a terminal reaches torchrun and its workers; a scheduler's SIGTERM reaches torchrun,
    # which passes it on and kills the workers 30 s later
    proc = start_long_run(workdir)
    start = time.time()
    if how == 'ctrl-c':
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    elapsed = time.time() - start
    saved = [line for line in out.splitlines() if line.startswith('saved checkpoint at iter ')]
    assert len(saved) == 1, out + err
    ckpt = load(workdir / 'out' / 'ckpt.pt')
    assert saved[0] == f'saved checkpoint at iter {ckpt["iter_num"]} to out' and ckpt['iter_num'] > 0
    assert elapsed < 10, elapsed  # torchrun's grace is 30 s


def worker_pid(workdir, local_rank):
    """The pid of the torchrun worker with this LOCAL_RANK running in workdir (the process torchrun started:
    the preloaded Python's shim, where tests/preloaded.py runs it)."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                environment = f.read().split(b'\0')
            cwd = os.readlink(f'/proc/{pid}/cwd')
        except OSError:
            continue
        if cwd == str(workdir) and f'LOCAL_RANK={local_rank}'.encode() in environment:
            return int(pid)
    raise AssertionError(f'no worker with LOCAL_RANK={local_rank}')


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the worker processes through /proc')
def test_a_failing_process_makes_the_others_stop_promptly(workdir):
    proc = start_long_run(workdir)
    saved = (workdir / 'out' / 'ckpt.pt').read_bytes()
    start = time.time()
    os.kill(worker_pid(workdir, 1), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    out, err = proc.communicate(timeout=120)
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert elapsed < 15, elapsed
    assert 'error: process 0: another process of this run stopped' in err
    assert (workdir / 'out' / 'ckpt.pt').read_bytes() == saved


@pytest.mark.slow
def test_out_of_memory_in_one_process_is_said_by_that_process(workdir):
    # rank 1 alone runs out of memory (at its 10th loss: iteration 4); it says so, rank 0 says why it stops
    cmd = torchrun('train_bio.py', *GELU, '--max_iters=20', '--eval_interval=100', '--out_dir=out')
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300,
                          env=simulated_env(SIMULATED_OOM_AFTER=10, SIMULATED_FAULT_RANK=1))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert any(e.startswith('error: process 1: out of memory on cpu') for e in errors), proc.stderr
    assert not any(e.startswith('error: process 0: out of memory') for e in errors)
    assert load(workdir / 'out' / 'ckpt.pt')['iter_num'] == 0
