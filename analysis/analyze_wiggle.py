"""
What the oscillating neurons learned: statistics and plots of omega, phi and baseline.

    python analysis/analyze_wiggle.py out-wigglegpt-pure-124m/ckpt.pt
    python analysis/analyze_wiggle.py pretrained/ckpt.pt --compare finetuned/ckpt.pt
    python analysis/analyze_wiggle.py hf:edeneldith/WiggleGPT/ckpt_pretrain.pt --compare hf:edeneldith/WiggleGPT/ckpt_finetune.pt

Each oscillating activation of the MLPs is reported on its own, named by where it sits in a block
(its parameters' names): mlp.activation (every bio MLP, and bio_glu's gate), and mlp.event.activation (the event layer of
bio_variant v2 and v1, lineage.py). For each, over all its neurons and per layer: mean, std, min,
max, percentiles, the share with |value| < 0.1 and the share within 0.2 of 1; the sparse gate's
gate_weight and gate_bias with the activation they gate (v3's mlp.activation). With --compare (say
pretrained vs fine-tuned), the per-neuron change from the first checkpoint to the second. Writes
wiggle_stats.json ({'n_layers', 'n_neurons', 'activations': {name: {'n_neurons', 'omega', ...}},
'compare': {'activations': ...}}) and PNGs (histograms, omega-phi scatters, per-layer box plots; a
row or panel per activation) to --out_dir (default analysis_out/wiggle).
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
from files import WriteError, save_figure, write_file  # noqa: E402
from oscillation import OscillatingActivation  # noqa: E402

PARAMS = ('omega', 'phi', 'baseline')
GATE_PARAMS = ('gate_weight', 'gate_bias')
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def neuron_params(ckpt_path):
    """{activation: {parameter: [per-layer numpy arrays]}} for each oscillating activation of a checkpoint's
    MLPs, named by where it sits in a block ('mlp.activation', 'mlp.event.activation'); a sparse gate's
    parameters go with the activation it gates."""
    try:
        model, _ = load_model(ckpt_path, 'cpu')
    except ValueError as e:
        fail(str(e))
    mlps = [block.mlp for block in model.transformer.h]
    sites = [name for name, module in mlps[0].named_modules() if isinstance(module, OscillatingActivation)]
    if not sites:
        fail(f'{ckpt_path} has no oscillating neurons (its MLP is mlp={model.config.mlp})')
    params = {}
    for site in sites:
        activations = [mlp.get_submodule(site) for mlp in mlps]
        params[f'mlp.{site}'] = {name: [getattr(a, name).detach().float().numpy() for a in activations]
                                 for name in PARAMS}
    if getattr(mlps[0], 'sparse_gate', None) is not None:
        params['mlp.activation'].update({name: [getattr(mlp.sparse_gate, name).detach().float().numpy() for mlp in mlps]
                                         for name in GATE_PARAMS})
    return params


def shapes(params):
    """Each activation's neurons per layer: two checkpoints compare neuron by neuron only where these agree."""
    return {site: [len(layer) for layer in values['omega']] for site, values in params.items()}


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
    if other and shapes(other) != shapes(params):
        fail(f'{args.compare} has a different shape from {args.ckpt}; compare checkpoints of one model')
    os.makedirs(args.out_dir, exist_ok=True)

    sites = list(params)
    n_layers = len(params[sites[0]]['omega'])
    stats = {'checkpoint': args.ckpt, 'n_layers': n_layers, 'activations': {}}
    for site, values in params.items():
        stats['activations'][site] = {'n_neurons': int(sum(len(layer) for layer in values['omega']))}
        for name, layers in values.items():
            stats['activations'][site][name] = describe(np.concatenate(layers))
            stats['activations'][site][name]['per_layer'] = [describe(layer) for layer in layers]
    stats['n_neurons'] = sum(s['n_neurons'] for s in stats['activations'].values())
    print(f"{stats['n_neurons']:,} neurons in {n_layers} layers ({args.ckpt})")
    for site, values in params.items():
        print(f"{site}: {stats['activations'][site]['n_neurons']:,} neurons")
        for name in values:
            s = stats['activations'][site][name]
            print(f"  {name:12s} mean {s['mean']:+.4f}  std {s['std']:.4f}  min {s['min']:+.4f}  max {s['max']:+.4f}  "
                  f"|x|<0.1 {s['share_abs_below_0.1']:.1%}  within 0.2 of 1 {s['share_within_0.2_of_1']:.1%}")

    # a row of histograms per activation, each panel named as its parameter is in the checkpoint
    columns = max(len(values) for values in params.values())
    fig, axes = plt.subplots(len(sites), columns, figsize=(4 * columns, 3.5 * len(sites)), squeeze=False)
    for row, (site, values) in zip(axes, params.items()):
        for ax, (name, layers) in zip(row, values.items()):
            histogram(ax, np.concatenate(layers), f'{site}.{name}')
        for ax in row[len(values):]:
            ax.axis('off')
    fig.tight_layout()
    save_figure(fig, os.path.join(args.out_dir, 'wiggle_hist.png'), dpi=110)

    fig, axes = plt.subplots(1, len(sites), figsize=(5 * len(sites), 5), squeeze=False)
    for ax, (site, values) in zip(axes[0], params.items()):
        ax.scatter(np.concatenate(values['omega']), np.concatenate(values['phi']), s=1, alpha=0.3)
        ax.set_title(site)
        ax.set_xlabel('omega (frequency)')
        ax.set_ylabel('phi (phase)')
    fig.tight_layout()
    save_figure(fig, os.path.join(args.out_dir, 'wiggle_scatter.png'), dpi=110)

    rows = [(site, name) for site in sites for name in PARAMS]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6, n_layers), 2.7 * len(rows)), sharex=True)
    for ax, (site, name) in zip(axes, rows):
        ax.boxplot(params[site][name], showfliers=False)
        ax.set_ylabel(f'{site}.{name}', fontsize=8)
    axes[-1].set_xlabel('layer')
    fig.tight_layout()
    save_figure(fig, os.path.join(args.out_dir, 'wiggle_layers.png'), dpi=110)

    if other:
        stats['compare'] = {'checkpoint': args.compare, 'activations': {site: {} for site in sites}}
        fig, axes = plt.subplots(2 * len(sites), len(PARAMS), figsize=(4 * len(PARAMS), 7 * len(sites)))
        for row, (site, name) in enumerate(rows):
            top, col = 2 * (row // len(PARAMS)), row % len(PARAMS)
            before, after = np.concatenate(params[site][name]), np.concatenate(other[site][name])
            delta = np.abs(after - before)
            stats['compare']['activations'][site][name] = {
                'mean_abs_delta': float(delta.mean()), 'max_abs_delta': float(delta.max()),
                'share_changed_over_0.1': float(np.mean(delta > 0.1))}
            print(f"  {site + '.' + name:29s} mean |delta| {delta.mean():.5f}  max |delta| {delta.max():.5f}  "
                  f"changed > 0.1: {np.mean(delta > 0.1):.2%}")
            histogram(axes[top, col], after - before, f'{site}.{name}: change')
            axes[top + 1, col].scatter(before, after, s=1, alpha=0.3)
            axes[top + 1, col].set_xlabel('before')
            axes[top + 1, col].set_ylabel('after')
        fig.tight_layout()
        save_figure(fig, os.path.join(args.out_dir, 'wiggle_compare.png'), dpi=110)

    write_file(os.path.join(args.out_dir, 'wiggle_stats.json'), json.dumps(stats, indent=2))
    print(f'wrote {args.out_dir}/wiggle_stats.json and plots')


if __name__ == '__main__':
    try:
        main()
    except WriteError as e:  # an output that cannot be written (a full disk, a link in the way): one line
        fail(str(e))
