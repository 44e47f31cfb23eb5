"""
What the oscillating neurons learned: statistics and plots of omega, phi and baseline.

    python analysis/analyze_wiggle.py out-wigglegpt-pure-124m/ckpt.pt
    python analysis/analyze_wiggle.py pretrained/ckpt.pt --compare finetuned/ckpt.pt
    python analysis/analyze_wiggle.py hf:edeneldith/WiggleGPT/ckpt_pretrain.pt --compare hf:edeneldith/WiggleGPT/ckpt_finetune.pt

Over all hidden neurons and per layer: mean, std, min, max, percentiles, the share with
|value| < 0.1 and the share within 0.2 of 1; the sparse gate's parameters too when the model has
them. With --compare (say pretrained vs fine-tuned), the per-neuron change from the first
checkpoint to the second. Writes wiggle_stats.json and PNGs (histograms, an omega-phi scatter,
per-layer box plots) to --out_dir (default analysis_out/wiggle).
Checkpoints load through checkpoints.load_model: ckpt.pt, an exported folder or a hub name, the
original release's files included. A bad argument is one 'error: ' line and exit status 2
(configurator.one_line_errors).
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoints import load_model  # noqa: E402
from configurator import check_folder, fail, one_line_errors  # noqa: E402

PARAMS = ('omega', 'phi', 'baseline')
GATE_PARAMS = ('gate_weight', 'gate_bias')
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def neuron_params(ckpt_path):
    """{name: [per-layer numpy arrays]} for the activation (and gate) parameters of a checkpoint."""
    try:
        model, _ = load_model(ckpt_path, 'cpu')
    except ValueError as e:
        fail(str(e))
    layers = [block.mlp for block in model.transformer.h]
    if not hasattr(layers[0], 'activation'):
        fail(f'{ckpt_path} has no oscillating neurons (a GELU model, use_bio_mlp=False)')
    params = {name: [getattr(mlp.activation, name).detach().float().numpy() for mlp in layers] for name in PARAMS}
    if getattr(layers[0], 'sparse_gate', None) is not None:
        params.update({name: [getattr(mlp.sparse_gate, name).detach().float().numpy() for mlp in layers]
                       for name in GATE_PARAMS})
    return params


def describe(values):
    values = np.asarray(values, dtype=np.float64)
    stats = {'mean': values.mean(), 'std': values.std(), 'min': values.min(), 'max': values.max()}
    stats.update({f'p{q}': np.percentile(values, q) for q in PERCENTILES})
    stats['share_abs_below_0.1'] = np.mean(np.abs(values) < 0.1)
    stats['share_within_0.2_of_1'] = np.mean(np.abs(values - 1.0) <= 0.2)
    return {k: float(v) for k, v in stats.items()}


def histogram(ax, values, title):
    low, high = float(np.min(values)), float(np.max(values))
    if high - low < 1e-6:  # all alike (e.g. baseline at init): a unit-wide window instead of no bins
        low, high = low - 0.5, high + 0.5
    ax.hist(values, bins=100, range=(low, high))
    ax.set_title(title)


def main():
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument('ckpt', help='a checkpoint of a WiggleGPT model: ckpt.pt, an exported folder, or a hub name hf:OWNER/REPO/FILE.pt')
    parser.add_argument('--compare', help='a second checkpoint of the same shape, e.g. after fine-tuning')
    parser.add_argument('--out_dir', default='analysis_out/wiggle')
    args = parser.parse_args()
    check_folder('--out_dir', args.out_dir)  # before the checkpoints load, which can take a while
    params = neuron_params(args.ckpt)
    # the second checkpoint is checked before anything is written, so a mistake in it leaves no half set of plots
    other = neuron_params(args.compare) if args.compare else None
    if other and [len(layer) for layer in other['omega']] != [len(layer) for layer in params['omega']]:
        fail(f'{args.compare} has a different shape from {args.ckpt}; compare checkpoints of one model')
    os.makedirs(args.out_dir, exist_ok=True)

    stats = {'checkpoint': args.ckpt, 'n_layers': len(params['omega']),
             'n_neurons': int(sum(len(layer) for layer in params['omega']))}
    for name, layers in params.items():
        stats[name] = describe(np.concatenate(layers))
        stats[name]['per_layer'] = [describe(layer) for layer in layers]
    print(f"{stats['n_neurons']:,} neurons in {stats['n_layers']} layers ({args.ckpt})")
    for name in params:
        s = stats[name]
        print(f"  {name:12s} mean {s['mean']:+.4f}  std {s['std']:.4f}  min {s['min']:+.4f}  max {s['max']:+.4f}  "
              f"|x|<0.1 {s['share_abs_below_0.1']:.1%}  within 0.2 of 1 {s['share_within_0.2_of_1']:.1%}")

    omega, phi = np.concatenate(params['omega']), np.concatenate(params['phi'])
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5))
    for ax, (name, layers) in zip(axes, params.items()):
        histogram(ax, np.concatenate(layers), name)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, 'wiggle_hist.png'), dpi=110)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(omega, phi, s=1, alpha=0.3)
    ax.set_xlabel('omega (frequency)')
    ax.set_ylabel('phi (phase)')
    fig.savefig(os.path.join(args.out_dir, 'wiggle_scatter.png'), dpi=110)

    fig, axes = plt.subplots(len(PARAMS), 1, figsize=(max(6, stats['n_layers']), 8), sharex=True)
    for ax, name in zip(axes, PARAMS):
        ax.boxplot(params[name], showfliers=False)
        ax.set_ylabel(name)
    axes[-1].set_xlabel('layer')
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, 'wiggle_layers.png'), dpi=110)

    if other:
        stats['compare'] = {'checkpoint': args.compare}
        fig, axes = plt.subplots(2, len(PARAMS), figsize=(4 * len(PARAMS), 7))
        for col, name in enumerate(PARAMS):
            before, after = np.concatenate(params[name]), np.concatenate(other[name])
            delta = np.abs(after - before)
            stats['compare'][name] = {'mean_abs_delta': float(delta.mean()), 'max_abs_delta': float(delta.max()),
                                      'share_changed_over_0.1': float(np.mean(delta > 0.1))}
            print(f"  {name:12s} mean |delta| {delta.mean():.5f}  max |delta| {delta.max():.5f}  "
                  f"changed > 0.1: {np.mean(delta > 0.1):.2%}")
            histogram(axes[0, col], after - before, f'{name}: change')
            axes[1, col].scatter(before, after, s=1, alpha=0.3)
            axes[1, col].set_xlabel('before')
            axes[1, col].set_ylabel('after')
        fig.tight_layout()
        fig.savefig(os.path.join(args.out_dir, 'wiggle_compare.png'), dpi=110)

    with open(os.path.join(args.out_dir, 'wiggle_stats.json'), 'w') as f:
        json.dump(stats, f, indent=2)
    print(f'wrote {args.out_dir}/wiggle_stats.json and plots')


if __name__ == '__main__':
    main()
