"""
Can one neuron compute XOR? p = sigmoid(a * act(w1*x1 + w2*x2 + b) + c), trained on the 4 patterns.

    python analysis/xor_neuron.py --seeds 10 --json xor.json

A monotone activation (relu, tanh, sigmoid) makes p monotone along w1*x1 + w2*x2, so no setting
of the weights separates XOR; the oscillating activation sin(omega*z + phi) * tanh(z) + baseline
rises and falls, so one neuron can. Each seed trains w1, w2, b, a, c (init N(0, 1)) and the
activation's own parameters with full-batch Adam on binary cross-entropy, for each activation:
oscillating, gelu (not monotone: it dips below 0, which a neuron can exploit), relu, tanh and
sigmoid. Prints, per activation, the seeds that classify all four patterns and the mean final
accuracy; writes xor.json and xor_boundaries.png (p over the input plane) to --out_dir (default
analysis_out/xor). A bad argument is one 'error: ' line and exit status 2.
"""
import argparse
import json
import os
import sys
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import check_folder, fail, one_line_errors, ruled  # noqa: E402
from files import WriteError, save_figure, write_file  # noqa: E402
from oscillation import oscillate_reference  # noqa: E402

INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
TARGETS = torch.tensor([0.0, 1.0, 1.0, 0.0])
# activation -> (function of z and its own parameters, those parameters' initial values)
ACTIVATIONS = {
    'oscillating': (lambda z, p: oscillate_reference(z, p['omega'], p['phi'], p['baseline']),
                    {'omega': 1.0, 'phi': 0.0, 'baseline': 0.0}),
    'gelu': (lambda z, p: F.gelu(z), {}),
    'relu': (lambda z, p: F.relu(z), {}),
    'tanh': (lambda z, p: torch.tanh(z), {}),
    'sigmoid': (lambda z, p: torch.sigmoid(z), {}),
}


def init_params(activation, seeds):
    """Each parameter a tensor with one entry per seed; seed s draws w1, w2, b, a, c from torch.manual_seed(s)."""
    draws = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        draws.append(torch.randn(5))
    draws = torch.stack(draws)
    params = {name: draws[:, i].clone() for i, name in enumerate(('w1', 'w2', 'b', 'a', 'c'))}
    params.update({name: torch.full((seeds,), value) for name, value in ACTIVATIONS[activation][1].items()})
    for value in params.values():
        value.requires_grad_(True)
    return params


def logits(activation, params, inputs):
    """(seeds, points) logits of every seed's neuron at every input point."""
    p = {name: value[:, None] for name, value in params.items()}  # broadcast each seed over the points
    z = p['w1'] * inputs[:, 0] + p['w2'] * inputs[:, 1] + p['b']
    return p['a'] * ACTIVATIONS[activation][0](z, p) + p['c']


def train(activation, seeds, steps, lr):
    params = init_params(activation, seeds)
    optimizer = torch.optim.Adam(params.values(), lr=lr, foreach=True)  # one call per step, not one per tensor
    targets = TARGETS.expand(seeds, -1)
    for _ in range(steps):
        # summed over seeds, each seed's gradient (and so its Adam update) is that of its own loss alone
        loss = F.binary_cross_entropy_with_logits(logits(activation, params, INPUTS), targets, reduction='none')
        optimizer.zero_grad(set_to_none=True)
        loss.mean(dim=1).sum().backward()
        optimizer.step()
    return params


def boundary_plot(trained, results, path):
    grid = torch.linspace(-0.25, 1.25, 151)
    x1, x2 = torch.meshgrid(grid, grid, indexing='xy')
    points = torch.stack([x1.flatten(), x2.flatten()], dim=1)
    fig, axes = plt.subplots(1, len(trained), figsize=(3.2 * len(trained), 3.4), squeeze=False)
    for ax, (activation, params) in zip(axes[0], trained.items()):
        solved = [s for s, acc in enumerate(results[activation]['accuracy']) if acc == 1.0]
        seed = solved[0] if solved else 0
        with torch.no_grad():
            p = torch.sigmoid(logits(activation, params, points)[seed]).reshape(x1.shape)
        ax.contourf(x1.numpy(), x2.numpy(), p.numpy(), levels=20, cmap='RdBu_r', vmin=0, vmax=1)
        ax.contour(x1.numpy(), x2.numpy(), p.numpy(), levels=[0.5], colors='k', linewidths=1)
        ax.scatter(INPUTS[:, 0], INPUTS[:, 1], c=TARGETS, cmap='RdBu_r', vmin=0, vmax=1, edgecolors='k', s=80)
        ax.set_title(f"{activation}, seed {seed} ({'solved' if solved else 'unsolved'})")
        ax.set_xlabel('x1')
        ax.set_ylabel('x2')
        ax.set_aspect('equal')
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def main():
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument('--seeds', type=ruled(int, '>= 1'), default=10)
    parser.add_argument('--steps', type=ruled(int, '>= 1'), default=2000)
    parser.add_argument('--lr', type=ruled(float, '> 0'), default=0.05)
    parser.add_argument('--json', help='also write the per-activation results to this file')
    parser.add_argument('--out_dir', default='analysis_out/xor')
    args = parser.parse_args()
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        fail(f'--json {args.json}: its directory does not exist; create it or pick another path')
    if args.json and os.path.isdir(args.json):
        fail(f'--json {args.json} is a directory; name a file to write')
    check_folder('--out_dir', args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_num_threads(1)  # the tensors are tiny: extra threads only add hand-off time (8x slower on 2 cores)

    trained, results = {}, {}
    start = time.time()
    for activation in ACTIVATIONS:
        params = train(activation, args.seeds, args.steps, args.lr)
        with torch.no_grad():
            out = logits(activation, params, INPUTS)
        # right means p > 0.5 for a 1 and p < 0.5 for a 0: a neuron stuck at exactly 0.5 gets neither
        accuracy = torch.where(TARGETS == 1, out > 0, out < 0).float().mean(dim=1)
        trained[activation] = params
        results[activation] = {'accuracy': accuracy.tolist(), 'solved_seeds': int((accuracy == 1.0).sum())}

    print(f'{"activation":12s} {"solved":>8s} {"mean acc":>9s}')
    for activation, result in results.items():
        mean_accuracy = sum(result['accuracy']) / args.seeds
        print(f"{activation:12s} {result['solved_seeds']:>4d}/{args.seeds:<3d} {mean_accuracy:9.3f}")
    print(f'({args.seeds} seeds x {args.steps} steps, lr {args.lr}, {time.time() - start:.1f}s)')

    for path in [os.path.join(args.out_dir, 'xor.json')] + ([args.json] if args.json else []):
        write_file(path, json.dumps(results, indent=2))
    boundary_plot(trained, results, os.path.join(args.out_dir, 'xor_boundaries.png'))
    print(f'wrote xor.json and xor_boundaries.png to {args.out_dir}')


if __name__ == '__main__':
    try:
        main()
    except WriteError as e:  # an output that cannot be written (a full disk, a link in the way): one line
        fail(str(e))
