"""
The experts of a use_moe=True run over training: per layer, how many are active (splits and merges
marked), and each expert's load (1: an even share), energy and health, as train_bio.py logged them
every log_interval iterations (moe.py says what they are).

    python analysis/plot_moe.py out-shakespeare-char-cpu
    python analysis/plot_moe.py runs/moe/log.jsonl --out_dir analysis_out/moe

LOG is a log.jsonl or the run directory holding it. Writes moe.png (a row per layer: experts, load,
energy) and moe.json (per layer the series by iteration, and the events) to --out_dir (default
analysis_out/moe). A log without the experts' records is one 'error: ' line and exit status 2.
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
from files import save_figure, write_file  # noqa: E402
from plot_loss import log_path  # noqa: E402


def read_experts(path):
    """(per layer: {'iters', 'experts', and per slot the load, energy and health by iteration}, events)."""
    records = run_log.read_log(path)
    states = [r for r in records if isinstance(r.get('moe'), list)]
    if not states:
        fail(f'{path} holds no record of experts; was the run trained with use_moe=True?')
    layers = []
    for i in range(len(states[0]['moe'])):
        series = {'iters': [], 'experts': [], 'load': {}, 'energy': {}, 'health': {}}
        for record in states:
            layer = record['moe'][i]
            series['iters'].append(record['iter'])
            series['experts'].append(len(layer['slots']))
            for key in ('load', 'energy', 'health'):
                values = dict(zip(map(str, layer['slots']), layer[key]))
                for slot in values.keys() | series[key].keys():
                    # null where a slot is empty, so that a slot reused by a later split is not drawn as one expert
                    series[key].setdefault(slot, []).append([record['iter'], values.get(slot)])
        layers.append(series)
    events = [r for r in records if r.get('event') in ('split', 'merge')]
    return layers, events


def plot(layers, events, path):
    fig, axes = plt.subplots(len(layers), 3, figsize=(13, 2.6 * len(layers)), squeeze=False)
    for i, (series, row) in enumerate(zip(layers, axes)):
        row[0].step(series['iters'], series['experts'], where='post', color='k')
        for event in events:
            if event['layer'] == i:
                row[0].axvline(event['iter'], color='C2' if event['event'] == 'split' else 'C3', lw=0.8, alpha=0.7)
        row[0].set_ylabel(f'layer {i}\nexperts')
        for column, key in zip(row[1:], ('load', 'energy')):
            for slot, points in sorted(series[key].items(), key=lambda item: int(item[0])):
                column.plot([i for i, _ in points], [math.nan if v is None else v for _, v in points], lw=0.9,
                            label=f'slot {slot}')
            column.set_ylabel(key)
        row[1].axhline(1, color='gray', ls=':', lw=0.8)
        row[2].axhline(0, color='gray', ls=':', lw=0.8)
    axes[0][0].set_title('active experts (green: split, red: merge)', fontsize=9)
    axes[0][1].set_title('load (1 = an even share)', fontsize=9)
    axes[0][2].set_title('energy (below 0: bankrupt)', fontsize=9)
    axes[0][2].legend(fontsize=7, ncol=2)
    for ax in axes[-1]:
        ax.set_xlabel('iteration')
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main():
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument('log', metavar='LOG', help='a log.jsonl, or a run directory holding one')
    parser.add_argument('--out_dir', default='analysis_out/moe')
    args = parser.parse_args()
    check_folder('--out_dir', args.out_dir)
    layers, events = read_experts(log_path(args.log))
    os.makedirs(args.out_dir, exist_ok=True)
    plot(layers, events, os.path.join(args.out_dir, 'moe.png'))
    write_file(os.path.join(args.out_dir, 'moe.json'), json.dumps({'layers': layers, 'events': events}))
    print(f"wrote moe.png and moe.json to {args.out_dir}: {len(layers)} layers, "
          f"{sum(e['event'] == 'split' for e in events)} splits, {sum(e['event'] == 'merge' for e in events)} merges")


if __name__ == '__main__':
    main()
