"""
A matched comparison of training arms that differ in one setting: the same config, data and seeds.
By default bio vs GELU; each arm may be swept over learning rates and is then judged at its own best.

    python analysis/compare_runs.py --config config_shakespeare_char_cpu.py --seeds 3
    python analysis/compare_runs.py --config config_shakespeare_char_cpu.py --seeds 3 --lrs 1e-3 2e-3 3e-3 5e-3
    python analysis/compare_runs.py --config config_shakespeare_char_cpu.py --lrs 1e-3 3e-3 \\
        --arms muon:optimizer=muon adamw:optimizer=adamw
    python analysis/compare_runs.py --tabulate --runs_dir runs-compare       (existing runs only)
    python analysis/compare_runs.py --evals wiggle.json gpt2.json --labels wiggle gpt2   (eval_bio.py results)

An arm is NAME:key=value[,key=value...] (train_bio.py settings); the last arm is the baseline the
others are measured against. One arm alone trains and reports its own sweep: a way to add an arm,
with rates of its own, to a --runs_dir that a later --tabulate --arms ... compares. Default: bio:mlp=bio gelu:mlp=gelu,use_sparse_gate=False.
--lrs: each run gets learning_rate=LR, and the config's other rates (min_lr, muon_learning_rate)
are scaled with it, so the schedule's shape stays as configured. --grid_seeds N (with --lrs): the
rates are swept on the first N seeds only, and the other seeds train each arm at its best rate on
those (lowest mean final val loss; ties: the lowest rate), for arms too slow to sweep on every seed. An arm
whose best rate is the lowest or highest of its grid gets another rate 3x beyond it (on the grid's seeds),
up to 3 times, until the grid brackets its best; a best still at an edge is marked as such in the output:

    python analysis/compare_runs.py --config config_shakespeare_char_cpu.py --seeds 3 --grid_seeds 1 \
        --lrs 1.5e-3 3e-3 6e-3 --arms v2:bio_variant=v2 v3:bio_variant=v3

Each run is train_bio.py in its own folder, <runs_dir>/<arm>-seed<seed> (with --lrs:
<arm>-lr<lr>-seed<seed>), seeds 1337, 1338, .... Finished runs are not trained again and unfinished
ones are resumed from their checkpoint; a folder whose run was trained with other settings than
asked stops the comparison with a one-line error, untouched. It reports best and final val loss per
run (a run still training, or stopped short of its max_iters, is left out, and said); per arm and learning rate the mean and standard deviation over seeds; each arm's best learning
rate (lowest mean final val loss among its rates run on the most seeds, so that a --grid_seeds
sweep's one-seed rates are shown but not picked); at those, each arm's paired difference from the baseline per seed
with a 95% t interval and the iterations it needs to reach the baseline's mean final val loss; and, compute-matched,
the paired difference of each arm's val loss where the baseline's run ended by its steps' wall clock and by its
training FLOPs (6 per parameter and attention's products per token; read between evaluations; train_bio.py's
logs hold both), so that what an arm's step costs more is charged to it. The wall clock is only as steady as
the machine: runs that share it slow each other. It
writes compare.json, the val curves at the best learning rates (compare_curves.png) and, with
several learning rates, final val loss against learning rate (compare_lr.png) to --out_dir
(default: --runs_dir). --set key=value ... adds train_bio.py settings for every arm.

A run that diverges (train_bio.py stops it for losses or weights that are not finite) counts as an
infinite loss and the sweep goes on. Picking each arm's best rate on the val split that reports it
flatters every arm slightly and alike; the output says so. Other arms: the sparse gate on and off,
or muon:optimizer=muon adamw:optimizer=adamw. A bad argument, or anything train_bio.py refuses in an arm
(its settings, data, init_from: each arm first rehearses two iterations, which write nothing), is one
'error: ' line and exit status 2 before anything trains.

--evals RESULTS ...: no training and no runs, only eval_bio.py's results files side by side: one
column per file (named by --labels, else by the file's ckpt), one row per metric any file holds
(val.loss, bpb.bpb, hellaswag.acc_norm, harness.arc_easy.acc, ...; '-' where a file lacks it). Where
the files measured different data (a task's dataset, split, source, bytes or n differ) a line below
the table names those rows: their tasks' numbers do not compare. Printed, and written to --out_dir
(default analysis_out/evals) as compare_evals.md and compare_evals.json. A results file that is
missing, not JSON, over 1 MB, or holds anything but a finite number where a metric belongs is one
'error: ' line.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import eval_results  # noqa: E402
import run_log  # noqa: E402
from configurator import check_folder, configure, declared_rules, fail, one_line_errors, ruled, script_defaults  # noqa: E402
from files import WriteError, open_append, save_figure, write_file  # noqa: E402
# the sparse gate is part of the oscillating MLP, so the GELU arm goes without it
DEFAULT_ARMS = ['bio:mlp=bio', 'gelu:mlp=gelu,use_sparse_gate=False']
SCALED_WITH_LR = ('min_lr', 'muon_learning_rate')  # rates that follow learning_rate in a sweep
# two-sided 95% critical values of Student's t for 1..30 degrees of freedom (30's beyond: slightly wide)
T_95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
DIVERGED = 'diverged.txt'  # in a run's folder: train_bio.py stopped it for losses or weights that were not finite
GRID_STEP = 3.0  # a rate grid that does not bracket its best is extended by this factor at that side
GRID_EXTENSIONS = 3  # at most this many times per arm; a best still at an edge is marked in the tables
OPTIMISM = ('note: each best learning rate is picked on the same val split its loss is reported on, which '
            'flatters every arm slightly and alike')
# a task's fields that say what it measured: where they differ between files, the files measured different data
SAME_DATA = ('dataset', 'split', 'source', 'bytes', 'n')


def read_evals(run_dir):
    """[(iter, val_loss)] of a run's log.jsonl, skipping a torn last line."""
    # NaN counts as infinitely bad
    return [(r['iter'], r['val_loss'] if math.isfinite(r['val_loss']) else math.inf)
            for r in run_log.read_log(os.path.join(run_dir, 'log.jsonl')) if 'val_loss' in r]


def read_spent(run_dir, measure):
    """[(spent, val_loss)] of a run's evaluations by what the training had spent there: measure 'train_s' (its
    steps' wall clock) or 'flops'; [] unless every evaluation has it (train_bio.py logs both since 2026-12-06; a
    run begun before and resumed after has them only from its resume on)."""
    evals = [r for r in run_log.read_log(os.path.join(run_dir, 'log.jsonl')) if 'val_loss' in r]
    if not all(measure in r for r in evals):
        return []
    return [(r[measure], r['val_loss'] if math.isfinite(r['val_loss']) else math.inf) for r in evals]


def loss_at(curve, spent):
    """The val loss on curve [(spent, val_loss)] (from its first evaluation, at iteration 0) at spent, linear
    between evaluations; None past its last one."""
    if spent <= curve[0][0]:
        return curve[0][1]
    for (a, loss_a), (b, loss_b) in zip(curve, curve[1:]):
        if a <= spent <= b:
            return loss_b if b == a else loss_a + (loss_b - loss_a) * (spent - a) / (b - a)
    return None


def resolve(settings):
    """train_bio.py's settings for these arguments (its defaults, then the config file and --key=value),
    without the configurator's echo; a bad setting ends the comparison with its one-line error."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            train = os.path.join(REPO, 'train_bio.py')
            return configure(script_defaults(train), settings, declared_rules(train))
    except SystemExit:
        sys.stderr.write(''.join(line for line in captured.getvalue().splitlines(True) if line.startswith('error: ')))
        raise


def rehearsal_error(settings):
    """train_bio.py's error for these settings, or None: each arm rehearses two iterations (which write nothing)
    before any run trains, so that an arm train_bio.py refuses (its settings, its data, its init_from) stops the
    comparison at once, not after the arms before it have trained."""
    command = [sys.executable, os.path.join(REPO, 'train_bio.py'), *settings, '--rehearsal_iters=2']
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    errors = [line[len('error: '):] for line in proc.stderr.splitlines() if line.startswith('error: ')]
    return errors[-1] if errors else f'train_bio.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}'


def parse_arms(specs):
    """{name: ['--key=value', ...]} from NAME:key=value,key=value specs."""
    arms = {}
    for spec in specs:
        name, colon, settings = spec.partition(':')
        if not colon:  # a bare name (bio, gelu) would train the config unchanged, the same in every arm
            fail(f'arm {spec!r}: write it NAME:key=value,... (NAME: alone for the config as it is)')
        if not re.fullmatch(r'[A-Za-z0-9_]+', name) or name in arms:
            fail(f'arm {spec!r}: give each arm its own name of letters, digits and _, then :key=value,...')
        pairs = [kv for kv in settings.split(',') if kv]
        if not all('=' in kv for kv in pairs):
            fail(f'arm {spec!r}: its settings are key=value pairs separated by commas')
        arms[name] = [f'--{kv}' for kv in pairs]
    return arms


def run_settings(args, arm_settings, lr, seed, run_dir):
    """The train_bio.py arguments of one run."""
    settings = [args.config, *[f'--{kv}' for kv in args.set], *arm_settings, f'--seed={seed}', f'--out_dir={run_dir}']
    if lr is not None:
        configured = resolve(settings)
        settings.append(f'--learning_rate={lr!r}')
        settings += [f'--{k}={configured[k] * (lr / configured["learning_rate"])!r}' for k in SCALED_WITH_LR]
    return settings


def train(settings, run_dir):
    """Run train_bio.py with these settings: from scratch, or on from the checkpoint an unfinished run left.
    A run folder whose checkpoint was trained with other settings is never touched."""
    import torch  # here, not above: --evals and plot_loss.py (which imports this file) start without it
    resume = []
    ckpt_path = os.path.join(run_dir, 'ckpt.pt')
    if os.path.isfile(ckpt_path):
        from checkpoints import ARCHITECTURE
        from model_bio import settle_mlp
        saved = torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)
        asked = resolve(settings)
        settle_mlp(asked)  # as train_bio.py records them
        # settings the saved run did not know yet, init_from and the folder's name are not compared, nor the
        # architecture of a run started from a checkpoint's weights: that is the checkpoint's
        ignored = ('init_from', 'out_dir', *(ARCHITECTURE if asked['init_from'] != 'scratch' else ()))
        differing = [f'{k} {saved["config"][k]!r} -> {v!r}' for k, v in asked.items()
                     if k in saved['config'] and v != saved['config'][k] and k not in ignored]
        if differing:
            fail(f"{run_dir} holds a run with other settings ({', '.join(differing)}); pass another --runs_dir, "
                 'or move that folder away')
        if os.path.isfile(os.path.join(run_dir, DIVERGED)):
            print(f'{run_dir}: diverged already')
            return
        if saved['iter_num'] >= saved['config']['max_iters']:
            print(f'{run_dir}: done already')
            return
        print(f"{run_dir}: resuming at iter {saved['iter_num']}")
        resume = ['--init_from=resume']
    command = [sys.executable, os.path.join(REPO, 'train_bio.py'), *settings, *resume]
    print(f"{run_dir}: {' '.join(command[1:])}", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    with open_append(os.path.join(run_dir, 'train.out')) as out:  # a resumed run's output follows its first part
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        with open(os.path.join(run_dir, 'train.out')) as f:
            errors = [line for line in f.read().splitlines() if line.startswith('error: ')]
        # a rate too high for the arm: its loss is counted as infinite and the sweep goes on
        if errors and 'not finite' in errors[-1]:
            write_file(os.path.join(run_dir, DIVERGED), errors[-1] + '\n')
            print(f'{run_dir}: diverged ({errors[-1][len("error: "):]}); its loss counts as infinite')
            return
        fail(f'{run_dir} failed (exit {code}); see {run_dir}/train.out')


def progress(run_dir):
    """(iterations trained, max_iters) of the run's checkpoint; None without one."""
    import torch
    ckpt_path = os.path.join(run_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        return None
    saved = torch.load(ckpt_path, map_location='cpu', weights_only=True, mmap=True)
    return saved['iter_num'], saved['config']['max_iters']


def final_val_loss(run_dir):
    """A run's last evaluated val loss; infinite for a run that diverged."""
    evals = read_evals(run_dir)
    return math.inf if os.path.isfile(os.path.join(run_dir, DIVERGED)) or not evals else evals[-1][1]


def grid_best(runs_dir, arm, lrs, grid_seeds):
    """The rate of lrs with the arm's lowest mean final val loss over the first grid_seeds seeds (ties: the
    first listed)."""
    return min(lrs, key=lambda lr: statistics.mean(final_val_loss(os.path.join(runs_dir, run_name(arm, lr, seed)))
                                                  for seed in range(1337, 1337 + grid_seeds)))


def rate_beyond(rates, best):
    """The rate that would make best interior to rates (a grid of two or more): GRID_STEP beyond it at the side
    where it lies, None where it is interior already."""
    if len(rates) < 2 or min(rates) < best < max(rates):
        return None
    return float(f'{best / GRID_STEP if best == min(rates) else best * GRID_STEP:.3g}')


def run_name(arm, lr, seed):
    return f'{arm}-seed{seed}' if lr is None else f'{arm}-lr{lr!r}-seed{seed}'


def interval(values):
    """Mean, standard deviation and 95% t interval of values (no interval for one value)."""
    if not all(math.isfinite(v) for v in values):
        return {'values': values, 'mean': math.inf}
    mean = statistics.mean(values)
    if len(values) < 2:
        return {'values': values, 'mean': mean}
    std = statistics.stdev(values)
    half = T_95[min(len(values) - 1, 30) - 1] * std / math.sqrt(len(values))
    return {'values': values, 'mean': mean, 'std': std, 'ci95': [mean - half, mean + half]}


def difference_text(stats):
    """A paired difference's interval (from interval()) as the report prints it."""
    if 'ci95' in stats:
        return (f"{stats['mean']:+.4f}, 95% interval [{stats['ci95'][0]:+.4f}, {stats['ci95'][1]:+.4f}] over "
                f"{len(stats['values'])} seeds")
    if math.isinf(stats['mean']):
        return '+inf (a run diverged)'
    return f"{stats['mean']:+.4f} (one seed: no interval)"


def read_eval_results(path):
    """(ckpt, {row: value}) of an eval_bio.py results file, its tasks flattened into rows such as val.loss,
    hellaswag.acc_norm and harness.arc_easy.acc; anything but such a file ends the script with one 'error: ' line."""
    if not os.path.isfile(path):
        problem = 'not a file' if os.path.exists(path) else 'no such file'
        fail(f'{path}: {problem}; pass a results file written by eval_bio.py')
    try:
        results = eval_results.read_results(path)
    except ValueError as e:
        fail(str(e))
    rows = eval_results.flat_rows(results)
    if not rows:
        fail(f'{path} holds no results (val, bpb, hellaswag or harness); pass a results file written by eval_bio.py')
    return results.get('ckpt', path), rows


def cell(value):
    """A table's cell: '-' where a file lacks the row, floats to 4 decimals, counts and names as they are."""
    if value is None:
        return '-'
    return f'{value:.4f}' if isinstance(value, float) else str(value)


def compare_evals(paths, labels, out_dir):
    """eval_bio.py's results files side by side, one column each: printed, and written as Markdown and JSON."""
    if labels and len(labels) != len(paths):
        fail(f'{len(paths)} --evals files but {len(labels)} --labels; give one label per file, or none')
    results = [read_eval_results(path) for path in paths]
    labels = labels or [ckpt for ckpt, _ in results]
    if len(set(labels)) < len(labels):
        fail(f'two results files are both labelled {max(labels, key=labels.count)!r}; name them apart with --labels')
    # every row any file holds, in the files' order, eval_bio.py's own tasks before the harness's
    rank = {task: i for i, task in enumerate(eval_results.TASKS)}
    names = sorted(dict.fromkeys(name for _, rows in results for name in rows),
                   key=lambda name: rank.get(name.split('.')[0], len(rank)))
    table = {name: [rows.get(name) for _, rows in results] for name in names}
    differing = [name for name, values in table.items()
                 if name.rsplit('.', 1)[1] in SAME_DATA and len({v for v in values if v is not None}) > 1]
    note = ('note: measured on different data, so these tasks do not compare: '
            + '; '.join(f"{name} {' vs '.join(map(cell, table[name]))}" for name in differing))

    header = ['metric', *labels]
    lines = [header] + [[name, *map(cell, values)] for name, values in table.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print('  '.join([line[0].ljust(widths[0])] + [text.rjust(width) for text, width in zip(line[1:], widths[1:])]))
    markdown = ['| ' + ' | '.join(text.replace('|', '\\|') for text in line) + ' |' for line in lines]
    markdown.insert(1, '|---|' + '---:|' * len(labels))
    if differing:
        print(note)
        markdown += ['', note]
    os.makedirs(out_dir, exist_ok=True)
    write_file(os.path.join(out_dir, 'compare_evals.md'), '\n'.join(markdown) + '\n')
    write_file(os.path.join(out_dir, 'compare_evals.json'), json.dumps({'columns': labels, 'files': paths, 'rows': table, 'different_data': differing}, indent=2))
    print(f'wrote {out_dir}/compare_evals.md and {out_dir}/compare_evals.json')


def main():
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument('--config', help='the train_bio.py config every arm uses')
    parser.add_argument('--seeds', type=ruled(int, '>= 1'), default=3,
                        help='seeds 1337, 1338, ... (one run per arm, rate and seed)')
    parser.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='more train_bio.py settings')
    parser.add_argument('--arms', nargs='+', default=DEFAULT_ARMS, metavar='NAME:KEY=VALUE,...',
                        help='the arms; the last one is the baseline (default: bio vs gelu)')
    parser.add_argument('--grid_seeds', type=ruled(int, '>= 1'), metavar='N',
                        help='with --lrs: sweep the rates on the first N seeds only; the other seeds train each arm '
                             'at its best rate on those (default: every seed at every rate)')
    parser.add_argument('--lrs', nargs='+', type=ruled(float, '> 0'), metavar='LR',
                        help='learning rates to sweep for every arm')
    parser.add_argument('--runs_dir', default='runs-compare')
    parser.add_argument('--tabulate', action='store_true', help='only report the runs already in --runs_dir')
    parser.add_argument('--out_dir', default=None,
                        help='where the tables and plots go (default: --runs_dir; with --evals: analysis_out/evals)')
    parser.add_argument('--evals', nargs='+', metavar='RESULTS',
                        help="eval_bio.py's results files: only their table, side by side; nothing trains")
    parser.add_argument('--labels', nargs='+', help="with --evals: one column name per file (default: its ckpt)")
    args = parser.parse_args()
    if args.labels and not args.evals:
        fail('--labels names the --evals files; give it with --evals')
    if args.grid_seeds and not args.lrs:
        fail('--grid_seeds sweeps the --lrs on the first seeds; give --lrs too')
    if args.evals:
        out_dir = args.out_dir or os.path.join('analysis_out', 'evals')
        check_folder('--out_dir', out_dir)
        compare_evals(args.evals, args.labels, out_dir)
        return
    out_dir = args.out_dir or args.runs_dir
    arms = parse_arms(args.arms)
    baseline = list(arms)[-1]
    for flag, path in (('--runs_dir', args.runs_dir), ('--out_dir', out_dir)):
        check_folder(flag, path)  # now, not once the training is done

    if not args.tabulate:
        if not args.config or not os.path.isfile(args.config):
            fail(f'config file {args.config!r} not found (give --config, e.g. config_shakespeare_char_cpu.py)')
        for kv in args.set:
            if '=' not in kv:
                fail(f'--set takes key=value pairs, got {kv!r}')
        resolved = {}
        for name, arm_settings in arms.items():  # a mistake in any arm stops the comparison before it trains
            configured = resolve([args.config, *[f'--{kv}' for kv in args.set], *arm_settings])
            if args.lrs and not configured['learning_rate'] > 0:
                fail(f"arm {name}: --lrs scales the config's rates by its learning_rate, which is "
                     f"{configured['learning_rate']}")
            twin = next((other for other, settings in resolved.items() if settings == configured), None)
            if twin:
                fail(f'arms {twin} and {name} train with the same settings; give each arm a setting of its own')
            resolved[name] = configured
        for name, arm_settings in arms.items():
            first = os.path.join(args.runs_dir, run_name(name, (args.lrs or [None])[0], 1337))
            if any(os.path.isfile(os.path.join(first, f)) for f in ('ckpt.pt', DIVERGED)):
                continue  # a comparison already under way: train_bio.py took these settings (maybe on a GPU gone now)
            problem = rehearsal_error(run_settings(args, arm_settings, (args.lrs or [None])[0], 1337, first))
            if problem:
                fail(f'arm {name}: {problem}')
        grid_seeds = min(args.grid_seeds or args.seeds, args.seeds)
        for seed in range(1337, 1337 + grid_seeds):
            for lr in args.lrs or [None]:
                for arm, arm_settings in arms.items():
                    run_dir = os.path.join(args.runs_dir, run_name(arm, lr, seed))
                    train(run_settings(args, arm_settings, lr, seed, run_dir), run_dir)
        best = {}
        for arm, arm_settings in arms.items() if args.lrs else ():
            rates = sorted(args.lrs)
            best[arm] = grid_best(args.runs_dir, arm, rates, grid_seeds)
            for _ in range(GRID_EXTENSIONS):  # until the grid brackets the arm's best
                extra = rate_beyond(rates, best[arm])
                if extra is None:
                    break
                print(f'{arm}: its best rate {best[arm]:g} is at the edge of its grid; adding {extra:g}', flush=True)
                for seed in range(1337, 1337 + grid_seeds):
                    run_dir = os.path.join(args.runs_dir, run_name(arm, extra, seed))
                    train(run_settings(args, arm_settings, extra, seed, run_dir), run_dir)
                rates = sorted(rates + [extra])
                best[arm] = grid_best(args.runs_dir, arm, rates, grid_seeds)
        for seed in range(1337 + grid_seeds, 1337 + args.seeds):
            for arm, arm_settings in arms.items():
                run_dir = os.path.join(args.runs_dir, run_name(arm, best.get(arm), seed))
                train(run_settings(args, arm_settings, best.get(arm), seed, run_dir), run_dir)

    runs, diverged = {}, set()  # (arm, lr or None, seed) -> [(iter, val_loss)]; the runs that diverged
    if os.path.isdir(args.runs_dir):
        for name in sorted(os.listdir(args.runs_dir)):
            match = re.fullmatch(r'([A-Za-z0-9_]+?)(?:-lr([0-9.e+-]+))?-seed(\d+)', name)
            if match and match[1] in arms and os.path.isfile(os.path.join(args.runs_dir, name, 'log.jsonl')):
                key = match[1], None if match[2] is None else float(match[2]), int(match[3])
                evals = read_evals(os.path.join(args.runs_dir, name))
                if os.path.isfile(os.path.join(args.runs_dir, name, DIVERGED)):
                    diverged.add(key)
                    evals = evals + [(math.inf, math.inf)]  # its final loss
                elif evals:  # a run still training, or stopped short, has no final loss yet: left out, and said
                    done = progress(os.path.join(args.runs_dir, name))
                    if done is None or done[0] < done[1]:
                        print(f'{name}: not finished ({"no checkpoint" if done is None else "iter %d of %d" % done}); '
                              'left out of the tables')
                        continue
                if evals:
                    runs[key] = evals
    if not runs:
        fail(f"no runs with evaluations in {args.runs_dir} (folders named <arm>-seed<N> or <arm>-lr<LR>-seed<N> "
             f"for arms {', '.join(arms)})")

    table = {run_name(arm, lr, seed): {'arm': arm, 'lr': lr, 'seed': seed, 'best_val_loss': min(v for _, v in evals),
                                       'final_val_loss': evals[-1][1], 'final_iter': evals[-1][0],
                                       'diverged': (arm, lr, seed) in diverged}
             for (arm, lr, seed), evals in sorted(runs.items(), key=lambda item: (item[0][0], item[0][1] or 0, item[0][2]))}
    print(f"\n{'run':28s} {'best val':>9s} {'final val':>9s} {'at iter':>8s}")
    for name, row in table.items():
        print(f"{name:28s} {row['best_val_loss']:9.4f} {row['final_val_loss']:9.4f} "
              + ('diverged' if row['diverged'] else f"{row['final_iter']:8d}"))

    # per arm and learning rate, over seeds; each arm's best rate by its mean final val loss
    report = {'runs': table, 'arms': {}, 'best_lr': {}, 'best_lr_at_edge': {}, 'paired': {}, 'iters_to_baseline': {}}
    for arm in arms:
        for lr in sorted({lr for a, lr, _ in runs if a == arm}, key=lambda lr: lr or 0):
            rows = [row for row in table.values() if row['arm'] == arm and row['lr'] == lr]
            report['arms'].setdefault(arm, {})[str(lr)] = {
                key: interval([row[key] for row in rows]) for key in ('best_val_loss', 'final_val_loss')}
    print(f"\n{'arm':12s} {'learning rate':>13s} {'best val mean +- std':>26s} {'final val mean +- std':>26s}")
    for arm, by_lr in report['arms'].items():
        for lr, stats in by_lr.items():
            cells = [f"{stats[k]['mean']:.4f} +- {stats[k].get('std', 0.0):.4f} (n={len(stats[k]['values'])})"
                     for k in ('best_val_loss', 'final_val_loss')]
            print(f'{arm:12s} {lr:>13s} {cells[0]:>26s} {cells[1]:>26s}')
        # among the rates run on the most seeds: a --grid_seeds sweep's other rates have fewer, and one seed's
        # luck must not outbid a mean
        most = max(len(stats['final_val_loss']['values']) for stats in by_lr.values())
        best = min((lr for lr, stats in by_lr.items() if len(stats['final_val_loss']['values']) == most),
                   key=lambda lr: by_lr[lr]['final_val_loss']['mean'])
        report['best_lr'][arm] = None if best == 'None' else float(best)
        rates = [float(lr) for lr in by_lr if lr != 'None']
        report['best_lr_at_edge'][arm] = best != 'None' and rate_beyond(rates, float(best)) is not None
    if any(lr is not None for _, lr, _ in runs):
        print('best learning rates (lowest mean final val loss among the rates run on the most seeds): '
              + ', '.join(f'{arm} {lr:g}' + (' (at the edge of its grid: the best may lie beyond)'
                                             if report['best_lr_at_edge'][arm] else '')
                          for arm, lr in report['best_lr'].items() if lr is not None))
        print(OPTIMISM)

    def at_best(arm):
        """{seed: evals} of an arm's runs at its best learning rate."""
        return {seed: evals for (a, lr, seed), evals in runs.items() if a == arm and lr == report['best_lr'].get(arm)}

    base = at_best(baseline)
    for arm in [a for a in arms if a != baseline and a in report['arms'] and base]:
        mine = at_best(arm)
        seeds = sorted(set(mine) & set(base))
        for key, pick in (('best_val_loss', lambda evals: min(v for _, v in evals)),
                          ('final_val_loss', lambda evals: evals[-1][1])):
            if not seeds:
                continue
            stats = interval([pick(mine[s]) - pick(base[s]) for s in seeds])
            report['paired'].setdefault(f'{arm} - {baseline}', {})[key] = stats
            text = difference_text(stats)
            print(f'paired {arm} - {baseline}, {key}: {text} (negative: {arm} lower)')
    # compute-matched: each arm's val loss where the baseline's run ended, by its steps' wall clock and by its
    # training FLOPs, seed by seed, so that what an arm's step costs more is charged to it
    for measure, unit in (('train_s', 'training seconds'), ('flops', 'training FLOPs')):
        for arm in [a for a in arms if a != baseline and at_best(a) and base]:
            differences, ended_early = [], 0
            for seed in sorted(set(at_best(arm)) & set(base)):
                mine = read_spent(os.path.join(args.runs_dir, run_name(arm, report['best_lr'].get(arm), seed)), measure)
                theirs = read_spent(os.path.join(args.runs_dir, run_name(baseline, report['best_lr'].get(baseline), seed)),
                                    measure)
                if not mine or not theirs:
                    continue  # a run from before train_bio.py logged what it spent
                if (arm, report['best_lr'].get(arm), seed) in diverged or (baseline, report['best_lr'].get(baseline), seed) in diverged:
                    differences.append(math.inf)  # as in the paired view: a diverged run's loss is infinite
                    continue
                loss = loss_at(mine, theirs[-1][0])
                if loss is None:  # it spent less in its whole run: its final loss, which the budget allowed
                    loss, ended_early = mine[-1][1], ended_early + 1
                differences.append(loss - theirs[-1][1])
            if not differences:
                continue
            stats = interval(differences)
            report.setdefault('compute_matched', {}).setdefault(f'{arm} - {baseline}', {})[measure] = {
                **stats, 'runs_that_ended_before': ended_early}
            text = difference_text(stats)
            early = f'; {ended_early} of its runs spent less in all and count their final loss' if ended_early else ''
            print(f"compute-matched {arm} - {baseline}, val loss at {baseline}'s {unit}: {text}{early}")
    # iterations to reach the baseline's mean final val loss, on each arm's mean curve over seeds
    if base:
        target = statistics.mean(evals[-1][1] for evals in base.values())
        for arm in arms:
            curves = list(at_best(arm).values())
            if not curves:
                continue
            iters = sorted(set.intersection(*[{i for i, _ in c} for c in curves]))
            mean_curve = [(i, statistics.mean(dict(c)[i] for c in curves)) for i in iters]
            reached = next((i for i, v in mean_curve if v <= target), None)
            report['iters_to_baseline'][arm] = {'target': target, 'iters': reached}
            print(f"{arm}: reaches {baseline}'s mean final val loss {target:.4f} at iter "
                  f"{reached if reached is not None else 'n/a (not reached)'} (mean over {len(curves)} seeds, "
                  'at the evaluations)')

    os.makedirs(out_dir, exist_ok=True)
    colors = dict(zip(arms, plt.rcParams['axes.prop_cycle'].by_key()['color'] * 3))
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in arms:
        for seed, evals in sorted(at_best(arm).items()):
            ax.plot([i for i, _ in evals], [v for _, v in evals], color=colors[arm], alpha=0.8, label=f'{arm} seed {seed}')
    ax.set_xlabel('iteration')
    ax.set_ylabel('val loss')
    ax.set_title('val loss, each arm at its best learning rate')
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out_dir, 'compare_curves.png'), dpi=120)
    written = ['compare_curves.png']
    if any(lr is not None for _, lr, _ in runs):
        fig, ax = plt.subplots(figsize=(7, 5))
        for arm, by_lr in report['arms'].items():
            lrs = [lr for lr in by_lr if lr != 'None']
            ax.errorbar([float(lr) for lr in lrs], [by_lr[lr]['final_val_loss']['mean'] for lr in lrs],
                        yerr=[by_lr[lr]['final_val_loss'].get('std', 0.0) for lr in lrs], marker='o', capsize=3,
                        color=colors[arm], label=arm)
        ax.set_xscale('log')
        ax.set_xlabel('learning rate')
        ax.set_ylabel('final val loss (mean +- std over seeds)')
        ax.set_title('final val loss against learning rate')
        ax.legend()
        save_figure(fig, os.path.join(out_dir, 'compare_lr.png'), dpi=120)
        written.append('compare_lr.png')
    write_file(os.path.join(out_dir, 'compare.json'), json.dumps(report, indent=2))
    print(f"wrote {', '.join(f'{out_dir}/{name}' for name in written)} and {out_dir}/compare.json")


if __name__ == '__main__':
    try:
        main()
    except WriteError as e:  # an output that cannot be written (a full disk, a link in the way): one line
        fail(str(e))
