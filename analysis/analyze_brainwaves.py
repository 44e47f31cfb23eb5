"""
The oscillating neurons' frequencies read as "brain waves": |omega| sorted into fixed bands.

    python analysis/analyze_brainwaves.py out-wigglegpt-pure-124m/ckpt.pt

Bands of |omega| (the original project's): delta [0, 0.4), theta [0.4, 0.8), alpha [0.8, 1.2),
beta [1.2, 1.8), gamma [1.8, 3.0), other >= 3. "Band power" is the share of neurons in a band.
Each oscillating activation of the MLPs is read on its own, named by where it sits in a block:
mlp.activation (every bio MLP, and bio_glu's gate), and mlp.event.activation (the event layer of bio_variant v2 and v1).
Writes brainwaves.json ({'n_neurons', 'activations': {name: {...}}}; for each activation its band
shares overall and per layer, the smoothed spectrum, and the layer-to-layer similarity of the omega
distributions: the overlap of their histograms, 1 for the same, 0 for disjoint) and PNGs: band
shares and per-layer heatmap (a row per activation), the smoothed |omega| spectra, each layer's mean
waveform sin(omega*t + phi), and the similarity matrices (a panel per activation), to --out_dir
(default analysis_out/brainwaves).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from analyze_wiggle import neuron_params  # noqa: E402
from configurator import check_folder, fail, one_line_errors  # noqa: E402  (analyze_wiggle put the repo root on the path)
from files import WriteError, save_figure, write_file  # noqa: E402

BANDS = {'delta': (0.0, 0.4), 'theta': (0.4, 0.8), 'alpha': (0.8, 1.2), 'beta': (1.2, 1.8), 'gamma': (1.8, 3.0),
         'other': (3.0, np.inf)}


def band_shares(omega):
    magnitude = np.abs(omega)
    return {band: float(np.mean((magnitude >= lo) & (magnitude < hi))) for band, (lo, hi) in BANDS.items()}


def similarity(a, b, bins):
    """Overlap of two omega histograms on shared bins: 1 for the same distribution, 0 for disjoint ones."""
    ha, _ = np.histogram(a, bins=bins)
    hb, _ = np.histogram(b, bins=bins)
    return float(np.minimum(ha / len(a), hb / len(b)).sum())


def activation_report(layers_omega):
    """One activation's band shares (overall and per layer), smoothed |omega| spectrum and layer similarity."""
    omega = np.concatenate(layers_omega)
    # a Gaussian-smoothed histogram of |omega|, the "spectrum"
    grid = np.linspace(0.0, max(3.5, np.abs(omega).max()), 400)
    width = 0.05
    density = np.exp(-0.5 * ((grid[:, None] - np.abs(omega)[None, :]) / width) ** 2).sum(1)
    density /= density.sum() * (grid[1] - grid[0])
    bins = np.linspace(omega.min(), omega.max() + 1e-6, 61)
    return {'n_neurons': int(len(omega)), 'bands': band_shares(omega),
            'per_layer': [band_shares(layer) for layer in layers_omega],
            'spectrum': {'omega_abs': grid.tolist(), 'density': density.tolist(), 'kernel_width': width},
            'layer_similarity': [[similarity(a, b, bins) for b in layers_omega] for a in layers_omega]}


def main():
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument('ckpt', help='a checkpoint of a WiggleGPT model: ckpt.pt, an exported folder, or a hub name hf:OWNER/REPO/FILE.pt')
    parser.add_argument('--out_dir', default='analysis_out/brainwaves')
    args = parser.parse_args()
    check_folder('--out_dir', args.out_dir)  # before the checkpoint loads, which can take a while
    params = neuron_params(args.ckpt)
    sites = list(params)
    os.makedirs(args.out_dir, exist_ok=True)

    report = {'checkpoint': args.ckpt,
              'activations': {site: activation_report(params[site]['omega']) for site in sites}}
    report['n_neurons'] = sum(r['n_neurons'] for r in report['activations'].values())
    for site, site_report in report['activations'].items():
        print(f"{site}: {site_report['n_neurons']:,} neurons; band power (share of neurons):")
        for band, share in site_report['bands'].items():
            lo, hi = BANDS[band]
            print(f'  {band:6s} [{lo}, {hi}): {share:.2%}')

    fig, axes = plt.subplots(len(sites), 2, figsize=(12, 4 * len(sites)), gridspec_kw={'width_ratios': [1, 2]},
                             squeeze=False)
    for (ax_bar, ax_map), site in zip(axes, sites):
        site_report = report['activations'][site]
        ax_bar.bar(list(BANDS), list(site_report['bands'].values()))
        ax_bar.set_ylabel('share of neurons')
        ax_bar.set_title(site)
        heat = np.array([[layer[band] for band in BANDS] for layer in site_report['per_layer']])
        image = ax_map.imshow(heat.T, aspect='auto', cmap='viridis')
        ax_map.set_yticks(range(len(BANDS)), list(BANDS))
        ax_map.set_xlabel('layer')
        fig.colorbar(image, ax=ax_map)
    fig.tight_layout()
    save_figure(fig, os.path.join(args.out_dir, 'brainwaves_bands.png'), dpi=110)

    fig, ax = plt.subplots(figsize=(8, 4))
    for site in sites:
        spectrum = report['activations'][site]['spectrum']
        ax.plot(spectrum['omega_abs'], spectrum['density'], label=site)
    for lo, _ in list(BANDS.values())[1:]:
        ax.axvline(lo, color='grey', linewidth=0.5)
    ax.set_xlabel('|omega|')
    ax.set_ylabel('density')
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(args.out_dir, 'brainwaves_spectrum.png'), dpi=110)

    t = np.linspace(-2 * np.pi, 2 * np.pi, 400)
    fig, axes = plt.subplots(len(sites), 1, figsize=(8, 4 * len(sites)), squeeze=False)
    for ax, site in zip(axes[:, 0], sites):
        for i, (w, p) in enumerate(zip(params[site]['omega'], params[site]['phi'])):
            ax.plot(t, np.sin(np.outer(t, w) + p).mean(1), label=f'layer {i}')
        ax.set_title(site)
        ax.set_xlabel('t')
        ax.set_ylabel('mean sin(omega t + phi)')
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, os.path.join(args.out_dir, 'brainwaves_waveforms.png'), dpi=110)

    fig, axes = plt.subplots(1, len(sites), figsize=(5 * len(sites), 4.5), squeeze=False)
    for ax, site in zip(axes[0], sites):
        image = ax.imshow(report['activations'][site]['layer_similarity'], vmin=0, vmax=1, cmap='magma')
        ax.set_title(site)
        ax.set_xlabel('layer')
        ax.set_ylabel('layer')
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, os.path.join(args.out_dir, 'brainwaves_similarity.png'), dpi=110)

    write_file(os.path.join(args.out_dir, 'brainwaves.json'), json.dumps(report, indent=2))
    print(f'wrote {args.out_dir}/brainwaves.json and plots')


if __name__ == '__main__':
    try:
        main()
    except WriteError as e:  # an output that cannot be written (a full disk, a link in the way): one line
        fail(str(e))
