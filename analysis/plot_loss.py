"""
Loss curves of one or more train_bio.py runs (pretraining or fine-tuning), overlaid.

    python analysis/plot_loss.py out-wigglegpt-pure-124m
    python analysis/plot_loss.py runs/bio/log.jsonl runs/gelu/log.jsonl --labels bio gelu
    python analysis/plot_loss.py out-wigglegpt-pure-124m --evals gpt2.json     (GPT-2 measured by eval_bio.py)

Each LOG is a log.jsonl or the run directory holding it. Training lines give the per-step train
loss (thin line), eval lines the estimated train and val losses (markers); each run's lowest val
loss is starred. Writes loss_by_iter.png, loss_by_tokens.png and loss_summary.json to --out_dir:
per run the best val loss and its iter, the last eval's val loss, the last logged iter, the last
training line's loss and the last logged token count (the val entries are null for a run without
evals). Lines that are not JSON, like the torn last line of a crashed run, are skipped.
--out_dir defaults to analysis_out/loss. A bad argument is one 'error: ' line and exit status 2.

--evals RESULTS ...: eval_bio.py's results files (compare_runs.py --evals tabulates them). Each
one's val loss is drawn across both plots as a dotted horizontal line, labelled by its ckpt and the
dataset and split it was measured on, so a run's val curve reads against, say, GPT-2 on the same
split; loss_summary.json records it under its ckpt as {val_loss, dataset, split, eval_file}. A
results file without a val loss, or one compare_runs.py --evals would refuse, is one 'error: ' line.
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_log  # noqa: E402
from configurator import check_folder, fail, one_line_errors  # noqa: E402
from files import WriteError, save_figure, write_file  # noqa: E402
from compare_runs import read_eval_results  # noqa: E402

TRAIN_KEYS = {'iter', 'loss', 'tokens'}
EVAL_KEYS = {'iter', 'train_loss', 'val_loss', 'tokens'}


def log_path(arg):
    if os.path.isdir(arg):
        if not os.path.isfile(os.path.join(arg, 'log.jsonl')):
            fail(f'{arg} holds no log.jsonl; pass a run directory of train_bio.py, or the log.jsonl itself')
        return os.path.join(arg, 'log.jsonl')
    if not os.path.isfile(arg):
        fail(f'{arg}: no such file; pass a log.jsonl written by train_bio.py, or the run directory holding it')
    return arg


def read_log(path):
    """(training records, eval records) of a log.jsonl, in file order."""
    records = run_log.read_log(path)
    evals = [r for r in records if EVAL_KEYS <= r.keys()]
    train = [r for r in records if TRAIN_KEYS <= r.keys() and not EVAL_KEYS <= r.keys()]
    if not train and not evals:
        fail(f'{path} has no training or eval lines; is it a log.jsonl written by train_bio.py?')
    return train, evals


def summarize(train, evals):
    # a diverged run can log a NaN val loss, which must not win (or break) the minimum
    best = min((e for e in evals if math.isfinite(e['val_loss'])), key=lambda e: e['val_loss'], default=None)
    last = max(train + evals, key=lambda r: r['iter'])
    return {
        'best_val_loss': best['val_loss'] if best else None,
        'best_val_iter': best['iter'] if best else None,
        'final_val_loss': evals[-1]['val_loss'] if evals else None,
        'final_iter': last['iter'],
        'final_train_loss': train[-1]['loss'] if train else None,
        'tokens': last['tokens'],
    }


def plot(runs, summary, references, x_key, x_label, path):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (label, (train, evals)) in enumerate(runs.items()):
        color = f'C{i % 10}'
        if train:
            ax.plot([r[x_key] for r in train], [r['loss'] for r in train], color=color, lw=0.7, alpha=0.5,
                    label=f'{label} train (step)')
        if evals:
            x = [e[x_key] for e in evals]
            ax.plot(x, [e['train_loss'] for e in evals], color=color, ls='--', marker='o', ms=3, mfc='none',
                    label=f'{label} train (eval)')
            ax.plot(x, [e['val_loss'] for e in evals], color=color, marker='o', ms=4, label=f'{label} val')
        best_iter = summary[label]['best_val_iter']
        if best_iter is not None:
            best = next(e for e in evals if e['iter'] == best_iter)
            ax.plot(best[x_key], best['val_loss'], marker='*', ms=14, color=color, mec='k', ls='none',
                    label=f"{label} best val {best['val_loss']:.4f}")
    for i, (label, reference) in enumerate(references.items(), start=len(runs)):
        where = ' '.join(filter(None, (reference['dataset'], reference['split'])))
        ax.axhline(reference['val_loss'], color=f'C{i % 10}', ls=':', lw=1.5,
                   label=f"{label} val {reference['val_loss']:.4f}" + (f' ({where})' if where else ''))
    ax.set_xlabel(x_label)
    ax.set_ylabel('loss')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main():
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument('logs', nargs='+', metavar='LOG', help='a log.jsonl, or a run directory holding one')
    parser.add_argument('--labels', nargs='+', help='one name per LOG (default: the run directory name)')
    parser.add_argument('--out_dir', default='analysis_out/loss')
    parser.add_argument('--evals', nargs='+', default=[], metavar='RESULTS',
                        help="eval_bio.py's results files: each one's val loss as a reference line")
    args = parser.parse_args()
    check_folder('--out_dir', args.out_dir)
    paths = [log_path(arg) for arg in args.logs]
    if args.labels and len(args.labels) != len(paths):
        fail(f'{len(paths)} LOG arguments but {len(args.labels)} --labels; give one label per LOG, or none')
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(path))) for path in paths]
    if len(set(labels)) < len(labels):
        fail(f'two runs are both labelled {max(labels, key=labels.count)!r}; name them apart with --labels')

    runs = {label: read_log(path) for label, path in zip(labels, paths)}
    summary = {label: summarize(*run) for label, run in runs.items()}
    references = {}
    for path in args.evals:
        ckpt, rows = read_eval_results(path)
        if 'val.loss' not in rows:
            fail(f'{path} has no val loss to draw; run eval_bio.py with its val task')
        if ckpt in summary or ckpt in references:
            fail(f'{path} measured {ckpt!r}, which labels another line too; plot them apart, or rename the run '
                 'with --labels')
        references[ckpt] = {'val_loss': rows['val.loss'], 'dataset': rows.get('val.dataset'),
                            'split': rows.get('val.split'), 'eval_file': path}
    os.makedirs(args.out_dir, exist_ok=True)
    plot(runs, summary, references, 'iter', 'iteration', os.path.join(args.out_dir, 'loss_by_iter.png'))
    plot(runs, summary, references, 'tokens', 'tokens seen', os.path.join(args.out_dir, 'loss_by_tokens.png'))
    write_file(os.path.join(args.out_dir, 'loss_summary.json'), json.dumps({**summary, **references}, indent=2))

    for label, s in summary.items():
        best = 'no evals' if s['best_val_iter'] is None else \
            f"best val {s['best_val_loss']:.4f} at iter {s['best_val_iter']}"
        train = 'no train lines' if s['final_train_loss'] is None else f"last train loss {s['final_train_loss']:.4f}"
        print(f"{label}: {best}, {train}, iter {s['final_iter']}, {s['tokens']:,} tokens")
    for label, reference in references.items():
        print(f"{label}: val {reference['val_loss']:.4f} measured by eval_bio.py ({reference['eval_file']})")
    print(f'wrote loss_by_iter.png, loss_by_tokens.png and loss_summary.json to {args.out_dir}')


if __name__ == '__main__':
    try:
        main()
    except WriteError as e:  # an output that cannot be written (a full disk, a link in the way): one line
        fail(str(e))
