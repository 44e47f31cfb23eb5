"""
Settings from config files and --key=value, and their one-line errors.

    python -m pytest tests/test_configurator.py              (-m "not slow": the quick ones only)
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so plain `pytest` finds configurator too

from configurator import configure

DEFAULTS = {
    'out_dir': 'out',
    'dataset': 'openwebtext',
    'max_iters': 600000,
    'learning_rate': 6e-4,
    'compile': False,
}


@pytest.fixture(autouse=True)
def main_process(monkeypatch):
    # configure only prints on rank 0; make sure a torchrun environment doesn't leak in.
    monkeypatch.delenv('RANK', raising=False)


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def fails(capsys, argv, defaults=DEFAULTS):
    """Run configure expecting a usage error; return its single stderr line."""
    with pytest.raises(SystemExit) as exc:
        configure(defaults, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ')
    assert 'Traceback' not in err
    return err.strip()


def test_config_file_applied_and_input_untouched(tmp_path, capsys):
    cfg = write(tmp_path / 'cfg.py', """
        import math
        max_iters = 100
        learning_rate = learning_rate * 10  # may read the current value
        _scratch = 'ignored'
        def helper():
            pass
    """)
    before = dict(DEFAULTS)
    config = configure(DEFAULTS, [cfg])
    assert config == {**DEFAULTS, 'max_iters': 100, 'learning_rate': pytest.approx(6e-3)}
    assert DEFAULTS == before
    out = capsys.readouterr().err
    assert 'config: max_iters = 100' in out
    assert 'out_dir' not in out  # settings the file left alone are not reported


def test_override_after_file_wins(tmp_path):
    cfg = write(tmp_path / 'cfg.py', "max_iters = 100\ndataset = 'shakespeare_char'\n")
    config = configure(DEFAULTS, [cfg, '--max_iters=7'])
    assert config['max_iters'] == 7
    assert config['dataset'] == 'shakespeare_char'


def test_arguments_apply_in_order(tmp_path):
    cfg = write(tmp_path / 'cfg.py', 'max_iters = 100\n')
    assert configure(DEFAULTS, ['--max_iters=7', cfg])['max_iters'] == 100
    assert configure(DEFAULTS, ['--max_iters=7', '--max_iters=8'])['max_iters'] == 8


def test_bare_string(capsys):
    config = configure(DEFAULTS, ['--dataset=shakespeare_char', '--out_dir=123'])
    assert config['dataset'] == 'shakespeare_char'
    assert config['out_dir'] == '123'  # a number-looking value stays text for a str setting
    assert "config: dataset = 'shakespeare_char'" in capsys.readouterr().err


def test_quoted_string():
    assert configure(DEFAULTS, ["--out_dir='out-x'"])['out_dir'] == 'out-x'


def test_float_key_takes_int():
    value = configure(DEFAULTS, ['--learning_rate=1'])['learning_rate']
    assert value == 1.0 and type(value) is float


def test_bool_key(capsys):
    assert configure(DEFAULTS, ['--compile=True'])['compile'] is True
    capsys.readouterr()
    err = fails(capsys, ['--compile=1'])
    assert '--compile expects bool' in err and "'1'" in err


def test_int_key_rejects_float_and_bool(capsys):
    assert fails(capsys, ['--max_iters=1e3']) == "error: --max_iters expects int, got '1e3' (float)"
    assert 'expects int' in fails(capsys, ['--max_iters=True'])


def test_unknown_key_in_argv(capsys):
    err = fails(capsys, ['--learnin_rate=1e-3'])
    assert err == "error: unknown config key 'learnin_rate' (did you mean 'learning_rate'?)"


def test_unknown_key_without_close_match(capsys):
    assert 'did you mean' not in fails(capsys, ['--zzz=1'])


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = write(tmp_path / 'cfg.py', 'max_iter = 100\n')
    err = fails(capsys, [cfg])
    assert "unknown config key 'max_iter'" in err and cfg in err
    assert "(did you mean 'max_iters'?)" in err


def test_wrong_type_in_config_file(tmp_path, capsys):
    cfg = write(tmp_path / 'cfg.py', "max_iters = 'abc'\n")
    assert fails(capsys, [cfg]) == f"error: {cfg} sets max_iters = 'abc', expected int"


def test_missing_config_file(tmp_path, capsys):
    missing = str(tmp_path / 'nope.py')
    assert fails(capsys, [missing]) == f"error: config file '{missing}' not found"


def test_config_file_with_syntax_error(tmp_path, capsys):
    cfg = write(tmp_path / 'cfg.py', 'max_iters = = 3\n')
    err = fails(capsys, [cfg])
    assert cfg in err and 'SyntaxError' in err


def test_key_without_value(capsys):
    assert '--max_iters needs a value' in fails(capsys, ['--max_iters'])


def test_single_dash_argument(capsys):
    assert "'-x'" in fails(capsys, ['-x'])


def test_quiet_off_rank_zero(monkeypatch, capsys):
    # The report goes to stderr; rank 0 prints it, every other rank stays silent.
    monkeypatch.setenv('RANK', '0')
    configure(DEFAULTS, ['--max_iters=5'])
    assert 'config: max_iters = 5' in capsys.readouterr().err
    monkeypatch.setenv('RANK', '1')
    assert configure(DEFAULTS, ['--max_iters=5'])['max_iters'] == 5
    assert capsys.readouterr() == ('', '')


def test_errors_are_said_by_every_process_that_has_them(monkeypatch, capsys):
    # an error may be one process's own (a GPU it does not have): it says so, named
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert 'error: process 1: --max_iters expects int' in fails(capsys, ['--max_iters=x'])
    monkeypatch.delenv('WORLD_SIZE')  # RANK alone (some cluster launchers set it): not torchrun
    assert fails(capsys, ['--max_iters=x']).startswith('error: --max_iters expects int')


@pytest.mark.parametrize('script', ['train_bio.py', 'finetune_native.py', 'sample_bio.py', 'chat.py',
                                    'bench_bio.py'])
def test_every_script_starts_and_refuses_an_unknown_setting(script):
    # quick: each script starts and reads its settings (train_bio.py and bench_bio.py before they import torch)
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), '--no_such_setting=1'],
                          capture_output=True, text=True, cwd=REPO)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith('config: ')]  # finetune_native sets task
    assert proc.returncode == 2 and errors == ["error: unknown config key 'no_such_setting'"], proc.stderr


def test_command_line(tmp_path):
    # A script set up the way train_bio.py uses configure, run as a real process.
    script = write(tmp_path / 'script.py', """
        import sys
        out_dir = 'out'
        max_iters = 600000
        learning_rate = 6e-4
        compile = False
        from configurator import configure, settings_in
        config = configure(settings_in(globals()), sys.argv[1:])
        globals().update(config)
        print('max_iters is', max_iters)
    """)
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    env.pop('RANK', None)

    def run(*args):
        return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)

    good = run('--max_iters=5')
    assert good.returncode == 0, good.stderr
    assert 'max_iters is 5' in good.stdout

    bad = run('--max_iter=5')
    assert bad.returncode == 2
    assert bad.stderr.count('\n') == 1
    assert "unknown config key 'max_iter' (did you mean 'max_iters'?)" in bad.stderr
    assert 'Traceback' not in bad.stderr
