"""
A CMA-ES search over named train_bio.py settings (seed 003's way of tuning its mechanisms' constants),
through Optuna's CMA-ES sampler and its storage: each trial is a short training run scored on its final
val loss, the study lives in a SQLite file in --study_dir, so it resumes after Ctrl-C and several
processes (or machines sharing the folder) can work on it at once, each running the same command.

    python analysis/search.py --config config_shakespeare_char_cpu.py --set max_iters=300 use_moe=True \\
        --space moe_tax=0.001:0.1:log moe_split_health=1.05:2.0 moe_change_every=10:100:int --trials 12

--space NAME=LOW:HIGH[:log][:int]: a setting drawn between LOW and HIGH (on a log scale with :log; whole
numbers with :int); with a single setting Optuna samples it independently (its CMA-ES needs two or more).
Each range's ends are checked against train_bio.py's rules first. A study keeps its space and settings: a
rerun in the same --study_dir with others is refused. Processes sharing a study draw with different sampler
seeds, and may together pass --trials by one trial each. A trial that Ctrl-C interrupts is marked failed
and queued again with its settings, so the next run goes on from its checkpoint. --trials: the study's total of finished trials (already finished ones count, so a
rerun after Ctrl-C goes on where it stopped). Every trial trains with --seed (default 1: not one of
compare_runs.py's 1337, 1338, ...), so trials differ in their settings alone. Each run is train_bio.py in <study_dir>/trial-<number>; its output is in
that folder's train.out. A run that diverges scores infinity.

It prints each trial and the best so far, and writes search.json (every trial's settings and score) and
search.png (the score and the best so far against the trial) to --study_dir. A search's best is the
luckiest of many draws on one seed: it ends by printing the compare_runs.py command that judges the pick
against the config's defaults on fresh seeds (compare_runs.py's, not the search's), which is the result
to report. A bad argument or
a setting train_bio.py refuses is one 'error: ' line and exit status 2.
"""
import argparse
import json
import math
import os
import re
import shlex
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import check_folder, fail, one_line_errors  # noqa: E402
from compare_runs import final_val_loss, rehearsal_error, resolve, train  # noqa: E402
from files import WriteError, claim_folder, save_figure, write_file  # noqa: E402

STUDY = 'search'
JUDGING_SEEDS = (1337, 1338, 1339)  # compare_runs.py --seeds 3


def parse_space(specs):
    """{name: (low, high, log, integer)} from NAME=LOW:HIGH[:log][:int] specs."""
    space = {}
    for spec in specs:
        match = re.fullmatch(r'([A-Za-z_][A-Za-z0-9_]*)=([^:]+):([^:]+)((?::(?:log|int))*)', spec)
        if not match:
            fail(f'--space {spec!r}: write NAME=LOW:HIGH, with :log and/or :int after it if wanted')
        name, low, high, flags = match.groups()
        integer, log = ':int' in flags, ':log' in flags
        try:
            low, high = (int(low), int(high)) if integer else (float(low), float(high))
        except ValueError:
            fail(f'--space {spec!r}: LOW and HIGH must be {"whole " if integer else ""}numbers')
        if not low < high or (log and low <= 0) or not all(map(math.isfinite, (low, high))):
            fail(f'--space {spec!r}: needs LOW < HIGH, both finite{" and above 0 on a log scale" if log else ""}')
        if name in space:
            fail(f'--space names {name} twice')
        space[name] = (low, high, log, integer)
    return space


def main():
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument('--config', required=True, help='the train_bio.py config every trial uses')
    parser.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='more train_bio.py settings')
    parser.add_argument('--space', nargs='+', required=True, metavar='NAME=LOW:HIGH[:log][:int]')
    parser.add_argument('--trials', type=int, default=12, help="the study's total of finished trials")
    parser.add_argument('--seed', type=int, default=1, help="every trial's training seed (and the sampler's)")
    parser.add_argument('--study_dir', default='runs-search')
    args = parser.parse_args()
    space = parse_space(args.space)
    if args.trials < 1:
        fail(f'--trials {args.trials}: give at least 1')
    if args.seed in JUDGING_SEEDS:
        fail(f'--seed {args.seed} is one of the seeds compare_runs.py judges the pick on ({JUDGING_SEEDS[0]}-'
             f'{JUDGING_SEEDS[-1]}); search on another')
    check_folder('--study_dir', args.study_dir)
    fixed = [args.config, *[f'--{kv}' for kv in args.set], f'--seed={args.seed}']
    # each end of each setting's range, the others at their middle, checked against train_bio.py's rules
    for name, (lo, hi, log, integer) in space.items():
        for end in (lo, hi):
            resolve([*fixed, f'--{name}={end!r}'])
    # the middle of the space, rehearsed: a setting train_bio.py refuses stops the search before any trial
    middle = {n: (lo * hi) ** 0.5 if log else (lo + hi) / 2 for n, (lo, hi, log, _) in space.items()}
    error = rehearsal_error([*fixed, *[f'--{n}={round(v) if space[n][3] else v!r}' for n, v in middle.items()]])
    if error:
        fail(error)

    import optuna  # here, not above: a bad argument is reported without its import time
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.makedirs(args.study_dir, exist_ok=True)
    database = os.path.join(args.study_dir, 'study.db')
    if os.path.islink(database):  # SQLite would write wherever the link points
        fail(f'{database} is a symbolic link; a study writes only its own file: remove the link')
    storage = f"sqlite:///{os.path.abspath(database)}"
    # the sampler's seed differs per process, so that processes sharing the study do not draw the same trials
    study = optuna.create_study(study_name=STUDY, storage=storage, load_if_exists=True, direction='minimize',
                                sampler=optuna.samplers.CmaEsSampler(seed=args.seed * 100003 + os.getpid()))
    # a study's trials compare only if they searched one space with the same fixed settings
    asked = {'space': {n: list(v) for n, v in space.items()}, 'fixed': fixed}
    if not study.user_attrs:
        for key, value in asked.items():
            study.set_user_attr(key, value)
    elif {key: study.user_attrs.get(key) for key in asked} != asked:
        fail(f'{args.study_dir} holds a study of another space or other settings ({study.user_attrs}); pass another '
             '--study_dir, or the same --config, --set, --space and --seed')

    def finished():
        return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]

    while len(finished()) < args.trials:
        trial = study.ask()
        settings = {name: trial.suggest_int(name, lo, hi, log=log) if integer else trial.suggest_float(name, lo, hi, log=log)
                    for name, (lo, hi, log, integer) in space.items()}
        # a trial that Ctrl-C interrupted comes back first, to go on in its own folder from its checkpoint
        run_dir = trial.user_attrs.get('run_dir') or os.path.join(args.study_dir, f'trial-{trial.number}')
        try:
            train([*fixed, *[f'--{k}={v!r}' for k, v in settings.items()], f'--out_dir={run_dir}'], run_dir)
        except BaseException:  # Ctrl-C (its run saved), or a run that failed
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if os.path.isfile(os.path.join(run_dir, 'ckpt.pt')):
                study.enqueue_trial(settings, user_attrs={'run_dir': run_dir})
            raise
        score = final_val_loss(run_dir)
        study.tell(trial, score if math.isfinite(score) else float('inf'))
        best = study.best_trial
        print(f'trial {trial.number}: val {score:.4f} with {settings}; best so far {best.value:.4f} (trial {best.number})',
              flush=True)

    try:  # one process writes the report at a time; one that finds another at it leaves it to that one
        claim = claim_folder(args.study_dir, 'search report')
    except WriteError as e:
        print(f'the report is left to the process writing it ({e})')
        return
    trials = sorted(finished(), key=lambda t: t.number)
    finite = lambda v: v if math.isfinite(v) else None  # noqa: E731  (JSON has no infinity: null for a diverged run)
    report = {'space': {n: list(v) for n, v in space.items()}, 'fixed': fixed,
              'trials': [{'number': t.number, 'val_loss': finite(t.value), 'settings': t.params} for t in trials],
              'best': {'number': study.best_trial.number, 'val_loss': finite(study.best_value), 'settings': study.best_params}}
    write_file(os.path.join(args.study_dir, 'search.json'), json.dumps(report, indent=2))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    values = [t.value for t in trials]
    ax.plot(range(1, len(values) + 1), values, 'o', ms=4, label='trial')
    ax.plot(range(1, len(values) + 1), [min(values[:i + 1]) for i in range(len(values))], '-', label='best so far')
    ax.set_xlabel('finished trial')
    ax.set_ylabel('final val loss')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, os.path.join(args.study_dir, 'search.png'), dpi=110)
    plt.close(fig)
    claim.release()
    pick = ','.join(f'{k}={v!r}' for k, v in study.best_params.items())
    judge = ['python', 'analysis/compare_runs.py', '--config', args.config, '--seeds', str(len(JUDGING_SEEDS)),
             *(['--set', *args.set] if args.set else []), '--runs_dir', os.path.join(args.study_dir, 'judged'),
             '--arms', f'searched:{pick}', 'defaults:']
    print(f'best: val {study.best_value:.4f} with {study.best_params} (trial {study.best_trial.number}); judge it on '
          f'fresh seeds:\n    {shlex.join(judge)}')


if __name__ == '__main__':
    main()
