"""
Runs, files and results under hostile conditions, each tried as a user runs the scripts: two writers of one
run, links planted where the scripts write, data that changed under a checkpoint, weights or outputs that
are not finite, a full disk, and start-up failures that must leave nothing behind.
"""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import files
import prepared_data
from conftest import REPO, TINY, load, message_lines, python, run_script

pytestmark = pytest.mark.slow  # every test runs scripts
RESUME = [*TINY, '--init_from=resume', '--out_dir=out']
CHARS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX'  # data/tiny's, as conftest.make_workdir writes them


def one_error(proc):
    """The one 'error: ' line a refused command printed, its last (exit 2, no traceback; a progress bar may come first)."""
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, (proc.returncode, proc.stdout, proc.stderr)
    lines = message_lines(proc.stderr)
    assert [line for line in lines if line.startswith('error: ')] == lines[-1:], proc.stderr
    return lines[-1]


def snapshot(folder):
    """{relative path: bytes, or the target of a link} of everything under folder."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = ('link', os.readlink(path)) if os.path.islink(path) else open(path, 'rb').read()
    return found


def plant(folder, names, victim):
    """Links at folder/NAME for each name, into the victim folder (victim/NAME need not exist: a dangling link)."""
    for name in names:
        os.symlink(os.path.join(victim, name.replace('/', '_')), os.path.join(folder, name))


@pytest.fixture
def victim(tmp_path):
    """A folder of someone else's, holding one file; no script may change anything in it."""
    folder = tmp_path / 'victim'
    folder.mkdir()
    (folder / 'bashrc').write_text('# theirs\n')
    return folder


def assert_untouched(victim):
    assert snapshot(victim) == {'bashrc': b'# theirs\n'}


def assert_regular(folder, *names):
    for name in names:
        path = os.path.join(folder, name)
        assert os.path.isfile(path) and not os.path.islink(path), name


def test_two_resumes_of_one_run_the_second_refused(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'out')
    first = subprocess.Popen([python(), 'train_bio.py', *RESUME, '--max_iters=100000', '--eval_interval=100000'],
                             cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith('iter 6:'):
                break
        second = run_script(workdir, 'train_bio.py', *RESUME, '--learning_rate=3e-3', '--max_iters=8', check=False)
        assert re.fullmatch(r'error: out is being written by another process \(process \d+ on \S+: train_bio\.py .*'
                            r'--init_from=resume --out_dir=out --max_iters=100000 --eval_interval=100000\); one run '
                            r'folder has one writer: wait for it to end, or use another folder', one_error(second))
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130, err
    saved = load(workdir / 'out' / 'ckpt.pt')
    assert saved['config']['learning_rate'] == 1e-2 and saved['iter_num'] > 6
    assert sorted(os.listdir(workdir / 'out')) == ['ckpt.pt', 'ckpt_best.pt', 'log.jsonl']  # the lock is gone
    run_script(workdir, 'train_bio.py', *RESUME, f'--max_iters={saved["iter_num"] + 1}')  # free again


def test_an_export_being_written_is_not_evaluated_into(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'out')
    run_script(workdir, 'export_hub.py', '--export_dir=exported')
    before = snapshot(workdir / 'exported')
    claim = files.claim_folder(str(workdir / 'exported'))  # this test's process writes it
    try:
        proc = run_script(workdir, 'eval_bio.py', '--ckpt=exported', '--tasks=val', '--max_tokens=64', check=False)
        assert one_error(proc).startswith(f'error: exported is being written by another process (process {os.getpid()} on ')
        proc = run_script(workdir, 'export_hub.py', '--export_dir=exported', check=False)
        assert 'is being written by another process' in one_error(proc)
    finally:
        claim.release()
    assert snapshot(workdir / 'exported') == before
    run_script(workdir, 'eval_bio.py', '--ckpt=exported', '--tasks=val', '--max_tokens=64', '--dataset=tiny')
    assert 'eval_results.json' in os.listdir(workdir / 'exported')


def test_a_resume_writes_through_no_planted_link(workdir, tiny_run, victim):
    shutil.copytree(tiny_run, workdir / 'out')
    plant(workdir / 'out', ['ckpt.pt.tmp', 'ckpt_best.pt.tmp', 'log.jsonl.tmp', '.lock'], victim)
    checkpoint = load(workdir / 'out' / 'ckpt.pt')
    checkpoint['best_val_loss'] = float('inf')  # so the first evaluation replaces the best copy
    torch.save(checkpoint, workdir / 'out' / 'ckpt.pt')
    os.remove(workdir / 'out' / 'ckpt_best.pt')
    plant(workdir / 'out', ['ckpt_best.pt'], victim)  # the best copy, replaced at the first improvement
    run_script(workdir, 'train_bio.py', *RESUME, '--max_iters=8', '--eval_interval=2')
    assert_untouched(victim)
    assert_regular(workdir / 'out', 'ckpt.pt', 'ckpt_best.pt', 'log.jsonl')
    assert sorted(os.listdir(workdir / 'out')) == ['ckpt.pt', 'ckpt_best.pt', 'log.jsonl']
    assert load(workdir / 'out' / 'ckpt.pt')['iter_num'] == 8


def test_a_log_that_is_a_link_is_neither_read_nor_written(workdir, tiny_run, victim):
    shutil.copytree(tiny_run, workdir / 'out')
    os.remove(workdir / 'out' / 'log.jsonl')
    (victim / 'log').write_text(json.dumps({'iter': 1, 'val_loss': 0.5, 'train_loss': 0.5}) + '\n')
    os.symlink(victim / 'log', workdir / 'out' / 'log.jsonl')
    run_script(workdir, 'train_bio.py', *RESUME, '--max_iters=6', '--eval_interval=2')
    assert (victim / 'log').read_text() == json.dumps({'iter': 1, 'val_loss': 0.5, 'train_loss': 0.5}) + '\n'
    assert_regular(workdir / 'out', 'log.jsonl')
    assert [r['iter'] for r in map(json.loads, open(workdir / 'out' / 'log.jsonl'))] == [5, 6, 6]


def test_evaluation_and_export_write_through_no_planted_link(workdir, tiny_run, victim):
    shutil.copytree(tiny_run, workdir / 'out')
    run_script(workdir, 'export_hub.py', '--export_dir=exported')
    plant(workdir / 'exported', ['README.md.tmp', 'eval_results.json.tmp', '.lock'], victim)
    os.remove(workdir / 'exported' / 'README.md')
    os.symlink(victim / 'bashrc', workdir / 'exported' / 'README.md')  # neither read into the card nor written through
    run_script(workdir, 'eval_bio.py', '--ckpt=exported', '--tasks=val', '--max_tokens=64', '--dataset=tiny')
    assert_untouched(victim)
    assert '# theirs' not in (workdir / 'exported' / 'README.md').read_text()
    assert_regular(workdir / 'exported', 'README.md', 'eval_results.json')
    assert 'val' in json.loads((workdir / 'exported' / 'eval_results.json').read_text())
    # exported again: the card kept, the new one beside it (README.new.md, here a link), the weights and config
    os.remove(workdir / 'exported' / 'model.safetensors')
    plant(workdir / 'exported', ['README.new.md', 'model.safetensors'], victim)
    run_script(workdir, 'export_hub.py', '--export_dir=exported')
    assert_untouched(victim)
    assert_regular(workdir / 'exported', 'README.new.md', 'model.safetensors', 'config.json')
    # the weights' link held no weights, so the results of the weights before it are dropped
    assert sorted(os.listdir(workdir / 'exported')) == ['README.md', 'README.new.md', 'config.json', 'model.safetensors']


def test_analysis_and_prepared_data_write_through_no_planted_link(workdir, tiny_run, victim):
    shutil.copytree(tiny_run, workdir / 'out')
    (workdir / 'plots').mkdir()
    plant(workdir / 'plots', ['loss_summary.json.tmp', 'loss_by_iter.png.tmp', 'loss_by_tokens.png'], victim)
    run_script(workdir, 'analysis/plot_loss.py', 'out', '--out_dir=plots')
    plant(workdir / 'plots', ['wiggle_stats.json', 'wiggle_hist.png.tmp'], victim)
    run_script(workdir, 'analysis/analyze_wiggle.py', 'out/ckpt.pt', '--out_dir=plots')
    assert_untouched(victim)
    assert_regular(workdir / 'plots', 'loss_summary.json', 'loss_by_iter.png', 'loss_by_tokens.png', 'wiggle_stats.json',
                   'wiggle_hist.png')
    # a prepare script's staging folder planted as a link to someone's folder
    data = workdir / 'data' / 'shakespeare_char'
    data.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, 'data', 'shakespeare_char', 'prepare.py'), data)
    shutil.copy(os.path.join(os.path.dirname(REPO), 'shared', 'data', 'tinyshakespeare', 'input.txt'), data)
    os.symlink(victim, data / prepared_data.STAGING)
    plant(data, ['train.bin.tmp', 'meta.pkl'], victim)
    run_script(workdir, 'data/shakespeare_char/prepare.py')
    assert_untouched(victim)
    assert_regular(data, 'train.bin', 'val.bin', 'meta.pkl', 'manifest.json')
    chat = workdir / 'data' / 'synthetic_chat'
    chat.mkdir()
    shutil.copy(os.path.join(REPO, 'data', 'synthetic_chat', 'prepare.py'), chat)
    (workdir / 'data' / 'smoltalk').mkdir()
    shutil.copy(os.path.join(REPO, 'data', 'smoltalk', 'prepare.py'), workdir / 'data' / 'smoltalk')
    plant(chat, ['heldout_prompts.txt', 'conversations.jsonl.tmp'], victim)
    run_script(workdir, 'data/synthetic_chat/prepare.py', '--conversations=20')
    assert_untouched(victim)
    assert_regular(chat, 'heldout_prompts.txt', 'conversations.jsonl', 'train.bin')


def test_the_model_card_shows_checkpoint_text_as_text(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'out')
    checkpoint = load(workdir / 'out' / 'ckpt.pt')
    injected = '|\n\n## Injected\n[click me](https://evil.example)\n<script>'
    checkpoint['config'][injected] = injected
    checkpoint['config']['dataset'] = 'tiny`\n# Heading'
    torch.save(checkpoint, workdir / 'out' / 'ckpt.pt')
    run_script(workdir, 'export_hub.py', '--export_dir=exported')
    card = (workdir / 'exported' / 'README.md').read_text()
    assert not re.search(r'^#+ (Injected|Heading)', card, re.M)
    # the key and its value each one code span, which shows its text and makes no link, autolink or HTML
    row = next(line for line in card.splitlines() if 'Injected' in line)
    assert re.fullmatch(r'\| (`+) \\\|  ## Injected \[click me\]\(https://evil\.example\) <script> \1 \| (`+) .* \2 \|', row), row
    assert 'Dataset `` tiny` # Heading ``' in card  # its fence outgrows the name's own backtick


def test_data_prepared_with_another_vocabulary_is_refused(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'out')
    # as many characters, in another order: the ids fit, their meanings do not
    other = workdir / 'data' / 'othertiny'
    other.mkdir()
    staging = prepared_data.staging_dir(str(other))
    for name in ('train.bin', 'val.bin'):
        shutil.copy(workdir / 'data' / 'tiny' / name, os.path.join(staging, name))
    swapped = CHARS[1] + CHARS[0] + CHARS[2:]
    with open(os.path.join(staging, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': 50, 'itos': dict(enumerate(swapped))}, f)
    prepared_data.commit(str(other), 'tests/test_run_safety.py')
    difference = "both have 50 characters, but id 0 is 'b' in the data and 'a' in the checkpoint"
    before = snapshot(workdir / 'out')
    assert one_error(run_script(workdir, 'train_bio.py', *RESUME, '--dataset=othertiny', '--max_iters=6', check=False)) == (
        f'error: data/othertiny was prepared with another vocabulary than out/ckpt.pt was trained on ({difference}); '
        'train it on the data it was made for, or prepare data/othertiny as it was')
    assert one_error(run_script(workdir, 'train_bio.py', *TINY, '--init_from=out/ckpt.pt', '--dataset=othertiny',
                                '--out_dir=new', check=False)).startswith('error: data/othertiny was prepared with another')
    assert one_error(run_script(workdir, 'eval_bio.py', '--ckpt=out/ckpt.pt', '--tasks=val', '--dataset=othertiny',
                                '--out=results.json', check=False)) == (
        f'error: data/othertiny was prepared with another vocabulary than the model was trained on ({difference}); '
        'evaluate it on the data it was made for (--dataset), or prepare data/othertiny as it was')
    assert snapshot(workdir / 'out') == before and not (workdir / 'new').exists() and not (workdir / 'results.json').exists()
    # a checkpoint written before checkpoints carried their characters: those of the dataset it names
    checkpoint = load(workdir / 'out' / 'ckpt.pt')
    del checkpoint['tokenizer']
    torch.save(checkpoint, workdir / 'out' / 'old.pt')
    assert one_error(run_script(workdir, 'train_bio.py', *TINY, '--init_from=out/old.pt', '--dataset=othertiny',
                                '--out_dir=new', check=False)).startswith('error: data/othertiny was prepared with another')
    # its own data prepared again with fewer characters: a checkpoint carries its characters and samples as trained;
    # one without them (written before checkpoints carried them) is refused, not decoded with the wrong table
    with open(workdir / 'data' / 'tiny' / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 48, 'itos': dict(enumerate(CHARS[:48]))}, f)
    proc = run_script(workdir, 'sample_bio.py', '--start=ab', '--max_new_tokens=20', '--num_samples=1')
    assert set(proc.stdout.split('\n---')[0]) <= set(CHARS) | {'\n'}
    assert one_error(run_script(workdir, 'sample_bio.py', '--ckpt=old.pt', '--start=ab', check=False)) == (
        f"error: {workdir / 'data' / 'tiny' / 'meta.pkl'} has 48 characters but the checkpoint was trained on 50: "
        'data/tiny was prepared again since, with other text; prepare it as it was')


@pytest.fixture
def broken_checkpoints(workdir, tiny_run):
    """out/nan.pt (a weight NaN) and out/overflow.pt (finite weights whose logits overflow to infinity)."""
    shutil.copytree(tiny_run, workdir / 'out')
    checkpoint = load(workdir / 'out' / 'ckpt.pt')
    checkpoint['model']['transformer.h.0.attn.c_attn.weight'][0, 0] = float('nan')
    torch.save(checkpoint, workdir / 'out' / 'nan.pt')
    checkpoint = load(workdir / 'out' / 'ckpt.pt')
    checkpoint['model']['transformer.wte.weight'].mul_(1e20)  # tied to lm_head: with the final norm's gain below,
    checkpoint['model']['transformer.ln_f.weight'].fill_(1e25)  # the logits' every term is past float32's range
    torch.save(checkpoint, workdir / 'out' / 'overflow.pt')
    checkpoint = load(workdir / 'out' / 'ckpt.pt')
    checkpoint['model']['transformer.ln_f.weight'].fill_(1e30)  # logits near 1e29: finite, but not once divided by 1e-5
    torch.save(checkpoint, workdir / 'out' / 'large.pt')
    return workdir


def test_weights_that_are_not_finite_are_refused_by_every_script(broken_checkpoints):
    workdir = broken_checkpoints
    before = snapshot(workdir / 'out')
    refusal = ('error: out/nan.pt holds weights that are not finite (NaN or infinity, in '
               'transformer.h.0.attn.c_attn.weight): nothing can be sampled, evaluated or trained from it; use an '
               'earlier checkpoint')
    for args in (['sample_bio.py', '--ckpt=nan.pt', '--temperature=0'], ['chat.py', '--out_dir=out', '--ckpt=nan.pt'],
                 ['eval_bio.py', '--ckpt=out/nan.pt', '--tasks=val', '--out=results.json'],
                 ['export_hub.py', '--ckpt=nan.pt', '--export_dir=exported'],
                 ['train_bio.py', *TINY, '--init_from=out/nan.pt', '--out_dir=new']):
        assert one_error(run_script(workdir, *args, check=False, input='hello\n')) == refusal, args
    assert snapshot(workdir / 'out') == before
    assert not any(os.path.exists(workdir / name) for name in ('results.json', 'exported', 'new'))


def test_outputs_that_are_not_finite_are_one_line_and_written_nowhere(broken_checkpoints):
    workdir = broken_checkpoints
    proc = run_script(workdir, 'sample_bio.py', '--ckpt=overflow.pt', '--start=ab', '--temperature=0', check=False)
    assert one_error(proc) == ("error: the model's output is not finite (NaN or infinity) at new token 1: its "
                               "weights or its dtype's range cannot be sampled from (try --dtype=float32)")
    proc = run_script(workdir, 'eval_bio.py', '--ckpt=out/overflow.pt', '--tasks=val', '--out=results.json', check=False)
    assert one_error(proc) == ("error: val loss is not finite: the model's output is NaN or infinite (its weights, or "
                               "float16's range: try --dtype=float32); nothing was written")
    assert not (workdir / 'results.json').exists()
    # a new run from such weights: nothing logged or saved, and no claim left to refuse the next run
    proc = run_script(workdir, 'train_bio.py', *TINY, '--init_from=out/overflow.pt', '--out_dir=new', check=False)
    assert re.fullmatch(r'error: loss is not finite \(train nan, val nan\) at iter 0; stopping, no checkpoint was saved',
                        one_error(proc))
    assert not (workdir / 'new').exists()
    # logits that are finite but overflow once divided by a tiny temperature still sample (the largest one wins)
    proc = run_script(workdir, 'sample_bio.py', '--ckpt=large.pt', '--start=ab', '--temperature=1e-5', '--max_new_tokens=5')
    assert proc.stdout.startswith('ab') and len(proc.stdout.split('\n---')[0]) == 7


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'out')
    before = (workdir / 'out' / 'ckpt.pt').read_bytes()

    def small_files():  # files past 20 kB cannot be written, as on a full disk (EFBIG, not a killing SIGXFSZ)
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run([sys.executable, 'train_bio.py', *RESUME, '--max_iters=6', '--eval_interval=2'], cwd=workdir,
                          capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert re.fullmatch(r'error: no room to write out/ckpt\.pt \(File too large\): the disk is full or a size limit '
                        r'was reached; the file it would replace \(if any\) is as it was; free some space and run again',
                        one_error(proc))
    assert (workdir / 'out' / 'ckpt.pt').read_bytes() == before
    assert sorted(os.listdir(workdir / 'out')) == ['ckpt.pt', 'ckpt_best.pt', 'log.jsonl']


def test_a_full_disk_while_preparing_is_one_line_and_keeps_the_set_it_had(workdir):
    data = workdir / 'data' / 'shakespeare_char'
    data.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, 'data', 'shakespeare_char', 'prepare.py'), data)
    shutil.copy(os.path.join(os.path.dirname(REPO), 'shared', 'data', 'tinyshakespeare', 'input.txt'), data)

    def small_files():  # train.bin (2 MB) cannot be written, as on a full disk
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, 'data/shakespeare_char/prepare.py'], cwd=workdir, capture_output=True,
                          text=True, timeout=120, preexec_fn=small_files)
    assert one_error(proc) == (f'error: no room to write the prepared files in {data} (File too large): the disk is full '
                               f'or a size limit was reached; {data} keeps the files it had; free some space and run again')
    assert sorted(os.listdir(data)) == ['input.txt', 'prepare.py']


def test_a_refused_start_leaves_nothing(workdir, tiny_run):
    (workdir / 'exits.py').write_text('import sys\nsys.exit(0)\n')
    (workdir / 'quits.py').write_text('exit()\n')
    for script in ('train_bio.py', 'sample_bio.py'):
        for config in ('exits.py', 'quits.py'):
            assert one_error(run_script(workdir, script, config, check=False)) == (
                f"error: config file '{config}' calls exit(); a config file only sets settings (remove the call)")
    assert one_error(run_script(workdir, 'train_bio.py', *TINY, '--learning_rate=nan', check=False)) == (
        'error: --learning_rate=nan is not allowed: it must be a finite number')
    if 'wandb' not in sys.modules:  # not installed here, as on most machines
        assert one_error(run_script(workdir, 'train_bio.py', *TINY, '--wandb_log=True', '--out_dir=new', check=False)) == (
            'error: wandb_log=True but wandb is not installed (pip install wandb, or --wandb_log=False)')
    assert one_error(run_script(workdir, 'finetune_native.py', *TINY, '--out_dir=new', check=False)) == (
        'error: data/tiny holds token streams, not conversations '
        f"({workdir / 'data' / 'tiny'}/train_mask.bin not found): fine-tuning reads a chat dataset, e.g. python "
        'data/smoltalk/prepare.py and --dataset=smoltalk')
    words = workdir / 'data' / 'words'  # a meta.pkl of words, not characters: no checkpoint could record it
    words.mkdir()
    staging = prepared_data.staging_dir(str(words))
    for name in ('train.bin', 'val.bin'):
        shutil.copy(workdir / 'data' / 'tiny' / name, os.path.join(staging, name))
    with open(os.path.join(staging, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': 50, 'itos': {i: f'w{i} ' for i in range(50)}}, f)
    prepared_data.commit(str(words), 'tests/test_run_safety.py')
    assert one_error(run_script(workdir, 'train_bio.py', *TINY, '--dataset=words', '--out_dir=new', check=False)) == (
        f"error: {words / 'meta.pkl'} has no itos mapping the ids 0, 1, 2, ... (at least one, at most vocab_size) each "
        'to a single character; run python data/words/prepare.py again')
    (workdir / 'held').mkdir()
    shutil.copy(tiny_run / 'ckpt.pt', workdir / 'held' / 'Model_v2.PTH')
    assert one_error(run_script(workdir, 'train_bio.py', *TINY, '--out_dir=held', check=False)) == (
        "error: held already holds a run's files (held/Model_v2.PTH); start the new run with another --out_dir")
    assert not (workdir / 'new').exists() and os.listdir(workdir / 'held') == ['Model_v2.PTH']


def test_a_run_killed_before_it_saved_leaves_its_folder_free(workdir):
    # what `kill -9` (or a second Ctrl-C) leaves of a new run before its first save: the claim, its lock not held
    (workdir / 'killed').mkdir()
    (workdir / 'killed' / 'log.jsonl').write_text('')
    (workdir / 'killed' / '.lock').write_text('\nprocess 1 on elsewhere: train_bio.py')
    run_script(workdir, 'train_bio.py', *TINY, '--max_iters=1', '--eval_interval=1', '--out_dir=killed')
    assert sorted(os.listdir(workdir / 'killed')) == ['ckpt.pt', 'ckpt_best.pt', 'log.jsonl']


def test_a_folder_in_the_way_of_a_file_is_one_line_and_leaves_no_temporary(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'out')
    os.remove(workdir / 'out' / 'ckpt_best.pt')
    (workdir / 'out' / 'ckpt_best.pt').mkdir()  # a folder where the best copy goes
    checkpoint = load(workdir / 'out' / 'ckpt.pt')
    checkpoint['best_val_loss'] = float('inf')
    torch.save(checkpoint, workdir / 'out' / 'ckpt.pt')
    before = (workdir / 'out' / 'ckpt.pt').read_bytes()
    assert one_error(run_script(workdir, 'train_bio.py', *RESUME, '--max_iters=6', '--eval_interval=2', check=False)) == (
        'error: could not write out/ckpt_best.pt (Is a directory)')
    assert (workdir / 'out' / 'ckpt.pt').read_bytes() == before
    assert sorted(os.listdir(workdir / 'out')) == ['ckpt.pt', 'ckpt_best.pt', 'log.jsonl']
    (workdir / 'plots' / 'loss_summary.json').mkdir(parents=True)
    assert one_error(run_script(workdir, 'analysis/plot_loss.py', 'out', '--out_dir=plots', check=False)) == (
        'error: could not write plots/loss_summary.json (Is a directory)')


def test_ctrl_c_while_starting_is_quiet_and_leaves_nothing(workdir):
    # a fresh interpreter: the signal comes as the settings are read, before torch is imported
    proc = subprocess.Popen([sys.executable, 'train_bio.py', *TINY, '--out_dir=new'], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # the first setting's echo
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = first + err
    assert proc.returncode == 130 and 'Traceback' not in err, err
    assert [line for line in message_lines(err) if line] == ['interrupted before training started: nothing was saved'], err
    assert not (workdir / 'new').exists()


# train_bio.py as `python train_bio.py ARGS` runs it, with a stderr that sends the process Ctrl-C once a line
# starting with the first argument is written: a signal at a chosen point, not after a chosen delay
INTERRUPTED_AFTER = """
import os, runpy, signal, sys
class Interrupting:
    def __init__(self, stream, start):
        self.stream, self.start = stream, start
    def write(self, text):
        written = self.stream.write(text)
        if text.startswith(self.start):
            os.kill(os.getpid(), signal.SIGINT)
        return written
    def __getattr__(self, name):
        return getattr(self.stream, name)
sys.stderr = Interrupting(sys.stderr, sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_ctrl_c_before_the_claim_keeps_what_was_printed(workdir, tiny_run):
    # stdout to a pipe is buffered (as under `| tee`) once PYTHONUNBUFFERED is unset; the signal comes at the stderr
    # note that follows stdout's first lines, before the run has its folder
    env = {name: value for name, value in os.environ.items() if name != 'PYTHONUNBUFFERED'}
    proc = subprocess.run([sys.executable, '-c', INTERRUPTED_AFTER, "note: the checkpoint's architecture is kept",
                           'train_bio.py', *TINY, f'--init_from={tiny_run / "ckpt.pt"}', '--n_layer=3', '--out_dir=new',
                           '--max_iters=2'], cwd=workdir, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 130 and proc.stdout.startswith('device cpu'), (proc.stdout, proc.stderr)
    assert proc.stderr.splitlines()[-1] == 'interrupted before training started: nothing was saved', proc.stderr
    assert not (workdir / 'new').exists()


class SlowHub(BaseHTTPRequestHandler):
    """A hub whose every file is 64 MiB that arrive 1 MiB a second: a download in progress to interrupt."""
    protocol_version = 'HTTP/1.1'
    size = 64 * 2 ** 20

    def head(self):
        self.send_response(200)
        for name, value in (('Content-Length', self.size), ('ETag', '"e0"'), ('X-Repo-Commit', 'a' * 40),
                            ('Content-Type', 'application/octet-stream')):
            self.send_header(name, str(value))
        self.end_headers()

    def do_HEAD(self):
        self.head()

    def do_GET(self):
        if '/resolve/' not in self.path:  # the library's other calls: nothing here
            self.send_response(404)
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        self.head()
        try:
            for _ in range(self.size // 2 ** 20):
                self.wfile.write(bytes(2 ** 20))
                self.wfile.flush()
                time.sleep(1)
        except OSError:  # the client has gone
            pass

    def log_message(self, *args):
        pass


def test_ctrl_c_during_a_hub_download_leaves_no_partial_file(workdir, tmp_path):
    hub = ThreadingHTTPServer(('127.0.0.1', 0), SlowHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {**{name: value for name, value in os.environ.items() if name not in ('HF_HUB_OFFLINE', 'HUGGINGFACE_HUB_CACHE')},
           'HF_ENDPOINT': f'http://127.0.0.1:{hub.server_address[1]}', 'HF_HUB_CACHE': str(tmp_path / 'hf'),
           'HF_HUB_DISABLE_XET': '1', 'NO_PROXY': '127.0.0.1'}
    proc = subprocess.Popen([sys.executable, 'train_bio.py', *TINY, '--init_from=hf:someone/model/ckpt.pt',
                             '--out_dir=new'], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / 'hf').rglob('*.incomplete')):  # the download has begun
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        hub.shutdown()
        hub.server_close()
    assert proc.returncode == 130 and b'Traceback' not in err, err
    assert err.decode().splitlines()[-1] == 'interrupted before training started: nothing was saved', err
    assert not list((tmp_path / 'hf').rglob('*.incomplete')) and not (workdir / 'new').exists()


def test_a_compile_that_fails_is_one_line_and_leaves_no_claim(workdir):
    env = {**os.environ, 'CXX': '/nonexistent/c++'}  # as on a machine without a C++ compiler
    proc = run_script(workdir, 'train_bio.py', *TINY, '--max_iters=2', '--compile=True', '--out_dir=new',
                      check=False, env=env)
    assert re.fullmatch(r'error: torch\.compile failed \(.*C\+\+ compiler.*\); train without it: --compile=False',
                        one_error(proc))
    assert not (workdir / 'new').exists()  # no empty log.jsonl refusing the next run
    run_script(workdir, 'train_bio.py', *TINY, '--max_iters=1', '--eval_interval=1', '--out_dir=new')


def test_bench_and_compare_check_settings_before_measuring_or_training(workdir):
    for args, message in ((['--block_size=0'], 'error: block_size=0 is not a whole number from 1 to 65,536'),
                          (['--n_head=3', '--n_embd=32'], 'error: n_embd=32 is not a multiple of n_head=3'),
                          (['--bench_out=train_bio.py/x.json'], None)):
        proc = run_script(workdir, 'bench_bio.py', *TINY, *args, check=False)
        line = one_error(proc)
        assert message is None or line == message, line
    assert 'device' not in proc.stdout  # refused before measuring anything
    proc = run_script(workdir, 'analysis/compare_runs.py', '--config=config_shakespeare_char_cpu.py', '--runs_dir=runs',
                      '--arms', 'five:n_head=5,n_embd=128', 'gelu:use_bio_mlp=False', check=False)
    assert one_error(proc) == 'error: arm five: n_embd=128 is not a multiple of n_head=5'
    proc = run_script(workdir, 'analysis/compare_runs.py', '--config=config_shakespeare_char_cpu.py', '--runs_dir=runs',
                      '--set', 'dataset=tiny', 'device=cpu', 'max_iters=2', '--arms', 'gelu:use_bio_mlp=False',
                      'nowhere:dataset=nope', check=False)
    assert one_error(proc).startswith('error: arm nowhere: ') and 'data/nope' in proc.stderr
    assert not (workdir / 'runs').exists()


def test_logs_with_values_that_are_not_numbers_are_skipped(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'out')
    with open(workdir / 'out' / 'log.jsonl', 'a') as f:
        f.write(json.dumps({'iter': 'six', 'train_loss': 1.0, 'val_loss': 1.0}) + '\n')
        f.write(json.dumps({'iter': 7, 'train_loss': None, 'val_loss': 1.0}) + '\n')
        f.write('{"iter": 8, "train_loss": 1%s, "val_loss": 1.0}\n' % ('0' * 400))  # past a float's range
        f.write(json.dumps({'iter': 9.0, 'train_loss': 1.0, 'val_loss': 1.0}) + '\n')  # an iteration is a count
    run_script(workdir, 'analysis/plot_loss.py', 'out', '--out_dir=plots')
    assert json.loads((workdir / 'plots' / 'loss_summary.json').read_text())['out']['best_val_iter'] in (0, 2, 4)
    shutil.copytree(workdir / 'out', workdir / 'runs' / 'bio-seed1337')
    # a run still training (or stopped short) has no final loss yet: left out of the table, and said
    shutil.copytree(tiny_run, workdir / 'runs' / 'gelu-seed1337')
    ckpt = load(workdir / 'runs' / 'gelu-seed1337' / 'ckpt.pt')
    ckpt['config']['max_iters'] = ckpt['iter_num'] + 1
    torch.save(ckpt, workdir / 'runs' / 'gelu-seed1337' / 'ckpt.pt')
    proc = run_script(workdir, 'analysis/compare_runs.py', '--runs_dir=runs', '--tabulate', '--arms', 'bio:',
                      'gelu:use_bio_mlp=False')
    assert f"gelu-seed1337: not finished (iter {ckpt['iter_num']} of {ckpt['iter_num'] + 1}); left out" in proc.stdout
    assert list(json.loads((workdir / 'runs' / 'compare.json').read_text())['runs']) == ['bio-seed1337']
