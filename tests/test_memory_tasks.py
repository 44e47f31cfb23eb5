"""
analysis/memory_tasks.py: its sequences hold what its docstring says (each queried key once before its query,
its value right after it, no answer ever shown, distractors that give nothing away), the key-blind baseline,
and a short run as a user runs it; a bad argument is one line.

    python -m pytest tests/test_memory_tasks.py              (-m "not slow": without the script's short run)
"""
import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import matplotlib.image
import numpy as np
import pytest

from conftest import REPO, message_lines, run_script

sys.path.insert(0, os.path.join(REPO, 'analysis'))
import memory_tasks as mt  # noqa: E402
from model_bio import GPT  # noqa: E402

SCRIPT = os.path.join(REPO, 'analysis', 'memory_tasks.py')


@pytest.mark.parametrize('task', mt.TASKS)
def test_every_query_is_answered_by_the_value_after_its_one_key(task):
    rng = np.random.default_rng(0)
    for _ in range(50):
        tokens, answers, values = mt.sequence(task, rng)
        context = tokens[:tokens.index(mt.QUERY)]
        # after the context only the queries, QUERY and a key each: no answer is shown, so none can be ruled out
        assert tokens[len(context):] == [t for position, _ in answers for t in (mt.QUERY, tokens[position])]
        assert len(tokens) <= mt.BLOCK and answers
        kind, *params = task.split('_')
        asked = {'recall': min(int(params[0]), mt.MAX_QUERIES), 'binding': mt.BINDING_PAIRS, 'needle': 1}[kind]
        assert len(answers) == asked
        keys = []
        for position, answer in answers:
            key = tokens[position]
            assert tokens[position - 1] == mt.QUERY and key in mt.KEYS and answer in mt.VALUES
            assert context.count(key) == 1 and context[context.index(key) + 1] == answer
            keys.append(key)
        assert len(set(keys)) == len(keys)  # each key asked once
        # the pairs' values, which the key-blind guesser is told: every pair's (recall_16 asks 8 of its 16)
        assert sorted(values) == sorted(context[1::2] if kind == 'recall' else [a for _, a in answers])
        if kind == 'needle':
            length, depth = int(params[0]), float(params[1])
            assert len(context) == length and context.index(keys[0]) == round(depth * (length - 2))
        if kind == 'binding':
            assert len(context) == 2 * mt.BINDING_PAIRS + int(params[0])


def test_the_key_blind_guesser_names_the_value_most_pairs_hold():
    # (tokens, [(position, answer)], the pairs' values): only the answers and the values matter to it
    assert mt.key_blind_accuracy([([], [(0, 5), (1, 5), (2, 7)], [5, 5, 7])]) == pytest.approx(2 / 3)
    assert mt.key_blind_accuracy([([], [(0, 5)], [5, 7]), ([], [(0, 9)], [9])]) == pytest.approx(0.75)
    # on the generator's sequences: about 1/N on recall_N (values repeat now and then), 1 on a needle's one pair
    rng = np.random.default_rng(3)
    blind = {task: mt.key_blind_accuracy([mt.sequence(task, rng) for _ in range(400)])
             for task in ('recall_2', 'recall_8', 'binding_8', 'needle_32_0.5')}
    assert 0.5 <= blind['recall_2'] < 0.56 and 0.125 <= blind['recall_8'] < 0.3 and 1 / 3 <= blind['binding_8'] < 0.45
    assert blind['needle_32_0.5'] == 1


def test_distractors_hold_other_keys_and_values_but_never_a_pair_s_key():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(200):
        bound = mt.pairs(rng, 3)
        drawn = mt.distractors(rng, 30, bound)
        assert not {key for key, _ in bound} & set(drawn) and mt.QUERY not in drawn and mt.PAD not in drawn
        seen.update(drawn)
    assert seen & set(mt.KEYS) and seen & set(mt.VALUES)


def test_batches_put_each_answer_at_its_query_s_key():
    examples = [mt.sequence('recall_4', np.random.default_rng(2)) for _ in range(3)]
    inputs, targets = mt.batch_of(examples)
    assert inputs.shape == targets.shape == (3, mt.BLOCK)
    for row, (tokens, answers, _) in enumerate(examples):
        assert inputs[row, :len(tokens)].tolist() == tokens and (inputs[row, len(tokens):] == mt.PAD).all()
        assert {p: a for p, a in answers} == {p: targets[row, p].item() for p in range(mt.BLOCK) if targets[row, p] >= 0}


@pytest.mark.parametrize('n_layer, n_head, n_embd', [(2, 4, 64), (3, 2, 32)])
def test_the_wider_arm_is_the_narrowest_plain_model_with_the_fast_weights_parameters(n_layer, n_head, n_embd):
    shape = argparse.Namespace(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    wider, fast = mt.model_config(shape, 'wider'), mt.model_config(shape, 'fast_weights')
    assert not wider.use_fast_weights and not wider.use_presynaptic and wider.n_embd % (2 * n_head) == 0
    narrower = argparse.Namespace(n_layer=n_layer, n_head=n_head, n_embd=wider.n_embd - 2 * n_head)
    params = lambda config: GPT(config).get_num_params()  # noqa: E731
    assert params(mt.model_config(narrower, 'plain')) < params(fast) <= params(wider)


def test_each_arm_is_paired_seed_by_seed_with_the_first():
    table = {arm: {'mean_test_accuracy': {'values': values}}
             for arm, values in (('plain', [0.2, 0.3, 0.4]), ('fast', [0.5, 0.5, 0.6]), ('wide', [0.2, 0.4, 0.3]))}
    paired = mt.paired_differences(table, ['plain', 'fast', 'wide'])
    assert list(paired) == ['fast - plain', 'wide - plain']
    assert paired['fast - plain']['values'] == pytest.approx([0.3, 0.2, 0.2])
    low, high = paired['fast - plain']['ci95']  # mean 0.2333, sd 0.0577, t(2) 4.303
    assert (low, high) == pytest.approx((0.2333 - 0.1434, 0.2333 + 0.1434), abs=1e-4)
    assert paired['wide - plain']['mean'] == pytest.approx(0.0)


def test_each_arm_s_grid_is_extended_until_it_brackets_its_best_rate(monkeypatch):
    # validation accuracy peaks at 1e-2 for one arm and at 3e-4 for the other: from 1e-3 and 3e-3 the first
    # grid grows up (9e-3, 2.7e-2), the second down (3.33e-4, 1.11e-4); runs are the seeds' alone
    peak = {'plain': 1e-2, 'both': 3e-4}
    monkeypatch.setattr(mt, 'run', lambda args, arm, lr, seed: ({'t': -abs(np.log(lr / peak[arm]))}, {}, 0.0, {}))
    args = argparse.Namespace(arms=['plain', 'both'], lrs=[1e-3, 3e-3], seeds=2)
    runs, rates = mt.sweep(args, None)
    assert rates == {'plain': [1e-3, 3e-3, 9e-3, 2.7e-2], 'both': [1.11e-4, 3.33e-4, 1e-3, 3e-3]}
    assert mt.best_rate(runs, 'plain', rates['plain']) == 9e-3 and mt.best_rate(runs, 'both', rates['both']) == 3.33e-4
    assert all(len(seeds) == 2 for seeds in runs.values()) and len(runs) == 8


@pytest.mark.slow
def test_a_short_run_as_a_user_runs_it(tmp_path):
    proc = run_script(tmp_path, SCRIPT, '--seeds', '2', '--steps', '2', '--batch_size', '4', '--eval_examples', '2',
                      '--lrs', '1e-3', '3e-3', '--arms', 'plain', 'both', '--n_embd', '16', '--out_dir', 'out',
                      fresh=True)
    report = json.loads((tmp_path / 'out' / 'memory_tasks.json').read_text())
    assert report['tasks'] == mt.TASKS and set(report['arms']) == {'plain', 'both'}
    plain, both = report['arms']['plain'], report['arms']['both']
    assert both['params'] > plain['params']
    for arm in (plain, both):
        # the grid, extended 3x beyond an edge's best until the best is interior (or 3 times, then starred)
        rates = sorted(float(lr) for lr in arm['val_accuracy_by_lr'])
        assert {1e-3, 3e-3} <= set(rates) and len(rates) <= 2 + mt.GRID_EXTENSIONS and arm['best_lr'] in rates
        assert arm['best_lr_at_edge'] == (arm['best_lr'] in (rates[0], rates[-1]))
        assert arm['best_lr_at_edge'] or rates[0] < arm['best_lr'] < rates[-1]
        assert len(rates) == 2 or arm['val_accuracy_by_lr'][repr(arm['best_lr'])] == max(arm['val_accuracy_by_lr'].values())
        for score in arm['test_accuracy'].values():
            assert len(score['values']) == 2 and all(0 <= v <= 1 for v in score['values'])
            assert score['ci95'][0] <= score['mean'] <= score['ci95'][1]
    assert list(report['paired']) == ['both - plain'] and len(report['paired']['both - plain']['values']) == 2
    assert 'needle_60_0.5' in proc.stdout and 'best rate' in proc.stdout and 'paired both - plain' in proc.stdout
    assert 'key-blind' in proc.stdout and 'seeds [0, 1] for every arm, fixed before any run' in proc.stdout
    assert set(report['key_blind']) == {*mt.TASKS, 'mean'} and report['key_blind']['needle_16_0'] == 1
    # accuracy along the run, at a quarter, half, three quarters and all of the (2) steps
    assert list(plain['mean_test_accuracy_by_step']) == ['1', '2'] and 'mean @2' in proc.stdout
    assert matplotlib.image.imread(tmp_path / 'out' / 'memory_tasks.png').shape[0] > 100
    # two runs at a time (--jobs 2, processes) give the same report but for the seconds
    run_script(tmp_path, SCRIPT, '--seeds', '2', '--steps', '2', '--batch_size', '4', '--eval_examples', '2',
               '--lrs', '1e-3', '3e-3', '--arms', 'plain', 'both', '--n_embd', '16', '--out_dir', 'two', '--jobs', '2',
               fresh=True)
    parallel = json.loads((tmp_path / 'two' / 'memory_tasks.json').read_text())
    for result in (report, parallel):
        del result['settings']['jobs'], result['settings']['out_dir']
        for arm in result['arms'].values():
            del arm['seconds_per_run']
    assert parallel == report


def test_a_bad_argument_is_one_line(tmp_path):
    cases = ((['--n_embd', '30', '--n_head', '4'], '--n_embd 30 is not a multiple of --n_head 4'),
             (['--n_embd', '12', '--n_head', '4'], '--n_embd 12 / --n_head 4 is an odd head size'),
             (['--arms', 'plain', 'both', 'both'], '--arms names both twice'),
             (['--lrs', '1e-3', '0.001'], '--lrs names 0.001 twice'),
             (['--steps', '0'], '--steps'))
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda case: run_script(tmp_path, SCRIPT, *case[0], check=False), cases))
    for (_, message), proc in zip(cases, procs):
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(message_lines(proc.stderr)) == 1, proc.stderr
