"""
plot_loss.py (with eval_bio.py's results as reference lines) and xor_neuron.py run as users run them.

    python -m pytest tests/test_analysis_small.py              (-m "not slow": the quick ones only)
"""

import pytest
import json
import os

import matplotlib.image
import numpy as np

from conftest import message_lines, run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT_LOSS = os.path.join(REPO, 'analysis', 'plot_loss.py')
XOR_NEURON = os.path.join(REPO, 'analysis', 'xor_neuron.py')


def run(tmp_path, script, *args):
    return run_script(tmp_path, script, *args, check=False)


def assert_png(path):
    assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n', path
    assert matplotlib.image.imread(path).shape[0] > 0


def write_log(path, train, evals, torn=False):
    """A log.jsonl as train_bio.py writes it: (iter, loss, tokens) training lines, (iter, train, val, tokens) evals."""
    lines = [{'iter': i, 'train_loss': t, 'val_loss': v, 'tokens': n} for i, t, v, n in evals]
    lines += [{'iter': i, 'loss': loss, 'lr': 1e-3, 'time_ms': 5.0, 'mfu': None, 'sparsity': None, 'tokens': n}
              for i, loss, n in train]
    lines.sort(key=lambda r: (r['iter'], 'val_loss' in r))  # an iter's training line precedes its eval
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in lines)
        if torn:
            f.write('{"iter": 40, "loss": 1.2, "lr"')  # a crash mid-write


def test_plot_loss_summary_matches_the_logs(tmp_path):
    pre_train = [(5, 3.9, 500), (10, 3.1, 1000), (15, 2.8, 1500), (20, 2.7, 2000), (25, 2.75, 2500)]
    pre_evals = [(0, 4.2, 4.25, 0), (10, 3.0, 3.05, 1000), (20, 2.6, 3.1, 2000)]  # val best at 10, not last
    ft_train = [(1, 1.9, 64), (2, 1.7, 128), (3, 1.8, 192)]  # a run with no evals yet
    write_log(tmp_path / 'pre' / 'log.jsonl', pre_train, pre_evals, torn=True)
    write_log(tmp_path / 'ft' / 'log.jsonl', ft_train, [])
    proc = run(tmp_path, PLOT_LOSS, 'pre/log.jsonl', 'ft', '--out_dir', 'out')
    assert proc.returncode == 0, proc.stderr
    for png in ('loss_by_iter.png', 'loss_by_tokens.png'):
        assert_png(tmp_path / 'out' / png)
    summary = json.loads((tmp_path / 'out' / 'loss_summary.json').read_text())
    best = min(pre_evals, key=lambda e: e[2])
    last = max(pre_train + pre_evals, key=lambda r: r[0])
    assert summary['pre'] == {'best_val_loss': best[2], 'best_val_iter': best[0], 'final_val_loss': pre_evals[-1][2],
                              'final_iter': last[0], 'final_train_loss': pre_train[-1][1], 'tokens': last[-1]}
    assert summary['ft'] == {'best_val_loss': None, 'best_val_iter': None, 'final_val_loss': None,
                             'final_iter': ft_train[-1][0], 'final_train_loss': ft_train[-1][1],
                             'tokens': ft_train[-1][2]}


def test_plot_loss_draws_eval_results_as_reference_lines(tmp_path):
    write_log(tmp_path / 'run' / 'log.jsonl', [(5, 3.9, 500), (10, 3.1, 1000)], [(0, 4.2, 4.25, 0), (10, 3.0, 3.05, 1000)])
    gpt2 = {'ckpt': 'gpt2', 'val': {'loss': 3.12, 'tokens': 1000, 'dataset': 'openwebtext', 'split': 'val'},
            'hellaswag': {'acc': 0.29, 'acc_norm': 0.31, 'n': 10042}}
    (tmp_path / 'gpt2.json').write_text(json.dumps(gpt2))
    run_script(tmp_path, PLOT_LOSS, 'run', '--out_dir', 'plain', fresh=True)
    proc = run_script(tmp_path, PLOT_LOSS, 'run', '--evals', 'gpt2.json', '--out_dir', 'out')
    assert 'gpt2: val 3.1200 measured by eval_bio.py (gpt2.json)' in proc.stdout.splitlines()
    summary = json.loads((tmp_path / 'out' / 'loss_summary.json').read_text())
    plain = json.loads((tmp_path / 'plain' / 'loss_summary.json').read_text())
    assert summary == {**plain, 'gpt2': {'val_loss': 3.12, 'dataset': 'openwebtext', 'split': 'val',
                                         'eval_file': 'gpt2.json'}}
    for png in ('loss_by_iter.png', 'loss_by_tokens.png'):
        assert_png(tmp_path / 'out' / png)
        # the reference line (and its legend entry) are drawn: the plot differs from the run's alone
        assert not np.array_equal(matplotlib.image.imread(tmp_path / 'out' / png),
                                  matplotlib.image.imread(tmp_path / 'plain' / png)), png


@pytest.mark.slow
def test_plot_loss_eval_results_it_cannot_draw_are_one_line_errors(tmp_path):
    write_log(tmp_path / 'run' / 'log.jsonl', [(5, 3.9, 500)], [(0, 4.2, 4.25, 0)])
    (tmp_path / 'noval.json').write_text(json.dumps({'ckpt': 'gpt2', 'hellaswag': {'acc': 0.29, 'acc_norm': 0.3, 'n': 9}}))
    val = {'loss': 3.1, 'tokens': 100, 'dataset': 'openwebtext', 'split': 'val'}
    (tmp_path / 'same.json').write_text(json.dumps({'ckpt': 'run', 'val': val}))
    for name, message in (('noval.json', 'noval.json has no val loss to draw; run eval_bio.py with its val task'),
                          ('same.json', "same.json measured 'run', which labels another line too; plot them apart, "
                                        'or rename the run with --labels')):
        proc = run_script(tmp_path, PLOT_LOSS, 'run', '--evals', name, '--out_dir', 'out', check=False)
        assert proc.returncode == 2 and message_lines(proc.stderr) == ['error: ' + message], proc.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_plot_loss_user_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / 'torn.jsonl').write_text('{"iter": 0, "train_lo')
    for args in (['missing/log.jsonl'], ['torn.jsonl']):
        proc = run(tmp_path, PLOT_LOSS, *args)
        assert proc.returncode == 2, args
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith('error: ') and args[0] in proc.stderr
        assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_xor_neuron_oscillating_solves_what_monotone_cannot(tmp_path):
    proc = run_script(tmp_path, XOR_NEURON, '--seeds', '3', '--steps', '1500', '--json', 'out.json', check=False,
                      fresh=True)
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / 'analysis_out' / 'xor' / 'xor_boundaries.png')
    results = json.loads((tmp_path / 'out.json').read_text())
    assert results == json.loads((tmp_path / 'analysis_out' / 'xor' / 'xor.json').read_text())
    assert set(results) == {'oscillating', 'gelu', 'relu', 'tanh', 'sigmoid'}
    for activation, result in results.items():
        assert len(result['accuracy']) == 3 and all(0 <= acc <= 1 for acc in result['accuracy']), activation
        assert result['solved_seeds'] == sum(acc == 1.0 for acc in result['accuracy']), activation
    for monotone in ('relu', 'tanh', 'sigmoid'):
        assert results[monotone]['solved_seeds'] == 0, monotone
    assert results['oscillating']['solved_seeds'] >= 2
