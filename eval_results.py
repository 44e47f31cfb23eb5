"""
eval_bio.py's results: the JSON it writes (an --out file, an exported folder's eval_results.json), read
back as data and checked field by field, merged with earlier results, and shown as text: the table it
prints, an exported model card's Evaluation section (export_hub.py), compare_runs.py's rows. No torch
here, so compare_runs.py --evals and plot_loss.py start without it.

    {"ckpt": CKPT, "val": {"loss", "tokens", "dataset", "split"}, "bpb": {"bpb", "bytes", "tokens", "source"},
     "hellaswag": {"acc", "acc_norm", "n"}, "harness": {task: {metric: value, ..., "n": items}}}
"""
import json
import math
import os
import re

from files import write_file

TASKS = ('val', 'bpb', 'hellaswag')  # eval_bio.py's own; lm-evaluation-harness tasks go under "harness"
RESULTS_FILE = 'eval_results.json'  # an exported folder's own results
# each own task's fields and their kinds: a number is finite, a count a whole number from 0, a name printable text
RESULT_FIELDS = {'val': {'loss': 'number', 'tokens': 'count', 'dataset': 'name', 'split': 'name'},
                 'bpb': {'bpb': 'number', 'bytes': 'count', 'tokens': 'count', 'source': 'name'},
                 'hellaswag': {'acc': 'number', 'acc_norm': 'number', 'n': 'count'}}
KIND_WORDS = {'number': 'a finite number', 'count': 'a whole number from 0', 'name': 'a name of printable characters'}
MAX_RESULTS_BYTES = 1_000_000  # a results file is a few KB; a larger one is something else
CARD_START = '<!-- eval_bio.py results: eval_bio.py rewrites what lies between these two markers -->'
CARD_END = '<!-- end of eval_bio.py results -->'


def shown(value):
    """A value from a results file as an error line shows it: short and on one line, however long or deep."""
    if isinstance(value, (dict, list)):
        return 'an object' if isinstance(value, dict) else 'an array'
    text = json.dumps(value)  # floats past float's range were read as inf: JSON writes Infinity
    return text if len(text) <= 40 else text[:40] + '...'


def is_kind(value, kind):
    if kind == 'name':
        return isinstance(value, str) and value.isprintable()  # a newline or escape code would garble a table
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # JSON's true and false are ints to Python
        return False
    if kind == 'count':
        return isinstance(value, int) and value >= 0
    return math.isfinite(value) if isinstance(value, float) else abs(value) < 2 ** 1023


def read_results(path):
    """The results an eval_bio.py JSON file holds, checked field by field; {} where there is no such file,
    ValueError naming the file and the first thing wrong (one line) where it holds anything else."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, 'rb') as f:
            data = f.read(MAX_RESULTS_BYTES + 1)  # and no more, however large the file
        if len(data) > MAX_RESULTS_BYTES:
            raise ValueError(f'{path} is larger than {MAX_RESULTS_BYTES:,} bytes: not a results file of eval_bio.py (a few KB)')
        results = json.loads(data)
    except RecursionError:
        raise ValueError(f'{path} is nested too deeply to be a results file of eval_bio.py') from None
    except UnicodeDecodeError as e:  # a ValueError too: before it
        raise ValueError(f'{path} is not UTF-8 text (byte {e.start}), so not a results file of eval_bio.py') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not JSON ({e})') from None
    except OSError as e:
        raise ValueError(f'{path} could not be read ({e.strerror or type(e).__name__})') from None
    if not isinstance(results, dict):
        raise ValueError(f'{path} holds {shown(results)}, not an object of results as eval_bio.py writes')
    for task, fields in results.items():
        if task == 'ckpt':
            if not is_kind(fields, 'name'):
                raise ValueError(f'{path}: ckpt is {shown(fields)}, not {KIND_WORDS["name"]}')
            continue
        if task == 'harness':
            if not isinstance(fields, dict):
                raise ValueError(f'{path}: harness is {shown(fields)}, not an object of tasks')
            tasks = {f'harness.{name}': metrics for name, metrics in fields.items()}
        elif task in RESULT_FIELDS:
            tasks = {task: fields}
        else:
            raise ValueError(f'{path}: {shown(task)} is not a task eval_bio.py writes ({", ".join(TASKS)}, harness)')
        for name, metrics in tasks.items():
            if not is_kind(name, 'name'):
                raise ValueError(f'{path}: the name {shown(name)} holds characters that cannot be printed')
            if not isinstance(metrics, dict):
                raise ValueError(f'{path}: {name} is {shown(metrics)}, not an object of metrics')
            kinds = RESULT_FIELDS.get(name, {})
            for metric, value in metrics.items():
                kind = kinds.get(metric, 'number')
                if (kinds and metric not in kinds) or not is_kind(metric, 'name'):
                    raise ValueError(f'{path}: {name}.{shown(metric)} is not a field eval_bio.py writes')
                if not is_kind(value, kind):
                    raise ValueError(f'{path}: {name}.{metric} is {shown(value)}, not {KIND_WORDS[kind]}')
            missing = [metric for metric in kinds if metric not in metrics]
            if missing:
                raise ValueError(f'{path}: {name} lacks {", ".join(missing)} (eval_bio.py writes them all)')
    return results


def flat_rows(results):
    """{row: value} of results, each task's fields as rows such as val.loss, hellaswag.acc_norm and
    harness.arc_easy.acc: eval_bio.py's own tasks first, then the harness's."""
    rows = {f'{task}.{metric}': value for task in TASKS for metric, value in results.get(task, {}).items()}
    for task, metrics in results.get('harness', {}).items():
        rows.update({f'harness.{task}.{metric}': value for metric, value in metrics.items()})
    return rows


def merged(old, new):
    """old results with new's tasks in place of theirs (harness tasks one by one)."""
    results = {**old, **new}
    if 'harness' in old and 'harness' in new:
        results['harness'] = {**old['harness'], **new['harness']}
    return results


def write_json(path, results):
    """Write results to path whole or not at all, never through a link (files.write_file); ValueError if it cannot."""
    write_file(path, json.dumps(results, indent=2) + '\n')


def describe(task, result):
    """A task's result in a few words, for the table on stdout and the model card."""
    if task == 'val':
        return (f"loss {result['loss']:.4f} nats/token "
                f"({result['tokens']:,} tokens of {result['dataset']}/{result['split']})")
    if task == 'bpb':
        return f"{result['bpb']:.4f} bits/byte ({result['bytes']:,} bytes of {result['source']})"
    if task == 'hellaswag':
        return f"acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} ({result['n']:,} items, zero-shot)"

    def stderr_of(name):  # lm-eval names a metric's standard error so: acc -> acc_stderr, m,filter -> m_stderr,filter
        return name.replace(',', '_stderr,', 1) if ',' in name else name + '_stderr'
    shown_metrics = [f'{name} {value:.4f}' + (f' ± {result[stderr_of(name)]:.4f}' if stderr_of(name) in result else '')
                     for name, value in result.items() if name != 'n' and '_stderr' not in name]
    return ', '.join(shown_metrics) + (f" ({result['n']:,} items)" if 'n' in result else '')


def result_rows(results):
    """(task, description) of each result, lm-evaluation-harness tasks last."""
    rows = [(task, describe(task, results[task])) for task in TASKS if task in results]
    rows += [(task, describe(task, result)) for task, result in results.get('harness', {}).items()]
    return rows


def card_code(value):
    """value (text from a checkpoint or a file, which anyone may have written) as a Markdown code span on one line,
    which shows it as it is: no heading, link, autolink or HTML (GitHub renders none inside one), and no table cell
    of its own (a pipe is escaped, as tables need even there)."""
    text = ' '.join(str(value).splitlines()).replace('|', '\\|')
    fence = '`' * (max(map(len, re.findall('`+', text)), default=0) + 1)
    return f'{fence} {text} {fence}'


def card_section(results):
    """The model card's Evaluation section (markers included) for an exported folder's results."""
    lines = [CARD_START, '## Evaluation', '', 'Measured with `eval_bio.py` (its docstring says how each is scored):', '',
             '| task | result |', '| --- | --- |']
    lines += ['| ' + ' | '.join(card_code(cell) for cell in row) + ' |' for row in result_rows(results)]
    return '\n'.join(lines + [CARD_END])


def with_card_section(card, section):
    """card (a README.md's text) with its eval_bio.py section replaced by section, or section added at its end."""
    # the last start marker before the first end marker: one whose end marker was deleted by hand is left,
    # with the text after it, as it is
    end = card.find(CARD_END)
    start = card.rfind(CARD_START, 0, end) if end >= 0 else -1
    if start >= 0:
        return card[:start] + section + card[end + len(CARD_END):]
    return card.rstrip('\n') + ('\n\n' if card.strip() else '') + section + '\n'
