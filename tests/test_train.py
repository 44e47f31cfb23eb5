"""
train_bio.py run as users run it: a subprocess with a real command line, on a tiny model and dataset.

    python -m pytest tests/test_train.py              (-m "not slow": the quick ones only)
"""

import pytest
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import torch

import files
import prepared_data
from checkpoints import save_checkpoint
from conftest import (REPO, TINY, load, message_lines, python, read_log, run_script, simulated_env,
                      trained_straight_and_in_halves)

GATED = TINY + ['--use_bio_mlp=True', '--use_sparse_gate=True', '--dropout=0.1']
GELU = TINY + ['--use_bio_mlp=False']  # where the activation does not matter: no fused kernel to compile first
# config_gpt2_bio_3070.py as it is (float16, GradScaler, RMSNorm, RoPE, ...), shrunk in size and moved to the CPU
SHRUNK_3070 = ['config_gpt2_bio_3070.py', '--device=cpu', '--dataset=tiny', '--n_layer=2', '--n_head=2',
               '--n_embd=32', '--block_size=16', '--batch_size=2', '--gradient_accumulation_steps=2', '--eval_iters=2',
               '--log_interval=1', '--warmup_iters=2', '--lr_decay_iters=12']


@pytest.mark.slow
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
    assert set(steps[0]) == {'iter', 'loss', 'lr', 'time_ms', 'mfu', 'sparsity', 'skipped_steps', 'tokens'}
    assert 0 < steps[0]['sparsity'] < 1
    assert steps[-1]['tokens'] == 6 * 4 * 2 * 16  # iterations x batch x accumulation x block
    # each evaluation records the training steps' wall clock so far and their FLOPs (6 per parameter + attention)
    flops_per_token = 6 * sum(v.numel() for k, v in ckpt['model'].items() if k != 'lm_head.weight') + 12 * 2 * 32 * 16
    assert [e['flops'] for e in evals] == [flops_per_token * e['tokens'] for e in evals] and evals[-1]['flops'] > 0
    assert evals[0]['train_s'] < evals[1]['train_s'] < evals[2]['train_s'] == ckpt['train_seconds']
    assert ckpt['flops'] == evals[-1]['flops']
    assert ckpt['best_val_loss'] == min(e['val_loss'] for e in evals)
    best = load(workdir / 'out' / 'ckpt_best.pt')
    assert best['iter_num'] == min(evals, key=lambda e: e['val_loss'])['iter']
    assert sorted(os.listdir(workdir / 'out')) == ['ckpt.pt', 'ckpt_best.pt', 'log.jsonl']


@pytest.mark.slow
def test_a_run_resumed_from_before_train_s_was_counted_logs_no_train_s(workdir, tiny_run):
    # its time so far is unknown: a train_s counted from the resume would pass for the whole run's (compare_runs);
    # a dense model's FLOPs so far are known from its tokens
    shutil.copytree(tiny_run, workdir / 'out')
    ckpt = load(workdir / 'out' / 'ckpt.pt')
    flops = ckpt.pop('flops')
    del ckpt['train_seconds']
    torch.save(ckpt, workdir / 'out' / 'ckpt.pt')
    run_script(workdir, 'train_bio.py', *TINY, '--init_from=resume', '--max_iters=6', '--eval_interval=2', '--out_dir=out')
    evals = [r for r in read_log(workdir / 'out') if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 2, 4, 6] and 'train_s' not in evals[-1]
    assert evals[-1]['flops'] == flops * 6 // ckpt['iter_num']
    assert load(workdir / 'out' / 'ckpt.pt')['train_seconds'] is None


@pytest.mark.slow
def test_each_split_is_evaluated_on_the_same_windows(workdir):
    # Each split's eval batches come from their own generator seeded alike, so a val.bin identical to
    # train.bin gives identical train and val losses (and every run evaluates the same windows).
    data = workdir / 'data' / 'tiny'
    staging = prepared_data.staging_dir(str(data))
    for name in ('train.bin', 'meta.pkl'):
        shutil.copy(data / name, staging)
    shutil.copy(data / 'train.bin', os.path.join(staging, 'val.bin'))
    prepared_data.commit(str(data), 'test')
    proc = run_script(workdir, 'train_bio.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=out')
    evals = [r for r in read_log(workdir / 'out') if 'val_loss' in r]
    assert len(evals) == 2 and all(r['train_loss'] == r['val_loss'] for r in evals), proc.stdout


@pytest.mark.slow
def test_resume_is_bit_exact(workdir):
    trained_straight_and_in_halves(workdir, 'train_bio.py', *GATED, '--eval_interval=4', iters=8)
    straight, split = load(workdir / 'straight' / 'ckpt.pt'), load(workdir / 'split' / 'ckpt.pt')
    assert straight['iter_num'] == split['iter_num'] == 8
    assert_same_state(straight, split)
    # the log survives the resume: every iteration once, in order
    straight_log, split_log = read_log(workdir / 'straight'), read_log(workdir / 'split')
    assert [r['iter'] for r in split_log] == [r['iter'] for r in straight_log]
    assert [r['loss'] for r in split_log if 'loss' in r] == [r['loss'] for r in straight_log if 'loss' in r]


def assert_same_state(a, b):
    """Two checkpoints hold the same weights and optimizer state, bit for bit."""
    assert a['model'].keys() == b['model'].keys()
    for name, tensor in a['model'].items():
        assert torch.equal(tensor, b['model'][name]), name
    state_a, state_b = a['optimizer']['state'], b['optimizer']['state']
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for index in state_a:
        assert state_a[index].keys() == state_b[index].keys()
        assert_same_values(state_a[index], state_b[index], index)


def assert_same_values(a, b, where):
    """Equal bit for bit, tensors in (nested) dicts too: bitsandbytes keeps its state in a dict per weight."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_values(a[key], b[key], (where, key))
    else:
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, where


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_of_that_iteration(workdir):
    cmd = [python(), 'train_bio.py', *TINY, '--use_bio_mlp=True', '--max_iters=100000',
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
    assert proc.returncode == 130, err  # saved, but not finished: `train && export` stops
    assert 'Traceback' not in err
    printed = [int(line.split()[1].rstrip(':')) for line in out.splitlines() if line.startswith('iter ')]
    last_iter = max([last_iter] + printed)
    from checkpoints import load_model
    _, ckpt = load_model(str(workdir / 'out' / 'ckpt.pt'), 'cpu')
    assert ckpt['iter_num'] == last_iter >= 5
    assert f'saved checkpoint at iter {last_iter}' in out
    assert '\ninterrupted: saving a checkpoint after this iteration (Ctrl-C again to quit without saving)\n' in out


@pytest.mark.slow
def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    # the second save is killed (SIGKILL, no cleanup) after writing part of the file
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {REPO!r})
        import checkpoints
        checkpoints.save_checkpoint({{'iter_num': 1, 'w': torch.ones(1000)}}, {str(tmp_path / 'ckpt.pt')!r})
        def dying_save(obj, f):
            f.write(b'PK partial checkpoint')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        checkpoints.save_checkpoint({{'iter_num': 2, 'w': torch.zeros(1000)}}, {str(tmp_path / 'ckpt.pt')!r})
    """)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    ckpt = load(tmp_path / 'ckpt.pt')
    assert ckpt['iter_num'] == 1 and torch.equal(ckpt['w'], torch.ones(1000))


@pytest.mark.slow
def test_diverged_weights_end_the_run_without_overwriting_the_checkpoint(workdir):
    run_script(workdir, 'train_bio.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=out')
    good = load(workdir / 'out' / 'ckpt.pt')
    proc = run_script(workdir, 'train_bio.py', *TINY, '--max_iters=30', '--eval_interval=2', '--out_dir=out',
                      '--init_from=resume', '--learning_rate=1e30', '--warmup_iters=0', '--grad_clip=0.0',
                      check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'saved checkpoint' not in proc.stdout
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and 'keeps the last good state' in lines[0], proc.stderr
    after = load(workdir / 'out' / 'ckpt.pt')
    assert after['iter_num'] == good['iter_num'] == 2
    assert_same_state(after, good)


@pytest.mark.slow
def test_nccl_without_gpus_is_one_line_that_names_gloo(workdir):
    # torchrun's environment on a machine without CUDA, with the default backend (nccl)
    env = {**os.environ, 'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1'}
    proc = run_script(workdir, 'train_bio.py', *TINY, '--out_dir=out', check=False, env=env)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert message_lines(proc.stderr) == ['error: backend=nccl needs CUDA devices; with device=cpu use --backend=gloo']
    assert not (workdir / 'out').exists()


def files_of(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_a_new_run_never_overwrites_a_run(workdir):
    run_script(workdir, 'train_bio.py', *GELU, '--max_iters=4', '--eval_interval=2', '--out_dir=out')
    before = files_of(workdir / 'out')
    assert list(before) == ['ckpt.pt', 'ckpt_best.pt', 'log.jsonl']
    # the same command again (the likeliest slip after a crash), and a new run from a checkpoint's weights
    for extra in ([], ['--init_from=out/ckpt_best.pt']):
        proc = run_script(workdir, 'train_bio.py', *GELU, '--max_iters=4', '--eval_interval=2', '--out_dir=out',
                          *extra, check=False)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr
        assert message_lines(proc.stderr) == ['error: out already holds a run (out/ckpt.pt at iter 4); continue it '
                                              'with --init_from=resume, or start a new one with another --out_dir']
        assert files_of(workdir / 'out') == before
    # a run that stopped before its first checkpoint leaves its log, which a new run must not append to
    (workdir / 'early').mkdir()
    (workdir / 'early' / 'log.jsonl').write_text('{"iter": 0}\n')
    proc = run_script(workdir, 'train_bio.py', *GELU, '--out_dir=early', check=False)
    assert proc.returncode == 2 and len(message_lines(proc.stderr)) == 1 and 'early/log.jsonl' in proc.stderr
    assert files_of(workdir / 'early') == {'log.jsonl': b'{"iter": 0}\n'}


@pytest.mark.slow
def test_resume_takes_the_new_training_settings_and_keeps_the_architecture(workdir):
    run_script(workdir, 'train_bio.py', *GELU, '--max_iters=2', '--eval_interval=2', '--out_dir=out')
    proc = run_script(workdir, 'train_bio.py', *GELU, '--max_iters=4', '--eval_interval=2', '--out_dir=out',
                      '--init_from=resume', '--gradient_checkpointing=True', '--dropout=0.1', '--batch_size=6',
                      '--n_layer=3')
    assert ('resume: changed since the checkpoint: batch_size 4 -> 6, dropout 0.0 -> 0.1, '
            'gradient_checkpointing False -> True, max_iters 2 -> 4\n') in proc.stdout
    assert "note: the checkpoint's architecture is kept: n_layer 2 (asked 3)\n" in proc.stderr
    ckpt = load(workdir / 'out' / 'ckpt.pt')
    assert ckpt['iter_num'] == 4
    assert ckpt['model_args']['gradient_checkpointing'] is True and ckpt['model_args']['dropout'] == 0.1
    assert ckpt['config']['batch_size'] == 6 and ckpt['config']['gradient_checkpointing'] is True
    assert ckpt['config']['n_layer'] == ckpt['model_args']['n_layer'] == 2
    steps = [r for r in read_log(workdir / 'out') if 'loss' in r]
    assert [r['tokens'] for r in steps] == [128, 256, 256 + 192, 256 + 2 * 192]  # 4, then 6 rows of 2 x 16 tokens


@pytest.mark.slow
def test_the_3070_config_trains_in_float16_on_a_cpu_and_resumes_bit_exactly(workdir):
    proc = trained_straight_and_in_halves(workdir, 'train_bio.py', *SHRUNK_3070, '--eval_interval=4', iters=8)
    assert 'device cpu (' in proc.stdout and ', float16 with a GradScaler\n' in proc.stdout
    straight, split = load(workdir / 'straight' / 'ckpt.pt'), load(workdir / 'split' / 'ckpt.pt')
    assert straight['config']['dtype'] == 'float16' and straight['iter_num'] == split['iter_num'] == 8
    # the scaler is live: it counted 8 steps without an overflow at the initial scale, and is saved
    assert straight['scaler']['scale'] == 65536.0 and straight['scaler']['_growth_tracker'] == 8
    assert split['scaler'] == straight['scaler']
    assert_same_state(straight, split)
    straight_log, split_log = read_log(workdir / 'straight'), read_log(workdir / 'split')
    assert [r.get('loss') for r in split_log] == [r.get('loss') for r in straight_log]
    assert all(r['skipped_steps'] == 0 for r in straight_log if 'loss' in r)


@pytest.mark.slow
def test_a_float16_overflow_skips_the_step_and_lowers_the_scale(workdir):
    run_script(workdir, 'train_bio.py', *SHRUNK_3070, '--max_iters=4', '--eval_interval=4', '--out_dir=out')
    ckpt = load(workdir / 'out' / 'ckpt.pt')
    ckpt['scaler']['scale'] = 2.0 ** 22  # gradients of 1/64 times this overflow float16's 65504
    save_checkpoint(ckpt, str(workdir / 'out' / 'ckpt.pt'))
    proc = run_script(workdir, 'train_bio.py', *SHRUNK_3070, '--max_iters=12', '--eval_interval=4', '--out_dir=out',
                      '--init_from=resume')
    after = load(workdir / 'out' / 'ckpt.pt')
    steps = [r for r in read_log(workdir / 'out') if 'loss' in r and r['iter'] > 4]
    assert [r['iter'] for r in steps] == list(range(5, 13))  # the run went on to its end
    assert steps[0]['skipped_steps'] == 1 and 1 <= after['skipped_steps'] == steps[-1]['skipped_steps'] < 8
    assert ', 1 skipped' in proc.stdout
    assert after['scaler']['scale'] < 2.0 ** 22
    assert all(torch.isfinite(t).all() for t in after['model'].values())
    assert not torch.equal(after['model']['lm_head.weight'], ckpt['model']['lm_head.weight'])  # later steps were taken


@pytest.mark.slow
def test_a_step_with_nonfinite_gradients_is_skipped_and_counted(workdir):
    # losses 1-4 are the evaluation at iter 0 (2 splits x 2 batches), 5-6 iteration 1, 7-8 iteration 2
    proc = run_script(workdir, 'train_bio.py', *GELU, '--max_iters=4', '--eval_interval=100', '--out_dir=out',
                      env=simulated_env(SIMULATED_NAN_LOSSES='7'))
    steps = [r for r in read_log(workdir / 'out') if 'loss' in r]
    assert [r['skipped_steps'] for r in steps] == [0, 1, 1, 1]
    assert math.isnan(steps[1]['loss']) and not any(math.isnan(r['loss']) for r in steps[2:])
    assert 'iter 2: loss nan' in proc.stdout and 'iter 4: loss ' in proc.stdout and ', 1 skipped' in proc.stdout
    ckpt = load(workdir / 'out' / 'ckpt.pt')
    assert ckpt['iter_num'] == 4 and ckpt['skipped_steps'] == 1
    assert all(torch.isfinite(t).all() for t in ckpt['model'].values())
    # max_skipped_steps in a row end the run; the checkpoint of iter 0 stays as it was
    proc = run_script(workdir, 'train_bio.py', *GELU, '--max_iters=8', '--eval_interval=100', '--out_dir=many',
                      '--max_skipped_steps=2', check=False, env=simulated_env(SIMULATED_NAN_LOSSES='5,6,7,8,9,10'))
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith('error: the last 2 steps all had gradients that are not finite')
    assert load(workdir / 'many' / 'ckpt.pt')['iter_num'] == 0


@pytest.mark.slow
def test_out_of_memory_is_one_line_that_says_what_to_change(workdir):
    proc = run_script(workdir, 'train_bio.py', *GELU, '--max_iters=10', '--eval_interval=100', '--out_dir=out',
                      check=False, env=simulated_env(SIMULATED_OOM_AFTER=8))
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith('error: out of memory on cpu')
    assert 'batch_size=4' in lines[0] and '--gradient_checkpointing=True' in lines[0]
    assert load(workdir / 'out' / 'ckpt.pt')['iter_num'] == 0


@pytest.mark.slow
def test_a_rehearsal_times_the_run_and_writes_nothing(workdir):
    proc = run_script(workdir, 'train_bio.py', *GELU, '--rehearsal_iters=5', '--max_iters=1000', '--eval_interval=100',
                      '--out_dir=rehearsed')
    assert re.search(r'rehearsal: 4 iterations timed \(after 1 to warm up\): [\d.]+ ms/iter, [\d,]+ tokens/s, '
                     r'mfu n/a, peak memory n/a \(measured on CUDA only\)\n', proc.stdout), proc.stdout
    assert re.search(r'rehearsal: the whole run, 1,000 iterations and 11 evaluations of 2 x 2 batches, would take '
                     r'about [\d.]+ (minutes|hours|days) \(training ', proc.stdout), proc.stdout
    assert 'step 0' not in proc.stdout and 'saved checkpoint' not in proc.stdout
    assert not (workdir / 'rehearsed').exists()
    # rehearsing a run that has reached max_iters still times the iterations asked for, and changes nothing
    run_script(workdir, 'train_bio.py', *GELU, '--max_iters=2', '--eval_interval=2', '--out_dir=done')
    before = {name: (workdir / 'done' / name).read_bytes() for name in os.listdir(workdir / 'done')}
    proc = run_script(workdir, 'train_bio.py', *GELU, '--max_iters=2', '--eval_interval=2', '--out_dir=done',
                      '--init_from=resume', '--rehearsal_iters=5')
    assert re.findall(r'^iter (\d+):', proc.stdout, re.M) == ['3', '4', '5', '6', '7'], proc.stdout
    assert 'rehearsal: 4 iterations timed' in proc.stdout and 'the rest of the run, 0 iterations' in proc.stdout
    assert {name: (workdir / 'done' / name).read_bytes() for name in os.listdir(workdir / 'done')} == before


@pytest.mark.slow
def test_a_rehearsal_projects_its_memory_for_8_to_16_gib(workdir):
    """What a sequence keeps for backward (the weights, counted apart, left out), with the loss's gradient, does
    not depend on the batch rehearsed; the suggestions keep the run's sequences per iteration."""
    per_sequence = {}
    for batch in (2, 6):
        out = run_script(workdir, 'train_bio.py', *GELU, '--rehearsal_iters=2', '--block_size=64', '--n_embd=64',
                         f'--batch_size={batch}', '--gradient_accumulation_steps=3').stdout
        found = re.search(r'rehearsal: memory: weights, gradients, optimizer state and weight copies ([\d.]+) MiB; per '
                          r"sequence of 64 tokens ([\d.]+) MiB \(kept for backward and the loss's gradient, float32\); "
                          rf'at batch_size={batch}: about ([\d.]+) MiB\n', out)
        assert found, out
        fixed, per_sequence[batch], total = map(float, found.groups())
        assert abs(total - (fixed + batch * per_sequence[batch])) < 0.005 * (batch + 2)  # printed to 0.01
        largest = re.search(r'rehearsal: the largest batch_size that fits, a tenth left: 8 GiB (\d+), 12 GiB (\d+), '
                            r'16 GiB (\d+)\n', out)
        assert largest and abs(int(largest[1]) / ((0.9 * 8 * 1024 - fixed) / per_sequence[batch]) - 1) < 0.01, out
    assert per_sequence[2] == per_sequence[6] > 0
    assert ("this run's 18 sequences per iteration at those: 8 GiB --batch_size=18 --gradient_accumulation_steps=1; "
            '12 GiB --batch_size=18') in out
    out = run_script(workdir, 'train_bio.py', *GELU, '--rehearsal_iters=2', '--gradient_checkpointing=True').stdout
    assert 'rehearsal: no memory projection with gradient_checkpointing=True' in out


def test_a_checkpoint_held_open_is_replaced_once_released(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'iter_num': 1}, path)
    real_replace, refusals, waits = os.replace, [3], []

    def replace(src, dst):  # Windows, while another program has dst open
        if refusals[0]:
            refusals[0] -= 1
            raise PermissionError(13, 'The process cannot access the file because it is being used by another process')
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', replace)
    monkeypatch.setattr(files.time, 'sleep', waits.append)
    assert save_checkpoint({'iter_num': 2}, path) is True
    assert load(path)['iter_num'] == 2 and not os.path.exists(path + '.tmp')
    assert waits == list(files.RENAME_WAITS[:3])


def test_a_checkpoint_held_for_good_stays_complete_beside_it(tmp_path, monkeypatch, capsys):
    path, best = str(tmp_path / 'ckpt.pt'), str(tmp_path / 'ckpt_best.pt')
    save_checkpoint({'iter_num': 1}, path, copy_to=best)

    def replace(src, dst):
        raise PermissionError(13, 'The process cannot access the file because it is being used by another process')

    monkeypatch.setattr(os, 'replace', replace)
    monkeypatch.setattr(files.time, 'sleep', lambda seconds: None)
    assert save_checkpoint({'iter_num': 2}, path, copy_to=best) is False
    assert load(path)['iter_num'] == load(best)['iter_num'] == 1  # the last good ones, whole
    assert load(path + '.tmp')['iter_num'] == load(best + '.tmp')['iter_num'] == 2  # the new one, complete
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith('warning: could not replace') for w in warnings)


def test_a_refused_rename_never_changes_the_best_checkpoint_later(tmp_path, monkeypatch):
    # The new best checkpoint is a hard link to ckpt.pt.tmp; if ckpt.pt is held, that temp file stays, and
    # the next save must not write into it (which would rewrite ckpt_best.pt with a state that is not the best).
    path, best = str(tmp_path / 'ckpt.pt'), str(tmp_path / 'ckpt_best.pt')
    save_checkpoint({'iter_num': 0}, path, copy_to=best)
    real_replace, held = os.replace, [True]

    def replace(src, dst):
        if dst == path and held[0]:
            raise PermissionError(13, 'The process cannot access the file because it is being used by another process')
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', replace)
    monkeypatch.setattr(files.time, 'sleep', lambda seconds: None)
    assert save_checkpoint({'iter_num': 1000}, path, copy_to=best) is False  # a new best; ckpt.pt is held
    held[0] = False
    assert save_checkpoint({'iter_num': 2000}, path) is True  # not a best
    assert load(best)['iter_num'] == 1000 and load(path)['iter_num'] == 2000


@pytest.mark.slow
def test_the_log_trimmed_on_resume_waits_for_a_log_held_open(workdir):
    run_script(workdir, 'train_bio.py', *GELU, '--max_iters=2', '--eval_interval=2', '--out_dir=out')
    with open(workdir / 'out' / 'log.jsonl', 'a') as f:
        f.write('{"iter": 3, "loss": 1.0}\n')  # logged by a run that then crashed before its next checkpoint
    # Windows refuses the rename onto log.jsonl twice, as while an editor has it open
    run_script(workdir, 'train_bio.py', *GELU, '--max_iters=4', '--eval_interval=2', '--out_dir=out',
               '--init_from=resume', env=simulated_env(SIMULATED_HELD_OPEN='log.jsonl:2'))
    steps = [r for r in read_log(workdir / 'out') if 'loss' in r]
    assert [r['iter'] for r in steps] == [1, 2, 3, 4] and steps[2]['loss'] != 1.0
