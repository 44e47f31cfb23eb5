"""
compare_runs.py --evals run as users run it: eval_bio.py's results files side by side, printed and written
as Markdown and JSON; results files that are broken or crafted are one 'error: ' line each.

    python -m pytest tests/test_compare_evals.py              (-m "not slow": the quick ones only)
"""

import json
import os

import pytest

from conftest import REPO, message_lines, run_script

COMPARE = os.path.join(REPO, 'analysis', 'compare_runs.py')
WIGGLE = {'ckpt': 'out-wiggle/ckpt.pt', 'val': {'loss': 3.3, 'tokens': 1000, 'dataset': 'openwebtext', 'split': 'val'},
          'hellaswag': {'acc': 0.28, 'acc_norm': 0.3, 'n': 100},
          'harness': {'arc_easy': {'acc': 0.43, 'acc_norm': 0.39, 'n': 2376}}}
GPT2 = {'ckpt': 'gpt2', 'val': {'loss': 3.12, 'tokens': 1000, 'dataset': 'openwebtext', 'split': 'train'},
        'bpb': {'bpb': 1.1, 'bytes': 5000, 'tokens': 1200, 'source': 'input.txt'},
        'hellaswag': {'acc': 0.29, 'acc_norm': 0.31, 'n': 10042}}


def write_json(path, results):
    path.write_text(json.dumps(results))


def printed_table(stdout):
    """{row: [cells]} of the text table compare_runs.py prints, its header under 'metric'."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines()
            if line and not line.startswith(('note:', 'wrote '))}


def test_evals_table_shows_each_file_side_by_side(tmp_path):
    write_json(tmp_path / 'wiggle.json', WIGGLE)
    write_json(tmp_path / 'gpt2.json', GPT2)
    proc = run_script(tmp_path, COMPARE, '--evals', 'wiggle.json', 'gpt2.json', '--labels', 'wiggle', 'gpt2',
                      '--out_dir', 'out')
    table = printed_table(proc.stdout)
    assert table['metric'] == ['wiggle', 'gpt2']
    assert table['val.loss'] == ['3.3000', '3.1200'] and table['val.split'] == ['val', 'train']
    assert table['hellaswag.n'] == ['100', '10042'] and table['hellaswag.acc_norm'] == ['0.3000', '0.3100']
    assert table['bpb.bpb'] == ['-', '1.1000'] and table['harness.arc_easy.acc'] == ['0.4300', '-']
    rows = ['val.loss', 'val.tokens', 'val.dataset', 'val.split', 'bpb.bpb', 'bpb.bytes', 'bpb.tokens', 'bpb.source',
            'hellaswag.acc', 'hellaswag.acc_norm', 'hellaswag.n', 'harness.arc_easy.acc', 'harness.arc_easy.acc_norm',
            'harness.arc_easy.n']
    assert list(table) == ['metric', *rows]  # eval_bio.py's own tasks first, though the first file has no bpb
    # the split and hellaswag's n differ, so those tasks were measured on different data; the dataset does not
    note = 'note: measured on different data, so these tasks do not compare: val.split val vs train; hellaswag.n 100 vs 10042'
    assert note in proc.stdout.splitlines()
    # the same table as Markdown and as data
    markdown = (tmp_path / 'out' / 'compare_evals.md').read_text().splitlines()
    assert markdown[:3] == ['| metric | wiggle | gpt2 |', '|---|---:|---:|', '| val.loss | 3.3000 | 3.1200 |']
    assert '| bpb.bpb | - | 1.1000 |' in markdown and markdown[-1] == note
    data = json.loads((tmp_path / 'out' / 'compare_evals.json').read_text())
    assert data['columns'] == ['wiggle', 'gpt2'] and data['files'] == ['wiggle.json', 'gpt2.json']
    assert list(data['rows']) == rows and data['different_data'] == ['val.split', 'hellaswag.n']
    assert data['rows']['val.loss'] == [3.3, 3.12] and data['rows']['bpb.bpb'] == [None, 1.1]
    assert data['rows']['harness.arc_easy.n'] == [2376, None]


def test_evals_on_the_same_data_are_named_by_their_ckpt_without_a_note(tmp_path):
    write_json(tmp_path / 'a.json', WIGGLE)
    write_json(tmp_path / 'b.json', {**WIGGLE, 'ckpt': 'gpt2', 'val': {**WIGGLE['val'], 'loss': 3.1}})
    out = tmp_path / 'analysis_out' / 'evals'
    out.mkdir(parents=True)
    for name in ('compare_evals.md', 'compare_evals.json.tmp'):  # planted links: removed or replaced, never written through
        os.symlink(tmp_path / 'a.json', out / name)
    proc = run_script(tmp_path, COMPARE, '--evals', 'a.json', 'b.json')  # into analysis_out/evals, the default
    assert json.loads((tmp_path / 'a.json').read_text()) == WIGGLE
    assert not os.path.islink(out / 'compare_evals.md') and not os.path.exists(out / 'compare_evals.json.tmp')
    table = printed_table(proc.stdout)
    assert table['metric'] == ['out-wiggle/ckpt.pt', 'gpt2'] and table['val.loss'] == ['3.3000', '3.1000']
    assert 'note:' not in proc.stdout
    data = json.loads((tmp_path / 'analysis_out' / 'evals' / 'compare_evals.json').read_text())
    assert data['different_data'] == [] and data['columns'] == ['out-wiggle/ckpt.pt', 'gpt2']


DEEP = '{"ckpt": "x", "val": ' + '[' * 100_000 + ']' * 100_000 + '}'
HOSTILE = [  # (the file's contents, the one line compare_runs.py --evals must print about it)
    (None, 'bad.json: no such file; pass a results file written by eval_bio.py'),
    ('not json {', 'bad.json is not JSON (Expecting value: line 1 column 1 (char 0))'),
    ('[1, 2]', 'bad.json holds an array, not an object of results as eval_bio.py writes'),
    ('{"runs": {}}', 'bad.json: "runs" is not a task eval_bio.py writes (val, bpb, hellaswag, harness)'),
    ('{"ckpt": "x"}', 'bad.json holds no results (val, bpb, hellaswag or harness); pass a results file written by eval_bio.py'),
    ('{"ckpt": "x", "val": {"loss": 3.1}}', 'bad.json: val lacks tokens, dataset, split (eval_bio.py writes them all)'),
    ('{"ckpt": "x", "val": {"loss": "3.1"}}', 'bad.json: val.loss is "3.1", not a finite number'),
    ('{"ckpt": "x", "val": {"loss": NaN}}', 'bad.json: val.loss is NaN, not a finite number'),
    ('{"ckpt": "x", "hellaswag": {"acc": true}}', 'bad.json: hellaswag.acc is true, not a finite number'),
    ('{"ckpt": "x", "harness": {"arc": {"acc": {"v": 1}}}}', 'bad.json: harness.arc.acc is an object, not a finite number'),
    ('{"ckpt": "x", "harness": [1]}', 'bad.json: harness is an array, not an object of tasks'),
    ('{"ckpt": "x", "val": {"loss": 1, "split": 5}}', 'bad.json: val.split is 5, not a name of printable characters'),
    ('{"ckpt": "a\\u001b[2Jb", "val": {"loss": 1}}', 'bad.json: ckpt is "a\\u001b[2Jb", not a name of printable characters'),
    (DEEP, 'bad.json is nested too deeply to be a results file of eval_bio.py'),
    ('{"ckpt": "x", "val": {"loss": 3}}' + ' ' * 1_000_000,
     'bad.json is larger than 1,000,000 bytes: not a results file of eval_bio.py (a few KB)'),
]


@pytest.mark.slow
@pytest.mark.parametrize('contents, message', HOSTILE, ids=range(len(HOSTILE)))
def test_a_hostile_results_file_is_one_error_line(tmp_path, contents, message):
    write_json(tmp_path / 'good.json', GPT2)  # a good file beside it: the error must name the bad one
    if contents is not None:
        (tmp_path / 'bad.json').write_text(contents)
    proc = run_script(tmp_path, COMPARE, '--evals', 'good.json', 'bad.json', '--out_dir', 'out', check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
    assert message_lines(proc.stderr) == ['error: ' + message]
    assert not (tmp_path / 'out').exists()
