"""
Issue 30's hostile cases, each tried as a user would, against the repository at the path given (this one, or
a checkout of an older commit to see what it did): for each, the command, its exit code, its first line on
stderr (and a traceback's last), and what it wrote (paths created, changed, removed; what a planted link's
victim folder holds). Takes a few minutes on a CPU; it works in a temporary folder and removes it.

    python dev/hostile_cases.py .
    git worktree add /tmp/before 9f78f3f && python dev/hostile_cases.py /tmp/before
"""
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.abspath(sys.argv[1])
WORK = tempfile.mkdtemp(prefix='findings-')
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
TINY = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16',
        '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_iters=2', '--log_interval=1',
        '--warmup_iters=2', '--lr_decay_iters=40', '--learning_rate=1e-2', '--dataset=tiny']
CHARS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX'
sys.path.insert(0, REPO)
import prepared_data  # noqa: E402


def dataset(name, chars, train, val):
    folder = os.path.join(WORK, 'data', name)
    os.makedirs(folder)
    staging = prepared_data.staging_dir(folder)
    np.asarray(train, dtype=np.uint16).tofile(os.path.join(staging, 'train.bin'))
    np.asarray(val, dtype=np.uint16).tofile(os.path.join(staging, 'val.bin'))
    if chars:
        with open(os.path.join(staging, 'meta.pkl'), 'wb') as f:
            pickle.dump({'vocab_size': len(chars), 'itos': dict(enumerate(chars))}, f)
    prepared_data.commit(folder, 'findings')


def setup():
    for name in os.listdir(REPO):
        if name.endswith('.py'):
            shutil.copy(os.path.join(REPO, name), WORK)
    shutil.copytree(os.path.join(REPO, 'analysis'), os.path.join(WORK, 'analysis'))
    rng = np.random.default_rng(0)
    dataset('tiny', CHARS, rng.integers(0, 50, 4000), rng.integers(0, 50, 1000))
    dataset('otherchar', CHARS[1] + CHARS[0] + CHARS[2:], rng.integers(0, 50, 4000), rng.integers(0, 50, 1000))
    dataset('tokens', None, rng.integers(0, 50257, 4000), rng.integers(0, 50257, 1000))
    os.makedirs(os.path.join(WORK, 'victim'))
    subprocess.run([sys.executable, 'train_bio.py', *TINY, '--max_iters=4', '--eval_interval=2', '--out_dir=base'],
                   cwd=WORK, env=ENV, capture_output=True, check=True)


def snapshot():
    found = {}
    for root, dirs, names in os.walk(WORK):
        if os.path.relpath(root, WORK).split(os.sep)[0] in ('data', '__pycache__', 'analysis') or '__pycache__' in root:
            continue
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, WORK)
            if os.path.islink(path):
                found[rel] = 'link->' + os.readlink(path)
            else:
                found[rel] = hashlib.sha1(open(path, 'rb').read()).hexdigest()[:8]
    return found


def fresh(name, source='base'):
    path = os.path.join(WORK, name)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(os.path.join(WORK, source), path)
    return path


def show(label, args, popen=None, stdin='', preexec=None, env=None):
    before = snapshot()
    if popen is None:
        proc = subprocess.run([sys.executable, *args], cwd=WORK, env=env or ENV, capture_output=True, text=True,
                              input=stdin, timeout=600, preexec_fn=preexec)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = popen
    after = snapshot()
    lines = [l for l in err.strip().splitlines() if l.strip() and not l.startswith('config: ') and '%|' not in l]
    first = lines[0] if lines else ''
    last = lines[-1] if lines and 'Traceback' in err else ''
    created = sorted(k for k in after if k not in before)
    changed = sorted(k for k in after if k in before and after[k] != before[k])
    removed = sorted(k for k in before if k not in after)
    victim = sorted(k for k in after if k.startswith('victim' + os.sep))
    print(f'### {label}\n    $ python {" ".join(args)}\n    exit {code}; first line: {first[:300]}')
    if last:
        print(f'    traceback ends: {last[:300]}')
    print(f'    written: created {created or "-"}; changed {changed or "-"}; removed {removed or "-"}; victim holds {victim or "nothing"}')
    sys.stdout.flush()
    return after


def plant(folder, names):
    for name in names:
        os.symlink(os.path.join(WORK, 'victim', name.replace('/', '_')), os.path.join(WORK, folder, name))


def main():
    setup()
    print(f'repository: {REPO}\n')
    # 1. two resumes at once
    fresh('two')
    a = subprocess.Popen([sys.executable, 'train_bio.py', *TINY, '--init_from=resume', '--out_dir=two',
                          '--max_iters=100000', '--eval_interval=100000'], cwd=WORK, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in a.stdout:
        if line.startswith('iter 6:'):
            break
    show('two resumes at once (the second, another learning rate)', ['train_bio.py', *TINY, '--init_from=resume',
         '--out_dir=two', '--learning_rate=3e-3', '--max_iters=8', '--eval_interval=2'])
    a.send_signal(signal.SIGINT)
    _, err = a.communicate()
    print(f'    the first, after Ctrl-C: exit {a.returncode}; log.jsonl iters: '
          f"{[json.loads(l)['iter'] for l in open(os.path.join(WORK, 'two', 'log.jsonl'))]}; "
          f"ckpt.pt learning_rate: {torch.load(os.path.join(WORK, 'two', 'ckpt.pt'), weights_only=True)['config']['learning_rate']}")
    # 2. links planted
    fresh('links')
    plant('links', ['ckpt.pt.tmp', 'ckpt_best.pt.tmp', 'log.jsonl.tmp'])
    show('resume with dangling ckpt.pt.tmp, ckpt_best.pt.tmp, log.jsonl.tmp links',
         ['train_bio.py', *TINY, '--init_from=resume', '--out_dir=links', '--max_iters=8', '--eval_interval=2'])
    for n in os.listdir(os.path.join(WORK, 'victim')):
        os.remove(os.path.join(WORK, 'victim', n))
    fresh('ex_run')
    subprocess.run([sys.executable, 'export_hub.py', '--out_dir=ex_run', '--export_dir=exported'], cwd=WORK, env=ENV,
                   capture_output=True, check=True)
    plant('exported', ['README.md.tmp', 'eval_results.json.tmp'])
    show('eval_bio into an exported folder with README.md.tmp and eval_results.json.tmp links',
         ['eval_bio.py', '--ckpt=exported', '--tasks=val', '--max_tokens=64'])
    for n in os.listdir(os.path.join(WORK, 'victim')):
        os.remove(os.path.join(WORK, 'victim', n))
    shutil.rmtree(os.path.join(WORK, 'exported'))
    subprocess.run([sys.executable, 'export_hub.py', '--out_dir=ex_run', '--export_dir=exported'], cwd=WORK, env=ENV,
                   capture_output=True, check=True)
    plant('exported', ['README.new.md'])
    show('export_hub over an earlier export whose README.new.md is a link',
         ['export_hub.py', '--out_dir=ex_run', '--export_dir=exported'])
    for n in os.listdir(os.path.join(WORK, 'victim')):
        os.remove(os.path.join(WORK, 'victim', n))
    fresh('inject')
    ck = torch.load(os.path.join(WORK, 'inject', 'ckpt.pt'), weights_only=True)
    injected = '|\n\n## Injected\n[click me](https://evil.example)\n<script>'
    ck['config'][injected] = 1
    torch.save(ck, os.path.join(WORK, 'inject', 'ckpt.pt'))
    show('export_hub of a checkpoint whose config key holds Markdown and HTML',
         ['export_hub.py', '--out_dir=inject', '--export_dir=injected'])
    card = open(os.path.join(WORK, 'injected', 'README.md')).read()
    print(f"    card: a '## Injected' heading line: {any(l.startswith('## Injected') for l in card.splitlines())}; "
          f"'<script>' in it: {'<script>' in card}; '[click me](https' in it: {'[click me](https' in card}")
    # 3. data that changed under a checkpoint
    fresh('other')
    show('resume --dataset=otherchar (50 other characters, same vocabulary size)',
         ['train_bio.py', *TINY, '--init_from=resume', '--out_dir=other', '--dataset=otherchar', '--max_iters=6'])
    shutil.rmtree(os.path.join(WORK, 'data', 'tiny'))  # prepared again, from other text: 48 characters
    rng = np.random.default_rng(1)
    dataset('tiny', CHARS[:48], rng.integers(0, 48, 4000), rng.integers(0, 48, 1000))
    show('eval_bio --tasks=val after data/tiny was prepared again with 48 characters',
         ['eval_bio.py', '--ckpt=base/ckpt.pt', '--tasks=val', '--out=reprepared.json'])
    show('sample_bio after data/tiny was prepared again with 48 characters',
         ['sample_bio.py', '--out_dir=base', '--start=ab', '--max_new_tokens=200', '--num_samples=1'])
    shutil.rmtree(os.path.join(WORK, 'data', 'tiny'))
    rng = np.random.default_rng(0)
    dataset('tiny', CHARS, rng.integers(0, 50, 4000), rng.integers(0, 50, 1000))
    # 4. non-finite
    ck = torch.load(os.path.join(WORK, 'base', 'ckpt.pt'), weights_only=True)
    ck['model']['transformer.h.0.attn.c_attn.weight'][0, 0] = float('nan')
    os.makedirs(os.path.join(WORK, 'nanrun'))
    torch.save(ck, os.path.join(WORK, 'nanrun', 'ckpt.pt'))
    show('eval_bio of NaN weights, --out', ['eval_bio.py', '--ckpt=nanrun/ckpt.pt', '--tasks=val', '--out=nan.json'])
    subprocess.run([sys.executable, 'export_hub.py', '--out_dir=base', '--export_dir=nanexport'], cwd=WORK, env=ENV,
                   capture_output=True, check=True)
    from safetensors.torch import load_file, save_file
    weights = load_file(os.path.join(WORK, 'nanexport', 'model.safetensors'))
    weights['transformer.h.0.attn.c_attn.weight'][0, 0] = float('nan')
    save_file(weights, os.path.join(WORK, 'nanexport', 'model.safetensors'), metadata={'format': 'pt'})
    show('eval_bio of NaN weights in an exported folder', ['eval_bio.py', '--ckpt=nanexport', '--tasks=val'])
    show('sample_bio of NaN weights', ['sample_bio.py', '--out_dir=nanrun', '--max_new_tokens=5', '--start=ab'])
    show('sample_bio of NaN weights, temperature 0', ['sample_bio.py', '--out_dir=nanrun', '--max_new_tokens=5',
                                                      '--temperature=0', '--start=ab'])
    from dataclasses import asdict
    from model_bio import GPT, GPTConfig
    config = GPTConfig(vocab_size=50304, n_layer=1, n_head=2, n_embd=32, block_size=64)
    weights = GPT(config).state_dict()
    weights['transformer.h.0.attn.c_attn.weight'][0, 0] = float('nan')
    os.makedirs(os.path.join(WORK, 'nanbpe'))
    torch.save({'model': weights, 'model_args': asdict(config), 'config': {'dataset': 'openwebtext'}, 'iter_num': 0,
                'best_val_loss': float('inf'), 'format_version': 1}, os.path.join(WORK, 'nanbpe', 'ckpt.pt'))
    show('chat of NaN weights (a GPT-2 vocabulary model)', ['chat.py', '--out_dir=nanbpe', '--ckpt=ckpt.pt',
                                                            '--max_new_tokens=5'], stdin='hello\n')
    show('train_bio --init_from= a NaN checkpoint', ['train_bio.py', *TINY, '--init_from=nanrun/ckpt.pt',
                                                     '--out_dir=fromnan', '--max_iters=2'])
    # 5. config files that exit
    open(os.path.join(WORK, 'exits.py'), 'w').write('import sys\nsys.exit(0)\n')
    open(os.path.join(WORK, 'quits.py'), 'w').write('exit()\n')
    for script in ('train_bio.py', 'sample_bio.py'):
        for config in ('exits.py', 'quits.py'):
            show(f'{script} with a config file that exits', [script, config])
    # 6. bench_bio's settings
    for extra in (['--block_size=0'], ['--n_head=3'], ['--bench_out=train_bio.py/x.json']):
        start = time.time()
        show(f'bench_bio {extra[0]}', ['bench_bio.py', *TINY, '--part=act', '--rounds=1', '--act_calls=1', *extra])
        print(f'    took {time.time() - start:.1f} s')
    # 7. logs with strings and nulls
    fresh('badlog')
    with open(os.path.join(WORK, 'badlog', 'log.jsonl'), 'a') as f:
        f.write(json.dumps({'iter': 'six', 'train_loss': 1.0, 'val_loss': 1.0}) + '\n')
        f.write(json.dumps({'iter': 7, 'train_loss': None, 'val_loss': 1.0}) + '\n')
        f.write(json.dumps({'iter': 8, 'train_loss': 1.0, 'val_loss': 'low'}) + '\n')
        f.write(json.dumps({'iter': 9, 'loss': None, 'lr': 0.01}) + '\n')
    show('plot_loss on a log.jsonl with a string and a null value', ['analysis/plot_loss.py', 'badlog', '--out_dir=plots'])
    os.makedirs(os.path.join(WORK, 'runs'), exist_ok=True)
    fresh('runs/bio-seed1337', 'badlog')
    show('compare_runs --tabulate over it', ['analysis/compare_runs.py', '--runs_dir=runs', '--tabulate',
                                             '--arms', 'bio:', 'gelu:use_bio_mlp=False'])
    # 8. disk full, Ctrl-C early, compile without a compiler
    fresh('full')

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    show('disk full during torch.save (RLIMIT_FSIZE 20 kB)', ['train_bio.py', *TINY, '--init_from=resume',
         '--out_dir=full', '--max_iters=6', '--eval_interval=2'], preexec=small_files)
    proc = subprocess.Popen([sys.executable, 'train_bio.py', *TINY, '--out_dir=early'], cwd=WORK, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    show('Ctrl-C one second after starting', ['train_bio.py', *TINY, '--out_dir=early'], popen=(proc.returncode, err))
    show('--compile=True without a C++ compiler (CXX=/nonexistent)', ['train_bio.py', *TINY, '--compile=True',
         '--out_dir=nocxx', '--max_iters=2'], env={**ENV, 'CXX': '/nonexistent/c++'})
    show('the same run again, without compile', ['train_bio.py', *TINY, '--out_dir=nocxx', '--max_iters=2'])
    show('--wandb_log=True without wandb', ['train_bio.py', *TINY, '--wandb_log=True', '--out_dir=wb', '--max_iters=2'])
    show('the same run again, without wandb', ['train_bio.py', *TINY, '--out_dir=wb', '--max_iters=2'])
    # 9. the rest
    show('compare_runs with an arm n_head=5 (n_embd 128)', ['analysis/compare_runs.py',
         '--config=config_shakespeare_char_cpu.py', '--runs_dir=runs5', '--seeds=1', '--set', 'max_iters=2',
         'dataset=tiny', 'device=cpu', '--arms', 'five:n_head=5', 'gelu:use_bio_mlp=False'])
    show('finetune_native --dataset=tokens (a token stream)', ['finetune_native.py', *TINY, '--dataset=tokens',
                                                               '--out_dir=ft'])
    show('finetune_native --learning_rate=nan', ['finetune_native.py', *TINY, '--learning_rate=nan', '--out_dir=ft'])
    os.makedirs(os.path.join(WORK, 'pth'))
    shutil.copy(os.path.join(WORK, 'base', 'ckpt.pt'), os.path.join(WORK, 'pth', 'model_v2.pth'))
    show('train into a folder holding model_v2.pth', ['train_bio.py', *TINY, '--out_dir=pth', '--max_iters=2'])
    fresh('cc')
    proc = subprocess.Popen([sys.executable, 'train_bio.py', *TINY, '--init_from=resume', '--out_dir=cc',
                             '--max_iters=100000', '--eval_interval=100000'], cwd=WORK, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith('iter 6:'):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    show('Ctrl-C during training (it saves)', ['train_bio.py', *TINY, '--init_from=resume', '--out_dir=cc'],
         popen=(proc.returncode, err))
    shutil.rmtree(WORK)


main()
