"""
The architecture test of the original release's bio_inspired_neurons2.py, done fairly: six small tasks,
each learned by a one-hidden-layer MLP (input -> hidden -> output) of six kinds, at equal hidden width and,
separately, at equal parameter count.

    python analysis/toy_tasks.py                                  (about 4 minutes on a CPU core)
    python analysis/toy_tasks.py --seeds 5 --steps 1000 --lrs 1e-3 3e-3 1e-2 3e-2

Architectures (this repository's modules; biases on, threshold and compartments GPTConfig's defaults, but
one compartment for composition's single input):
  gelu, relu   Linear, the activation, Linear
  v3           Linear, oscillation.OscillatingActivation (sin(omega x + phi) tanh(x) + baseline), Linear
  v3+gate      the same through model_bio.SparseGate (exact zeros below the threshold), as BioMLP with
               use_sparse_gate
  v2           lineage.V2MLP: c_fc, the oscillation, the event layer (two hidden x hidden matrices), c_proj
  v1           lineage.V1MLP: v1's dendritic compartments in place of c_fc, then as v2

Tasks (the original's generators; inputs are fed as the numbers they are, as there):
  xor          two bits, label a XOR b (the original repeats the 4 patterns; here they are drawn uniformly)
  parityN      N bits (--parity_bits, default 8; the original used 4, whose 16 strings every net memorises),
               label the sum mod 2
  modular      two digits 0-9, label (a + b) mod 5; 5 classes (the original regressed the label / 5 with MSE)
  copy         eight digits 0-9, each to be given back: 8 outputs of 10 classes; accuracy per digit (the
               original defined this regression but did not run it)
  composition  x ~ N(0, 1), target 2x + 2 (the original's; linear, so a check of precision): the one regression
               (MSE); accuracy is the share of predictions within 0.1 of the target (the original did not run it)
  logic        four bits A B C D, label (A and B) or (C and D)
Classification tasks train on cross-entropy. Each seed draws its own 1024 training, 512 validation and 1024
test examples, the same for every architecture. The inputs of xor, parityN, modular and logic come from so
few possible values that nearly every test input occurs in training (the JSON gives each task's share):
those rows measure fitting the function, not generalising to unseen inputs; copy's and composition's test
inputs are new.

Fairness: every architecture trains the same steps (--steps) on the same batches (--batch_size, drawn from
the seed) with Adam at each rate of --lrs, from initial weights drawn from the seed (torch.manual_seed; seeds
0, 1, ...). Its rate is the one with the best mean accuracy over seeds on the validation examples (ties: the
smaller rate); where that is the lowest or highest of its grid, a rate 3x beyond it is added, up to 3 times
(compare_runs.py's rule), and a best still at an edge is starred; the table reports, at that rate, accuracy on the separate test examples: the mean over --seeds and its 95%
t interval, the parameter count and the mean training seconds per run (CPU, one thread; noisy on a shared
machine). A run whose outputs are not finite scores 0. Equal width: every hidden layer --width neurons.
Equal parameters: each architecture at the hidden width whose count is closest to a target, the largest
count of any architecture at --width (v1's); the table prints each one's width and count.

Defaults: --seeds 3 --steps 400 --batch_size 64 --width 32 --lrs 3e-3 1e-2 3e-2 --parity_bits 8. Prints the
tables and writes toy_tasks.json (the settings; per task its sizes, target and seen share; per comparison,
task and architecture the width, count, mean validation accuracy at each rate, the rate picked, test
accuracy per seed with mean and interval, seconds) and toy_tasks.png (test accuracy bars with 95% intervals,
task x architecture, one panel per comparison) to --out_dir (default analysis_out/toy_tasks). All but the
seconds are the same from run to run. A bad argument is one 'error: ' line and exit status 2.
"""
import argparse
import json
import os
import statistics
import sys
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import lineage  # noqa: E402
import model_bio  # noqa: E402
import oscillation  # noqa: E402
from compare_runs import GRID_EXTENSIONS, interval, rate_beyond  # noqa: E402  (the run comparison's intervals and grids)
from configurator import check_folder, fail, one_line_errors, ruled  # noqa: E402
from files import WriteError, save_figure, write_file  # noqa: E402

THRESHOLD = model_bio.GPTConfig.bio_threshold
COMPARTMENTS = model_bio.GPTConfig.bio_compartments
MODULUS = 5
COPY_LENGTH = 8
TOLERANCE = 0.1  # composition: a prediction this close to 2x + 2 counts as right
SIZES = {'train': 1024, 'val': 512, 'test': 1024}


class GatedOscillatingMLP(nn.Module):
    """Linear, the oscillation through v3's sparse gate, Linear: BioMLP with use_sparse_gate, at any width."""

    def __init__(self, n_in, hidden, n_out):
        super().__init__()
        self.c_fc = nn.Linear(n_in, hidden)
        self.activation = oscillation.OscillatingActivation(hidden)
        self.sparse_gate = model_bio.SparseGate(hidden, THRESHOLD)
        self.c_proj = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.c_proj(self.sparse_gate(self.c_fc(x), self.activation))


ARCHITECTURES = {  # name -> a function (inputs, hidden width, outputs) -> the MLP
    'gelu': lambda n_in, hidden, n_out: nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out)),
    'relu': lambda n_in, hidden, n_out: nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out)),
    'v3': lambda n_in, hidden, n_out: nn.Sequential(nn.Linear(n_in, hidden), oscillation.OscillatingActivation(hidden),
                                                    nn.Linear(hidden, n_out)),
    'v3+gate': GatedOscillatingMLP,
    'v2': lambda n_in, hidden, n_out: lineage.V2MLP(n_in, hidden, n_out, THRESHOLD, bias=True),
    # a single input (composition) cannot be shared among compartments: it gets one
    'v1': lambda n_in, hidden, n_out: lineage.V1MLP(n_in, hidden, n_out, min(COMPARTMENTS, n_in), THRESHOLD, bias=True),
}


def xor_labels(x):
    return (x[:, 0] != x[:, 1]).long()


def parity_labels(x):
    return x.sum(dim=1).long() % 2


def modular_labels(x):
    return (x[:, 0] + x[:, 1]).long() % MODULUS


def copy_labels(x):
    return x.long()


def composition_targets(x):
    return 2 * x[:, 0] + 2


def logic_labels(x):
    a, b, c, d = x.long().unbind(dim=1)
    return (a & b | c & d).long()


def make_tasks(parity_bits):
    """task -> (draw(n, generator): n inputs, their labels (or targets), classes per output; 0 for a regression)."""
    def bits(columns):
        return lambda n, generator: torch.randint(0, 2, (n, columns), generator=generator).float()

    def digits(columns):
        return lambda n, generator: torch.randint(0, 10, (n, columns), generator=generator).float()
    return {
        'xor': (bits(2), xor_labels, 2),
        f'parity{parity_bits}': (bits(parity_bits), parity_labels, 2),
        'modular': (digits(2), modular_labels, MODULUS),
        'copy': (digits(COPY_LENGTH), copy_labels, 10),
        'composition': (lambda n, generator: torch.randn(n, 1, generator=generator), composition_targets, 0),
        'logic': (bits(4), logic_labels, 2),
    }


def draw_data(task, seed):
    """{split: (inputs, labels)} of one seed: the same for every architecture and rate."""
    draw, label, _ = task
    generator = torch.Generator().manual_seed(seed)
    data = {}
    for split, n in SIZES.items():  # in order, from one generator: the splits are independent draws
        x = draw(n, generator)
        data[split] = (x, label(x))
    return data


def output_size(task):
    """The MLP's outputs: classes for each labelled position (copy: 8 x 10), or 1 for a regression."""
    draw, label, classes = task
    y = label(draw(1, torch.Generator().manual_seed(0)))
    return classes * y[0].numel() if classes else 1


def loss_and_correct(out, y, classes):
    """The training loss and, per labelled position, whether the prediction is right."""
    if not classes:
        return F.mse_loss(out[:, 0], y), (out[:, 0] - y).abs() < TOLERANCE
    logits = out.view(len(y), -1, classes)  # (examples, positions, classes)
    y = y.view(len(y), -1)
    return F.cross_entropy(logits.transpose(1, 2), y), logits.argmax(dim=-1) == y


def accuracy(model, x, y, classes):
    with torch.no_grad():
        out = model(x)
    if not torch.isfinite(out).all():  # diverged: its argmax would be chance, not skill
        return 0.0
    return loss_and_correct(out, y, classes)[1].float().mean().item()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def width_for(arch, n_in, n_out, target):
    """The hidden width whose parameter count is closest to target (counts grow with the width)."""
    def count(width):
        return count_parameters(ARCHITECTURES[arch](n_in, width, n_out))
    high = 1
    while count(high) < target:
        high *= 2
    low = high // 2  # count(low) < target, or low is 0; find the least width reaching target in (low, high]
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < target else (low, middle)
    return min([w for w in (high - 1, high) if w >= 1], key=lambda w: abs(count(w) - target))


def train(arch, width, task, data, lr, seed, steps, batch_size):
    """One run: (validation accuracy, test accuracy, training seconds)."""
    (x, y), classes = data['train'], task[2]
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch](x.shape[1], width, output_size(task))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(seed)  # the same batches for every architecture and rate
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(x), (batch_size,), generator=batches)
        loss = loss_and_correct(model(x[rows]), y[rows], classes)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()  # the gates count silent neurons only while training
    return accuracy(model, *data['val'], classes), accuracy(model, *data['test'], classes), seconds


def seen_share(data):
    """The share of test inputs that occur among the training inputs."""
    train_x, test_x = data['train'][0], data['test'][0]
    return (test_x[:, None, :] == train_x[None, :, :]).all(dim=-1).any(dim=1).float().mean().item()


def compare(tasks, widths_of, args, datasets, runs):
    """{task: {arch: result}} at each architecture's own best rate; widths_of(task name) gives {arch: width}.
    runs holds {(task, arch, width): {lr: [each seed's run]}}, so what both comparisons share trains once."""
    table = {}
    for name, task in tasks.items():
        table[name] = {}
        n_in = datasets[name][0]['train'][0].shape[1]
        for arch, width in widths_of(name).items():
            key = (name, arch, width)
            runs.setdefault(key, {})
            rates = sorted(args.lrs)
            for extensions in range(GRID_EXTENSIONS + 1):  # the grid extended until it brackets the best rate
                for lr in rates:
                    if lr not in runs[key]:
                        runs[key][lr] = [train(arch, width, task, datasets[name][seed], lr, seed, args.steps,
                                               args.batch_size) for seed in range(args.seeds)]
                val = {lr: statistics.mean(run[0] for run in runs[key][lr]) for lr in rates}
                best = max(rates, key=lambda lr: (val[lr], -lr))
                extra = rate_beyond(rates, best)
                if extra is None or extensions == GRID_EXTENSIONS:
                    break
                rates = sorted(rates + [extra])
            table[name][arch] = {'width': width, 'best_lr': best, 'best_at_edge': extra is not None,
                                 'params': count_parameters(ARCHITECTURES[arch](n_in, width, output_size(task))),
                                 'val_accuracy_by_lr': {repr(lr): v for lr, v in val.items()},
                                 'test_accuracy': interval([run[1] for run in runs[key][best]]),
                                 'seconds_per_run': statistics.mean(run[2] for run in runs[key][best])}
        print(f'{name}: done', flush=True)
    return table


def half_interval(accuracy):
    """The 95% t interval's half width (0 for one seed, which has none)."""
    return accuracy['ci95'][1] - accuracy['mean'] if 'ci95' in accuracy else 0.0


def print_table(title, table):
    archs = list(ARCHITECTURES)
    print(f'\n{title:12s}' + ''.join(f'{arch:>17s}' for arch in archs))
    for label, cell in (
            ('test accuracy, mean +- 95% half-interval',
             lambda r: f"{r['test_accuracy']['mean']:.3f} +-{half_interval(r['test_accuracy']):.3f}"),
            ('hidden width / parameters', lambda r: f"{r['width']}/{r['params']}"),
            ('best rate (* at its grid\'s edge) / seconds per run',
             lambda r: f"{r['best_lr']:g}{'*' if r['best_at_edge'] else ''}/{r['seconds_per_run']:.2f}")):
        print(label)
        for name, row in table.items():
            print(f'{name:12s}' + ''.join(f'{cell(row[arch]):>17s}' for arch in archs))


def plot(tables, path):
    archs = list(ARCHITECTURES)
    fig, axes = plt.subplots(len(tables), 1, figsize=(12, 4 * len(tables)), squeeze=False)
    bar = 0.8 / len(archs)
    for ax, (title, table) in zip(axes[:, 0], tables.items()):
        for i, arch in enumerate(archs):
            accuracies = [row[arch]['test_accuracy'] for row in table.values()]
            positions = [t + (i - (len(archs) - 1) / 2) * bar for t in range(len(table))]
            ax.bar(positions, [a['mean'] for a in accuracies], bar, yerr=[half_interval(a) for a in accuracies],
                   capsize=2, label=arch)
        ax.set_xticks(range(len(table)), list(table))
        ax.set_ylim(0, 1.25)  # room above the bars for the legend
        ax.set_ylabel('test accuracy')
        ax.set_title(title.replace('_', ' '))
        ax.legend(ncol=len(archs), fontsize=8, loc='upper center')
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def main():
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument('--seeds', type=ruled(int, '>= 1'), default=3)
    parser.add_argument('--steps', type=ruled(int, '>= 1'), default=400)
    parser.add_argument('--batch_size', type=ruled(int, '>= 1'), default=64)
    parser.add_argument('--width', type=ruled(int, '>= 1'), default=32, help='hidden width of the equal-width table')
    parser.add_argument('--lrs', type=ruled(float, '> 0'), nargs='+', default=[3e-3, 1e-2, 3e-2])
    parser.add_argument('--parity_bits', type=ruled(int, '>= 2'), default=8)
    parser.add_argument('--out_dir', default='analysis_out/toy_tasks')
    args = parser.parse_args()
    check_folder('--out_dir', args.out_dir)
    torch.set_num_threads(1)  # the tensors are tiny: extra threads only add hand-off time

    start = time.time()
    tasks = make_tasks(args.parity_bits)
    datasets = {name: [draw_data(task, seed) for seed in range(args.seeds)] for name, task in tasks.items()}
    n_in = {name: datasets[name][0]['train'][0].shape[1] for name in tasks}
    targets = {name: max(count_parameters(build(n_in[name], args.width, output_size(task)))
                         for build in ARCHITECTURES.values()) for name, task in tasks.items()}

    def equal_widths(name):
        return dict.fromkeys(ARCHITECTURES, args.width)

    def equal_params(name):
        return {arch: width_for(arch, n_in[name], output_size(tasks[name]), targets[name]) for arch in ARCHITECTURES}
    runs = {}
    tables = {'equal_width': compare(tasks, equal_widths, args, datasets, runs),
              'equal_params': compare(tasks, equal_params, args, datasets, runs)}
    for title, table in tables.items():
        print_table(title, table)
    print('parameter targets of the equal-parameter table (the largest count at the base width): '
          + ', '.join(f'{name} {target}' for name, target in targets.items()))
    print(f'({args.seeds} seeds x {args.steps} steps x batch {args.batch_size}, rates {args.lrs}, '
          f'{sum(map(len, runs.values())) * args.seeds} runs, {time.time() - start:.0f}s)')

    os.makedirs(args.out_dir, exist_ok=True)
    report = {'settings': {**vars(args), 'sizes': SIZES, 'threshold': THRESHOLD, 'compartments': COMPARTMENTS},
              'tasks': {name: {'inputs': n_in[name], 'outputs': output_size(task), 'param_target': targets[name],
                               'test_inputs_seen_in_training': statistics.mean(seen_share(d) for d in datasets[name])}
                        for name, task in tasks.items()},
              'comparisons': tables}
    write_file(os.path.join(args.out_dir, 'toy_tasks.json'), json.dumps(report, indent=2))
    plot(tables, os.path.join(args.out_dir, 'toy_tasks.png'))
    print(f'wrote toy_tasks.json and toy_tasks.png to {args.out_dir}')


if __name__ == '__main__':
    try:
        main()
    except WriteError as e:  # an output that cannot be written (a full disk, a link in the way): one line
        fail(str(e))
