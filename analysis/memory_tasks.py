"""
Working-memory tasks after seed 003 (bio-inspired nanochat): small GPTs trained from scratch, with and
without synapses.py's mechanisms, scored by their accuracy at the answer positions. This is where a
fast-weight scratchpad or synaptic depression should show if it helps.

    python analysis/memory_tasks.py --jobs 2           (about 4 hours of one CPU core: 45 runs, 2 at a time)
    python analysis/memory_tasks.py --seeds 5 --steps 3000 --lrs 1e-3 3e-3 --arms plain fast_weights

Tasks, each a sequence of at most 64 tokens: a context, then queries, each QUERY and a key of the context,
answered by its value. The model is trained to predict the answers (cross-entropy at those positions alone)
and scored by whether its most likely token there is the answer. Each key of the context is asked once, in
random order (at most 8). No answer is ever shown: the next query follows the key at once, so a query sees
the context and the earlier queries' keys, never their values, and knowing which values were asked already
cannot narrow its choice (with the answers shown, a model that ignores the key and names a value not yet
asked scored 0.77 on recall_2). Distractors are any tokens but QUERY and the pairs' keys (other keys and
values included): a queried key occurs once before its query, and neither 'the token after a key' nor 'a
value in sight' gives the answer. Tokens: 16 keys, 16 values, 30 filler tokens, QUERY; after the last
query, padding.
  recall_N      associative recall: N key-value pairs (distinct keys), then the queries. N = 2, 4, 8, 16.
  binding_D     variable binding with distractors: 3 key-value pairs among D distractors (each pair kept
                together, the order shuffled), then the queries. D = 8, 24.
  needle_L_P    needle in a haystack: L distractors with one key-value pair at depth P (0 the start, 1 the
                end), then its query. L = 16, 32, 60; P = 0, 0.5, 1 (training draws P uniformly).
Naming a random value scores 1/16. The table prints beside the arms what a model that ignores the queried key
scores, told even which tokens are the pairs: it names the value the most pairs hold (ties: one at random),
about 1/N on recall_N and 1/3 on binding, and 1 on the needles, whose one pair it need only find (the
needles test finding a pair among distractors, not telling keys apart). An arm is worth only what it scores
above that key-blind line.

Arms (GPTConfig flags on the same model: --n_layer 2 --n_head 4 --n_embd 64, the oscillating MLP, RoPE
(with learned positions even the plain model's recall takes thousands of steps more to appear), block 64,
no dropout): plain; wider (plain, its n_embd raised in steps of 2 x n_head until it holds at least
fast_weights' parameters: 80 at the defaults, the control for the scratchpad's extra weights); presynaptic
(use_presynaptic); fast_weights (use_fast_weights); both (the two); and when asked for with --arms,
stochastic (use_presynaptic with stochastic_release). The fast weights keep synapses.py's defaults (rank
16, decay 0.95), the pools tau_rrp 40.

Fairness: every arm trains the same --steps on the same batches (a mixture of all tasks, drawn from the
seed: seeds 0, 1, ...) from weights drawn from the seed, with AdamW (weight decay 0.1 on matrices, betas 0.9
and 0.95, gradients clipped at 1) and the cosine schedule of train_bio.py (warmup 100, down to a tenth) at
each rate of --lrs. Each arm's rate is the one with the best mean accuracy over seeds and tasks on
validation sequences (ties: the smaller rate), its grid extended 3x beyond a best at its edge until the best is
interior (up to 3 times; compare_runs.py's rule), a best still at an edge starred; the table reports, at that rate, the accuracy on separate
test sequences (--eval_examples per task of each): the mean over seeds with its 95% t interval (compare_runs'
interval), the parameters and the mean seconds per run (one thread; noisy on a shared machine); the mean test
accuracy at a quarter, half and three quarters of the steps too, so that a curve still rising says the arm
has not finished learning; then each arm against the first of --arms, paired seed by seed (the same batches
and sequences): the difference in mean test accuracy with its 95% t interval. Every arm trains on every
seed of --seeds, a number fixed before the run: more seeds are a new run of all arms, not an arm topped up
once its interval is seen.

Prints the table and writes memory_tasks.json (the settings; per arm the rate picked, validation accuracy at
each rate, per task test accuracy per seed with mean and interval, parameters, seconds; the paired
differences) and memory_tasks.png
(accuracy by task, one bar per arm, 95% intervals) to --out_dir (default analysis_out/memory_tasks). All but
the seconds are the same from run to run. A bad argument is one 'error: ' line and exit status 2.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from compare_runs import GRID_EXTENSIONS, interval, rate_beyond  # noqa: E402  (the run comparison's intervals and grids)
from configurator import check_folder, fail, one_line_errors, ruled  # noqa: E402
from files import WriteError, save_figure, write_file  # noqa: E402
from model_bio import GPT, GPTConfig  # noqa: E402
from optimizers import build_optimizers, scheduled_lr  # noqa: E402

KEYS, VALUES, FILLER = range(0, 16), range(16, 32), range(32, 62)
QUERY, PAD = 62, 63
VOCAB, BLOCK = 64, 64
RECALL_PAIRS, BINDING_DISTRACTORS, BINDING_PAIRS = (2, 4, 8, 16), (8, 24), 3
NEEDLE_LENGTHS, NEEDLE_DEPTHS = (16, 32, 60), (0.0, 0.5, 1.0)
MAX_QUERIES = 8  # recall_16's 32 tokens leave room for 8 queries of 3 tokens
TASKS = ([f'recall_{n}' for n in RECALL_PAIRS] + [f'binding_{d}' for d in BINDING_DISTRACTORS]
         + [f'needle_{length}_{depth:g}' for length in NEEDLE_LENGTHS for depth in NEEDLE_DEPTHS])
ARMS = {'plain': {}, 'presynaptic': dict(use_presynaptic=True), 'fast_weights': dict(use_fast_weights=True),
        'both': dict(use_presynaptic=True, use_fast_weights=True),
        'stochastic': dict(use_presynaptic=True, stochastic_release=True), 'wider': {}}
WARMUP = 100
SPLITS = {'val': 1, 'test': 2}  # each split's sequences come from a generator of its own


def pairs(rng, n):
    """n (key, value) pairs with distinct keys."""
    return list(zip(rng.choice(KEYS, n, replace=False).tolist(), rng.choice(VALUES, n).tolist()))


def distractors(rng, n, bound):
    """n tokens that may be anything but QUERY, padding and the keys of the pairs: other keys and values too, so
    that neither 'the token after a key' nor 'a value in sight' is the answer."""
    allowed = sorted(set(range(QUERY)) - {key for key, _ in bound})
    return rng.choice(allowed, n).tolist()


def sequence(task, rng, depth=None):
    """(tokens, [(position, answer)], the pairs' values) of one example of task; depth overrides a needle's
    (training draws it uniformly). Each pair's key is asked once, in random order, up to MAX_QUERIES: QUERY and
    the key, its answer never shown."""
    kind, *params = task.split('_')
    if kind == 'recall':
        bound = pairs(rng, int(params[0]))
        tokens = [t for pair in bound for t in pair]
    elif kind == 'binding':
        bound = pairs(rng, BINDING_PAIRS)
        items = [list(pair) for pair in bound] + [[t] for t in distractors(rng, int(params[0]), bound)]
        tokens = [t for i in rng.permutation(len(items)) for t in items[i]]
    else:
        length = int(params[0])
        bound = pairs(rng, 1)
        tokens = distractors(rng, length, bound)
        at = round((float(params[1]) if depth is None else depth) * (length - 2))
        tokens[at:at + 2] = bound[0]
    asked = [bound[i] for i in rng.permutation(len(bound))[:MAX_QUERIES]]
    answers = []
    for key, value in asked:
        tokens += [QUERY, key]
        answers.append((len(tokens) - 1, value))
    return tokens, answers, [value for _, value in bound]


def key_blind_accuracy(examples):
    """The expected accuracy of a guesser that ignores the queried key but knows the pairs' values: it names
    the value most pairs hold (ties: one of them at random)."""
    scores = []
    for _, answers, values in examples:
        most = max(values.count(v) for v in values)
        favourites = {v for v in values if values.count(v) == most}
        scores += [(answer in favourites) / len(favourites) for _, answer in answers]
    return statistics.mean(scores)


def batch_of(examples):
    """(inputs, targets) padded to BLOCK: each answer the target at its query's key, -1 elsewhere."""
    inputs = torch.full((len(examples), BLOCK), PAD)
    targets = torch.full((len(examples), BLOCK), -1)
    for row, (tokens, answers, _) in enumerate(examples):
        inputs[row, :len(tokens)] = torch.tensor(tokens)
        for position, answer in answers:
            targets[row, position] = answer
    return inputs, targets


def training_batches(seed, steps, batch_size):
    """Every step's batch: tasks drawn uniformly, needle depths uniform in [0, 1]."""
    rng = np.random.default_rng([seed, 0])
    batches = []
    for _ in range(steps):
        examples = []
        for task in rng.choice(TASKS, batch_size):
            examples.append(sequence(task, rng, rng.random() if task.startswith('needle') else None))
        batches.append(batch_of(examples))
    return batches


def eval_sets(seed, n, split):
    """{task: (inputs, targets, key-blind accuracy)} of n examples each."""
    rng = np.random.default_rng([seed, split])
    sets = {}
    for task in TASKS:
        examples = [sequence(task, rng) for _ in range(n)]
        sets[task] = (*batch_of(examples), key_blind_accuracy(examples))
    return sets


def accuracy(model, inputs, targets):
    with torch.no_grad():
        logits, _ = model(inputs, all_positions=True)
    asked = targets != -1
    return (logits.argmax(-1)[asked] == targets[asked]).float().mean().item()


def model_config(args, arm):
    settings = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=BLOCK, vocab_size=VOCAB,
                    bias=False, mlp='bio', use_rope=True, dropout=0.0)
    if arm == 'wider':  # the control for the fast weights' extra parameters: the plain model, widened to hold as many
        wanted = GPT(GPTConfig(**settings, **ARMS['fast_weights'])).get_num_params()
        while GPT(GPTConfig(**settings)).get_num_params() < wanted:
            settings['n_embd'] += 2 * args.n_head  # the head size grows by 2: it stays even, as RoPE needs
    return GPTConfig(**settings, **ARMS[arm])


seed_cache = {}  # seed -> (training batches, {'val', 'test'} sets): the runs of a process share their seed's


def seed_data(seed, args):
    """A seed's training batches and its validation and test sets."""
    if seed not in seed_cache:
        seed_cache.clear()  # the runs go seed by seed: one seed's data held at a time
        seed_cache[seed] = (training_batches(seed, args.steps, args.batch_size),
                            {split: eval_sets(seed, args.eval_examples, number) for split, number in SPLITS.items()})
    return seed_cache[seed]


def run(args, arm, lr, seed):
    """train() on the seed's data; in a worker process too (--jobs), each with one thread."""
    torch.set_num_threads(1)  # small tensors: extra threads only add hand-off time
    return train(args, arm, lr, seed, *seed_data(seed, args))


def train_all(args, jobs, runs, pool):
    """Train each (arm, lr) of jobs on every seed into runs, in pool's processes if one is given: each run is fixed
    by its seed, so the results do not depend on how many run at once."""
    work = [(arm, lr, seed) for seed in range(args.seeds) for arm, lr in jobs]
    results = pool.map(run, [args] * len(work), *zip(*work)) if pool else (run(args, *job) for job in work)
    for (arm, lr, seed), result in zip(work, results):
        runs.setdefault((arm, lr), []).append(result)
        print(f'seed {seed} lr {lr:g} {arm}: mean val accuracy {mean_val_accuracy([result]):.3f}', flush=True)


def sweep(args, pool):
    """Every arm at every rate of --lrs on every seed, each arm's grid extended 3x beyond a best at its edge until
    the best is interior (up to GRID_EXTENSIONS times): ({(arm, lr): a run per seed}, {arm: its rates})."""
    runs, rates = {}, {arm: sorted(args.lrs) for arm in args.arms}
    jobs = [(arm, lr) for lr in args.lrs for arm in args.arms]
    for extensions in range(GRID_EXTENSIONS + 1):
        train_all(args, jobs, runs, pool)
        jobs = []
        for arm in args.arms:
            extra = rate_beyond(rates[arm], best_rate(runs, arm, rates[arm]))
            if extra is not None and extensions < GRID_EXTENSIONS:
                print(f'{arm}: its best rate is at the edge of its grid; adding {extra:g}', flush=True)
                rates[arm] = sorted(rates[arm] + [extra])
                jobs.append((arm, extra))
        if not jobs:
            break
    return runs, rates


def mean_val_accuracy(arm_runs):
    """The mean over runs and tasks of validation accuracy."""
    return statistics.mean(statistics.mean(result[0].values()) for result in arm_runs)


def best_rate(runs, arm, rates):
    """The arm's rate with the best mean validation accuracy (ties: the smaller)."""
    return max(rates, key=lambda lr: (mean_val_accuracy(runs[arm, lr]), -lr))


def curve_steps(steps):
    """The steps after which test accuracy is read along a run: a quarter, half, three quarters and all."""
    return sorted({max(1, round(steps * f)) for f in (0.25, 0.5, 0.75, 1.0)})


def train(args, arm, lr, seed, batches, evals):
    """One run: ({task: validation accuracy}, {task: test accuracy}, seconds, {step: mean test accuracy})."""
    config = model_config(args, arm)  # before the seed: sizing the wider arm draws weights
    torch.manual_seed(seed)
    model = GPT(config)
    optimizer, = build_optimizers(model, 'adamw', lr, 0.1, 0.9, 0.95, 0.0, 0.95, 'cpu')
    seconds, curve = 0.0, {}
    for step, (inputs, targets) in enumerate(batches):
        start = time.perf_counter()
        model.train()
        for group in optimizer.param_groups:
            group['lr'] = scheduled_lr(step, 'cosine', lr, lr / 10, WARMUP, len(batches), 0.2)
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds += time.perf_counter() - start
        if step + 1 in curve_steps(len(batches)):
            model.eval()
            test = {task: accuracy(model, *batch[:2]) for task, batch in evals['test'].items()}
            curve[step + 1] = statistics.mean(test.values())
    val = {task: accuracy(model, *batch[:2]) for task, batch in evals['val'].items()}
    return val, test, seconds, curve


def half_interval(score):
    return score['ci95'][1] - score['mean'] if 'ci95' in score else 0.0


def paired_differences(table, arms):
    """Each arm's mean test accuracy (at its best rate) minus the first arm's (at its own), seed by seed (the
    same batches and sequences), with the interval of the differences."""
    first = table[arms[0]]['mean_test_accuracy']['values']
    return {f'{arm} - {arms[0]}': interval([a - b for a, b in zip(table[arm]['mean_test_accuracy']['values'], first)])
            for arm in arms[1:]}


def plot(table, key_blind, path):
    fig, ax = plt.subplots(figsize=(14, 4.5))
    bar = 0.8 / len(table)
    for i, (arm, row) in enumerate(table.items()):
        scores = [row['test_accuracy'][task] for task in TASKS]
        ax.bar([t + (i - (len(table) - 1) / 2) * bar for t in range(len(TASKS))], [s['mean'] for s in scores], bar,
               yerr=[half_interval(s) for s in scores], capsize=2, label=f"{arm} (lr {row['best_lr']:g})")
    ax.axhline(1 / len(VALUES), color='grey', linewidth=0.8, linestyle=':')
    ax.hlines([key_blind[task] for task in TASKS], [t - 0.45 for t in range(len(TASKS))],
              [t + 0.45 for t in range(len(TASKS))], color='black', linewidth=1.5, label='key-blind')
    ax.set_xticks(range(len(TASKS)), TASKS, rotation=30, ha='right')
    ax.set_ylim(0, 1.2)
    ax.set_ylabel('test accuracy at the answer')
    ax.legend(ncol=len(table), fontsize=8, loc='upper center')
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def main():
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument('--seeds', type=ruled(int, '>= 1'), default=3)
    parser.add_argument('--steps', type=ruled(int, '>= 1'), default=3000)
    parser.add_argument('--batch_size', type=ruled(int, '>= 1'), default=32)
    parser.add_argument('--lrs', type=ruled(float, '> 0'), nargs='+', default=[3e-4, 1e-3, 3e-3])
    parser.add_argument('--arms', nargs='+', choices=list(ARMS),
                        default=['plain', 'wider', 'presynaptic', 'fast_weights', 'both'])
    parser.add_argument('--eval_examples', type=ruled(int, '>= 1'), default=256, help='per task, for each of val and test')
    parser.add_argument('--n_layer', type=ruled(int, '>= 1'), default=2)
    parser.add_argument('--n_head', type=ruled(int, '>= 1'), default=4)
    parser.add_argument('--n_embd', type=ruled(int, '>= 1'), default=64)
    parser.add_argument('--jobs', type=ruled(int, '>= 1'), default=1, help='runs at once, each a process of one thread')
    parser.add_argument('--out_dir', default='analysis_out/memory_tasks')
    args = parser.parse_args()
    if args.n_embd % args.n_head:
        parser.error(f'--n_embd {args.n_embd} is not a multiple of --n_head {args.n_head}')
    if args.n_embd // args.n_head % 2:
        parser.error(f'--n_embd {args.n_embd} / --n_head {args.n_head} is an odd head size; RoPE needs an even one')
    for name in ('arms', 'lrs'):  # a repeat would be run and counted twice, and paired with the wrong seeds
        values = getattr(args, name)
        if len(set(values)) < len(values):
            parser.error(f'--{name} names {next(v for v in values if values.count(v) > 1)} twice; name each once')
    check_folder('--out_dir', args.out_dir)

    start = time.time()
    print(f'seeds {list(range(args.seeds))} for every arm, fixed before any run', flush=True)
    with contextlib.ExitStack() as stack:
        runs, rates = sweep(args, stack.enter_context(ProcessPoolExecutor(args.jobs)) if args.jobs > 1 else None)

    table = {}
    for arm in args.arms:
        val = {lr: mean_val_accuracy(runs[arm, lr]) for lr in rates[arm]}
        best = best_rate(runs, arm, rates[arm])
        table[arm] = {'best_lr': best, 'best_lr_at_edge': rate_beyond(rates[arm], best) is not None,
                      'val_accuracy_by_lr': {repr(lr): v for lr, v in val.items()},
                      'params': GPT(model_config(args, arm)).get_num_params(),
                      'test_accuracy': {task: interval([run[1][task] for run in runs[arm, best]]) for task in TASKS},
                      'mean_test_accuracy': interval([statistics.mean(run[1].values()) for run in runs[arm, best]]),
                      'mean_test_accuracy_by_step': {step: interval([run[3][step] for run in runs[arm, best]])
                                                     for step in curve_steps(args.steps)},
                      'seconds_per_run': statistics.mean(run[2] for run in runs[arm, best])}
    # what ignoring the key scores, on the same test sequences (the mean over seeds)
    test_sets = [eval_sets(seed, args.eval_examples, SPLITS['test']) for seed in range(args.seeds)]
    key_blind = {task: statistics.mean(sets[task][2] for sets in test_sets) for task in TASKS}
    key_blind['mean'] = statistics.mean(key_blind.values())

    print(f"\n{'task':14s}{'key-blind':>10s}" + ''.join(f'{arm:>16s}' for arm in args.arms))
    for task in TASKS + ['mean']:
        cells = [table[arm]['mean_test_accuracy'] if task == 'mean' else table[arm]['test_accuracy'][task]
                 for arm in args.arms]
        print(f'{task:14s}{key_blind[task]:10.3f}' + ''.join(f"{c['mean']:.3f} +-{half_interval(c):.3f}".rjust(16) for c in cells))
    for step in curve_steps(args.steps):
        cells = [table[arm]['mean_test_accuracy_by_step'][step] for arm in args.arms]
        print(f"{f'mean @{step}':14s}{'':10s}" + ''.join(f"{c['mean']:.3f} +-{half_interval(c):.3f}".rjust(16) for c in cells))
    print(f"{'best rate (* at an edge)':24s}"
          + ''.join(f"{table[arm]['best_lr']:g}{'*' if table[arm]['best_lr_at_edge'] else ''}".rjust(16) for arm in args.arms))
    print(f"{'parameters':24s}" + ''.join(f"{table[arm]['params']:>16,}" for arm in args.arms))
    print(f"{'s per run':24s}" + ''.join(f"{table[arm]['seconds_per_run']:>16.1f}" for arm in args.arms))
    paired = paired_differences(table, args.arms)
    for name, diff in paired.items():
        print(f"paired {name}, mean test accuracy: {diff['mean']:+.3f} +-{half_interval(diff):.3f}")
    print(f'(test accuracy at each arm\'s best rate, mean +- 95% half-interval over {args.seeds} seeds; '
          f'{args.steps} steps x batch {args.batch_size}, --lrs {args.lrs}, {time.time() - start:.0f}s)')

    os.makedirs(args.out_dir, exist_ok=True)
    write_file(os.path.join(args.out_dir, 'memory_tasks.json'),
               json.dumps({'settings': vars(args), 'tasks': TASKS, 'key_blind': key_blind, 'arms': table, 'paired': paired},
                          indent=2))
    plot(table, key_blind, os.path.join(args.out_dir, 'memory_tasks.png'))
    print(f'wrote memory_tasks.json and memory_tasks.png to {args.out_dir}')


if __name__ == '__main__':
    try:
        main()
    except WriteError as e:  # an output that cannot be written (a full disk, a link in the way): one line
        fail(str(e))
