"""
A matched bio-vs-GELU comparison: the same config, data and seeds, only the MLP differs.

    python analysis/compare_runs.py --config config_shakespeare_char_cpu.py --seeds 3
    python analysis/compare_runs.py --tabulate --runs_dir runs-compare       (existing runs only)

Each run is train_bio.py in its own folder, <runs_dir>/<arm>-seed<seed> (arm bio or gelu, seeds
1337, 1338, ...). Finished runs are not trained again and unfinished ones are resumed from their
checkpoint; a folder whose run was trained with other settings than asked stops the comparison
with a one-line error, untouched. Then it reports best and final val loss per run, mean and
standard deviation per arm, the paired difference bio - gelu per seed with a 95% t interval, and
the val curves overlaid (compare_curves.png, compare.json in --out_dir).
"""
import argparse
import contextlib
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure, fail, script_defaults  # noqa: E402
ARMS = {'bio': 'True', 'gelu': 'False'}  # arm name -> --use_bio_mlp
# two-sided 95% critical values of Student's t for 1..30 degrees of freedom (30's beyond: slightly wide)
T_95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def read_evals(run_dir):
    """[(iter, val_loss)] of a run's log.jsonl, skipping a torn last line."""
    evals = []
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if 'val_loss' in record:
                evals.append((record['iter'], record['val_loss']))
    return evals


def settings_differ(saved, settings):
    """The settings of a saved run (its checkpoint's config) that differ from what the train_bio.py arguments
    ask for. Settings the saved run did not know yet, init_from and the folder's name are not compared."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # the configurator echoes every setting it applies
            asked = configure(script_defaults(os.path.join(REPO, 'train_bio.py')), settings)
    except SystemExit:  # a bad --set or config file: its one-line error
        sys.stderr.write(''.join(line for line in captured.getvalue().splitlines(True) if line.startswith('error: ')))
        raise
    return [f'{k} {saved[k]!r} -> {v!r}' for k, v in asked.items()
            if k in saved and v != saved[k] and k not in ('init_from', 'out_dir')]


def train(args, arm, seed, run_dir):
    """Run train_bio.py for one arm and seed: from scratch, or on from the checkpoint an unfinished run left.
    A run folder whose checkpoint was trained with other settings is never touched."""
    settings = [args.config, *[f'--{kv}' for kv in args.set], f'--seed={seed}', f'--use_bio_mlp={ARMS[arm]}',
                f'--out_dir={run_dir}']
    resume = []
    ckpt_path = os.path.join(run_dir, 'ckpt.pt')
    if os.path.isfile(ckpt_path):
        checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)
        differing = settings_differ(checkpoint['config'], settings)
        if differing:
            fail(f"{run_dir} holds a run with other settings ({', '.join(differing)}); pass another --runs_dir, "
                 'or move that folder away')
        if checkpoint['iter_num'] >= checkpoint['config']['max_iters']:
            print(f'{run_dir}: done already')
            return
        print(f"{run_dir}: resuming at iter {checkpoint['iter_num']}")
        resume = ['--init_from=resume']
    command = [sys.executable, os.path.join(REPO, 'train_bio.py'), *settings, *resume]
    print(f"{run_dir}: {' '.join(command[1:])}", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'train.out'), 'a') as out:  # a resumed run's output follows its first part
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        fail(f'{run_dir} failed (exit {code}); see {run_dir}/train.out')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help='the train_bio.py config both arms use')
    parser.add_argument('--seeds', type=int, default=3, help='seeds 1337, 1338, ... (one run per arm each)')
    parser.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='more train_bio.py settings')
    parser.add_argument('--runs_dir', default='runs-compare')
    parser.add_argument('--tabulate', action='store_true', help='only report the runs already in --runs_dir')
    parser.add_argument('--out_dir', default=None, help='where the table and plot go (default: --runs_dir)')
    args = parser.parse_args()
    out_dir = args.out_dir or args.runs_dir

    if not args.tabulate:
        if not args.config or not os.path.isfile(args.config):
            fail(f'config file {args.config!r} not found (give --config, e.g. config_shakespeare_char_cpu.py)')
        for kv in args.set:
            if '=' not in kv:
                fail(f'--set takes key=value pairs, got {kv!r}')
        for seed in range(1337, 1337 + args.seeds):
            for arm in ARMS:
                train(args, arm, seed, os.path.join(args.runs_dir, f'{arm}-seed{seed}'))

    runs = {}  # (arm, seed) -> [(iter, val_loss)]
    if os.path.isdir(args.runs_dir):
        for name in sorted(os.listdir(args.runs_dir)):
            match = re.fullmatch(r'(bio|gelu)-seed(\d+)', name)
            if match and os.path.isfile(os.path.join(args.runs_dir, name, 'log.jsonl')):
                evals = read_evals(os.path.join(args.runs_dir, name))
                if evals:
                    runs[match[1], int(match[2])] = evals
    if not runs:
        fail(f'no runs with evaluations in {args.runs_dir} (folders named bio-seed<N> / gelu-seed<N>)')

    table = {f'{arm}-seed{seed}': {'arm': arm, 'seed': seed, 'best_val_loss': min(v for _, v in evals),
                                   'final_val_loss': evals[-1][1], 'final_iter': evals[-1][0]}
             for (arm, seed), evals in sorted(runs.items())}
    print(f"\n{'run':16s} {'best val':>9s} {'final val':>9s} {'at iter':>8s}")
    for name, row in table.items():
        print(f"{name:16s} {row['best_val_loss']:9.4f} {row['final_val_loss']:9.4f} {row['final_iter']:8d}")
    report = {'runs': table, 'arms': {}, 'paired': {}}
    for arm in ARMS:
        for key in ('best_val_loss', 'final_val_loss'):
            values = [row[key] for row in table.values() if row['arm'] == arm]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                report['arms'].setdefault(arm, {})[key] = {'mean': statistics.mean(values), 'std': std, 'n': len(values)}
    print(f"\n{'arm':6s} {'best val mean +- std':>24s} {'final val mean +- std':>24s}")
    for arm, stats in report['arms'].items():
        cells = [f"{stats[k]['mean']:.4f} +- {stats[k]['std']:.4f} (n={stats[k]['n']})" for k in ('best_val_loss', 'final_val_loss')]
        print(f'{arm:6s} {cells[0]:>24s} {cells[1]:>24s}')
    seeds = sorted({seed for arm, seed in runs if (('bio', seed) in runs and ('gelu', seed) in runs)})
    for key in ('best_val_loss', 'final_val_loss'):
        diffs = [table[f'bio-seed{s}'][key] - table[f'gelu-seed{s}'][key] for s in seeds]
        if len(diffs) >= 2:
            mean, std = statistics.mean(diffs), statistics.stdev(diffs)
            half = T_95[min(len(diffs) - 1, 30) - 1] * std / math.sqrt(len(diffs))
            report['paired'][key] = {'differences': diffs, 'mean': mean, 'std': std, 'ci95': [mean - half, mean + half]}
            print(f'paired bio - gelu, {key}: {mean:+.4f}, 95% interval [{mean - half:+.4f}, {mean + half:+.4f}] '
                  f'over {len(diffs)} seeds (negative: bio lower)')
        elif diffs:
            report['paired'][key] = {'differences': diffs}
            print(f'paired bio - gelu, {key}: {diffs[0]:+.4f} (one seed: no interval)')

    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for (arm, seed), evals in sorted(runs.items()):
        ax.plot([i for i, _ in evals], [v for _, v in evals], color='tab:red' if arm == 'bio' else 'tab:blue',
                alpha=0.8, label=f'{arm} seed {seed}')
    ax.set_xlabel('iteration')
    ax.set_ylabel('val loss')
    ax.set_title('bio (red) vs GELU (blue)')
    ax.legend(fontsize=7)
    fig.savefig(os.path.join(out_dir, 'compare_curves.png'), dpi=120)
    with open(os.path.join(out_dir, 'compare.json'), 'w') as f:
        json.dump(report, f, indent=2)
    print(f'wrote {out_dir}/compare_curves.png and compare.json')


if __name__ == '__main__':
    main()
