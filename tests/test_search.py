"""
analysis/search.py: a CMA-ES study over train_bio.py settings, as users run it: trials that train and are
scored, a study that resumes where it stopped, its table and plot, and bad arguments in one line.

    python -m pytest tests/test_search.py
"""

import ast
import json
import os
import sys

import matplotlib.image
import pytest

from conftest import REPO, TINY, message_lines, run_script

pytest.importorskip('optuna', reason='analysis/search.py needs optuna (requirements.txt)')
sys.path.insert(0, os.path.join(REPO, 'analysis'))
import search  # noqa: E402

SCRIPT = 'analysis/search.py'


def literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, as --key=value reads it


def config(workdir):
    """TINY's settings as a config file, which a search needs."""
    (workdir / 'tiny_cfg.py').write_text(''.join(f"{a[2:].split('=')[0]} = {literal(a.split('=', 1)[1])!r}\n" for a in TINY))
    return 'tiny_cfg.py'


@pytest.mark.slow
def test_a_study_trains_its_trials_resumes_and_names_its_best(workdir):
    space = ['--space', 'learning_rate=1e-3:3e-2:log', 'moe_change_every=1:4:int']
    args = ['--config', config(workdir), '--set', 'use_moe=True', 'max_iters=4', 'eval_interval=4', *space]
    first = run_script(workdir, SCRIPT, *args, '--trials', '2', '--study_dir', 'study')
    assert first.stdout.count('best so far') == 2
    again = run_script(workdir, SCRIPT, *args, '--trials', '3', '--study_dir', 'study')  # goes on: one more
    assert again.stdout.count('best so far') == 1 and 'trial 2: val' in again.stdout
    report = json.loads((workdir / 'study' / 'search.json').read_text())
    values = [t['val_loss'] for t in report['trials']]
    assert [t['number'] for t in report['trials']] == [0, 1, 2] and report['best']['val_loss'] == min(values)
    for t in report['trials']:
        assert 1e-3 <= t['settings']['learning_rate'] <= 3e-2 and t['settings']['moe_change_every'] in range(1, 5)
        log = (workdir / 'study' / f"trial-{t['number']}" / 'train.out').read_text()
        assert f"learning_rate = {t['settings']['learning_rate']!r}" in log and 'seed = 1' in log
    assert 'python analysis/compare_runs.py --config tiny_cfg.py --seeds 3' in again.stdout and 'defaults:' in again.stdout
    assert matplotlib.image.imread(workdir / 'study' / 'search.png').shape[0] > 200
    # the study keeps its space: another one in the same folder would mix trials that do not compare
    other = run_script(workdir, SCRIPT, *args[:-1], 'moe_change_every=1:8:int', '--trials', '4', '--study_dir', 'study',
                       check=False)
    assert other.returncode == 2 and 'study holds a study of another space' in message_lines(other.stderr)[0]
    assert len(json.loads((workdir / 'study' / 'search.json').read_text())['trials']) == 3


@pytest.mark.parametrize('space, message', [
    ('learning_rate=3e-2:1e-3', "--space 'learning_rate=3e-2:1e-3': needs LOW < HIGH"),
    ('learning_rate=0:1:log', 'above 0 on a log scale'),
    ('moe_tax=a:b', "--space 'moe_tax=a:b': LOW and HIGH must be numbers"),
    ('moe_change_every=1.5:4:int', 'must be whole numbers'),
    ('learning_rate', "--space 'learning_rate': write NAME=LOW:HIGH"),
])
def test_a_bad_space_is_named(space, message, capsys):
    with pytest.raises(SystemExit) as e:
        search.parse_space([space])
    lines = message_lines(capsys.readouterr().err)
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0]


@pytest.mark.slow
def test_a_setting_train_bio_refuses_stops_the_search_in_one_line_before_any_trial(workdir):
    proc = run_script(workdir, SCRIPT, '--config', config(workdir), '--space', 'learnin_rate=1e-3:2e-3',
                      '--study_dir', 'study', check=False)
    lines = message_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "unknown config key 'learnin_rate'" in lines[0], proc.stderr
    assert not (workdir / 'study').exists()
    # a range whose end train_bio.py refuses, and a search on a seed the judging uses, before any trial too
    for args, message in [(['--space', 'learning_rate=1e-3:2e-3', 'moe_tax=-0.1:0.1'], 'moe_tax = -0.1 is not allowed'),
                          (['--space', 'learning_rate=1e-3:2e-3', '--seed', '1338'], '--seed 1338 is one of the seeds')]:
        proc = run_script(workdir, SCRIPT, '--config', config(workdir), *args, '--study_dir', 'study', check=False)
        lines = message_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
        assert not (workdir / 'study').exists()
