"""
analysis/toy_tasks.py: its task generators' labels on known inputs, and a short run as a user runs it,
checked against parameter counts worked out by hand here; a bad argument is one line.

    python -m pytest tests/test_toy_tasks.py              (-m "not slow": without the script's short run)
"""
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import matplotlib.image
import pytest
import torch

from conftest import REPO, message_lines, run_script

sys.path.insert(0, os.path.join(REPO, 'analysis'))
import toy_tasks  # noqa: E402

SCRIPT = os.path.join(REPO, 'analysis', 'toy_tasks.py')
ARCHS = ['gelu', 'relu', 'v3', 'v3+gate', 'v2', 'v1']
# task -> (inputs, outputs) with --parity_bits 6: copy gives back 8 digits of 10 classes each
SHAPES = {'xor': (2, 2), 'parity6': (6, 2), 'modular': (2, 5), 'copy': (8, 80), 'composition': (1, 1), 'logic': (4, 2)}
QUICK = ['--seeds', '2', '--steps', '5', '--batch_size', '16', '--width', '8', '--lrs', '0.01', '0.03',
         '--parity_bits', '6', '--out_dir', 'out']


def expected_params(arch, n_in, width, n_out):
    """Each MLP's parameters, counted from its definition: Linear(i, h) has (i + 1) h; each oscillation 3 per neuron
    (omega, phi, baseline); the sparse gate 2 per neuron; v2's event layer two h x h Linears; v1's dendrites
    K = 2 branches (1 for a single input) of ceil(i / K) inputs, a K x K lateral matrix and a soma Linear(2 K h, h)."""
    linear = {'gelu': 0, 'relu': 0, 'v3': 3 * width, 'v3+gate': 5 * width,
              'v2': 3 * width + 2 * (width + 1) * width + 3 * width}
    if arch == 'v1':
        k = min(2, n_in)
        dendrites = k * (math.ceil(n_in / k) + 1) * width + k * k + (2 * k * width + 1) * width
        return dendrites + 3 * width + 2 * (width + 1) * width + 3 * width + (width + 1) * n_out
    return (n_in + 1) * width + linear[arch] + (width + 1) * n_out


def test_task_labels_on_known_inputs():
    x = torch.tensor
    assert toy_tasks.xor_labels(x([[0., 0.], [0., 1.], [1., 0.], [1., 1.]])).tolist() == [0, 1, 1, 0]
    bits = x([[1., 0., 1., 1., 0., 0.], [1., 1., 0., 0., 0., 0.], [0.] * 6, [1.] * 6, [1., 1., 1., 1., 1., 0.]])
    assert toy_tasks.parity_labels(bits).tolist() == [1, 0, 0, 0, 1]
    assert toy_tasks.modular_labels(x([[7., 8.], [9., 9.], [3., 4.], [0., 0.], [2., 2.]])).tolist() == [0, 3, 2, 0, 4]
    digits = x([[3., 1., 4., 1., 5., 9., 2., 6.]])
    assert toy_tasks.copy_labels(digits).tolist() == [[3, 1, 4, 1, 5, 9, 2, 6]]
    assert toy_tasks.composition_targets(x([[0.], [-1.], [1.5]])).tolist() == [2., 0., 5.]
    abcd = x([[1., 1., 0., 0.], [0., 0., 1., 1.], [1., 0., 1., 0.], [0., 0., 0., 0.], [0., 1., 1., 1.]])
    assert toy_tasks.logic_labels(abcd).tolist() == [1, 1, 0, 0, 1]
    # the drawn inputs are the values the labels are defined on, and each label fits its inputs
    for name, task in toy_tasks.make_tasks(6).items():
        data = toy_tasks.draw_data(task, seed=0)
        (inputs, labels), classes = data['train'], task[2]
        assert inputs.shape == (1024, SHAPES[name][0]), name
        assert torch.equal(labels, task[1](inputs)), name
        if name != 'composition':
            assert inputs.eq(inputs.round()).all() and inputs.min() == 0 and inputs.max() == (1 if classes == 2 else 9)
            assert set(labels.unique().tolist()) == set(range(classes)), name  # every class occurs


def test_a_run_is_deterministic_and_scores_on_the_held_out_splits():
    task = toy_tasks.make_tasks(6)['modular']
    data = toy_tasks.draw_data(task, seed=1)
    assert torch.equal(data['test'][0], toy_tasks.draw_data(task, seed=1)['test'][0])
    assert not torch.equal(data['val'][0], data['test'][0])
    for arch in ARCHS:
        first, again = (toy_tasks.train(arch, 8, task, data, 0.01, 1, 5, 16) for _ in range(2))
        assert first[:2] == again[:2], arch
    # a model whose outputs are not finite scores 0, not chance
    broken = torch.nn.Linear(2, 5)
    with torch.no_grad():
        broken.bias.fill_(float('nan'))
    assert toy_tasks.accuracy(broken, *data['test'], 5) == 0.0


@pytest.mark.slow
def test_quick_run_reports_every_task_and_architecture(tmp_path):
    proc = run_script(tmp_path, SCRIPT, *QUICK, fresh=True)
    png = tmp_path / 'out' / 'toy_tasks.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and matplotlib.image.imread(png).shape[0] > 0
    report = json.loads((tmp_path / 'out' / 'toy_tasks.json').read_text())
    assert list(report['comparisons']) == ['equal_width', 'equal_params']
    assert list(report['tasks']) == list(SHAPES)
    for name, (n_in, n_out) in SHAPES.items():
        task = report['tasks'][name]
        assert (task['inputs'], task['outputs']) == (n_in, n_out), name
        # the target is the largest count at the base width: v1's, whose H x H matrices outgrow the rest
        assert task['param_target'] == max(expected_params(a, n_in, 8, n_out) for a in ARCHS) \
            == expected_params('v1', n_in, 8, n_out), name
        for comparison, table in report['comparisons'].items():
            assert list(table[name]) == ARCHS, (comparison, name)
            for arch, result in table[name].items():
                where = (comparison, name, arch)
                assert result['params'] == expected_params(arch, n_in, result['width'], n_out), where
                accuracy = result['test_accuracy']
                assert len(accuracy['values']) == 2 and all(0 <= a <= 1 for a in accuracy['values']), where
                assert accuracy['mean'] == pytest.approx(sum(accuracy['values']) / 2), where
                low, high = accuracy['ci95']
                assert low <= accuracy['mean'] <= high, where
                val = {float(lr): v for lr, v in result['val_accuracy_by_lr'].items()}
                rates = sorted(val)  # the grid, and 3x beyond it while the best lay at an edge
                assert {0.01, 0.03} <= set(rates) and len(rates) <= 2 + 3, where
                assert all(math.isclose(b / a, 3, rel_tol=0.02) for a, b in zip(rates, rates[1:])), where
                assert result['best_lr'] == max(val, key=lambda lr: (val[lr], -lr)), where  # ties: the smaller
                at_edge = result['best_lr'] in (rates[0], rates[-1])
                assert result['best_at_edge'] == at_edge and (not at_edge or len(rates) == 5), where
                assert result['seconds_per_run'] > 0, where
                if comparison == 'equal_width':
                    assert result['width'] == 8, where
                else:  # within a few percent of the target, and no neighbouring width closer
                    target, width = task['param_target'], result['width']
                    miss = abs(result['params'] - target)
                    assert miss <= 0.05 * target, where
                    for neighbour in (width - 1, width + 1):
                        if neighbour >= 1:
                            assert abs(expected_params(arch, n_in, neighbour, n_out) - target) >= miss, where
        printed = [line for line in proc.stdout.splitlines() if line.startswith(name + ' ')]
        assert len(printed) == 6, (name, proc.stdout)  # three rows in each comparison's table
    # copy's and composition's test inputs are new; xor's four patterns all occur in training
    assert report['tasks']['xor']['test_inputs_seen_in_training'] == 1.0
    assert report['tasks']['copy']['test_inputs_seen_in_training'] == 0.0
    assert report['tasks']['composition']['test_inputs_seen_in_training'] == 0.0
    widths = {comparison: table['xor']['gelu']['width'] for comparison, table in report['comparisons'].items()}
    assert widths['equal_width'] < widths['equal_params']


def test_bad_arguments_are_one_error_line(tmp_path):
    (tmp_path / 'notes.txt').write_text('not a folder\n')
    cases = [(['--seeds', '0'], 'error: argument --seeds: 0 is not allowed: it must be >= 1'),
             (['--lrs', '0.01', '-1'], 'error: argument --lrs: -1 is not allowed: it must be > 0'),
             (['--out_dir', 'notes.txt'],
              f'error: --out_dir=notes.txt cannot be a folder: {tmp_path}/notes.txt is a file; name another folder')]

    def run(args):
        return run_script(tmp_path, SCRIPT, *args, check=False, timeout=120)
    with ThreadPoolExecutor(len(cases)) as pool:  # each spends its time importing torch
        procs = list(pool.map(run, [args for args, _ in cases]))
    for (args, expected), proc in zip(cases, procs):
        assert proc.returncode == 2 and message_lines(proc.stderr) == [expected], (args, proc.stderr)
    assert sorted(os.listdir(tmp_path)) == ['notes.txt']
