"""
Settings for the training scripts from config files and --key=value overrides.

    python train_bio.py config_shakespeare_char_cpu.py --max_iters=100 --device=cpu

Each argument is applied in the order given, so a later one wins:
- a config file is plain Python, run with the current settings already defined
  (it may read them); every public name it assigns must be a known setting.
- --key=value is read as a Python literal; for string settings a bare word is
  taken as it is, so --device=cpu needs no quotes.
A value must match the type of the setting's default. Any mistake prints one
line starting with 'error: ' on stderr and exits with status 2 (fail(), which every script
uses for its users' mistakes).
"""

import ast
import difflib
import os
import sys
import types

# Names a config file may define for its own use without them being settings.
_NOT_SETTINGS = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)

_BAD = object()  # marks a value that does not fit the setting's type


def settings_in(namespace: dict) -> dict:
    """The settings among a script's globals: its public names that hold an int, float, bool or str."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def script_defaults(path: str) -> dict:
    """The default settings of a script such as train_bio.py, as it has them before it reads its arguments:
    its code up to the line that imports this module, run here."""
    with open(path, encoding='utf-8') as f:
        source = f.read()
    head = source[:source.index('\nfrom configurator import')]
    namespace = {'__file__': path, '__name__': 'script_defaults'}
    exec(compile(head, path, 'exec'), namespace)
    return settings_in(namespace)


def configure(defaults: dict, argv: list) -> dict:
    """Return a copy of defaults with the config files and overrides in argv applied."""
    config = dict(defaults)
    for item in argv:
        if item.startswith('--'):
            _apply_override(config, item)
        elif item.startswith('-'):
            fail(f"unrecognised argument '{item}' (settings are written --key=value)")
        else:
            _apply_file(config, item)
    return config


def _apply_override(config, item):
    key, has_value, text = item[2:].partition('=')
    _require_known(config, key, 'unknown config key')
    if not has_value:
        fail(f'--{key} needs a value: --{key}=VALUE')
    default = config[key]
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        value = text  # not a literal, so it can only be a bare string
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # --out_dir=123 means the directory '123'
    checked = _coerce(value, default)
    if checked is _BAD:
        fail(f"--{key} expects {type(default).__name__}, got '{text}' ({type(value).__name__})")
    config[key] = checked
    _report(f'{key} = {checked!r}')


def _apply_file(config, path):
    namespace = dict(config)
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except FileNotFoundError:
        fail(f"config file '{path}' not found")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"config file '{path}' could not be read: {e}")
    try:
        exec(compile(source, path, 'exec'), namespace)
    except Exception as e:  # whatever the file does wrong, report it in one line
        fail(f"config file '{path}' failed: {type(e).__name__}: {e}")
    for name, value in namespace.items():
        if name.startswith('_') or isinstance(value, _NOT_SETTINGS):
            continue
        _require_known(config, name, f'{path} sets unknown config key')
        old = config[name]
        if type(value) is type(old) and value == old:
            continue  # untouched, or set to what it already was
        checked = _coerce(value, old)
        if checked is _BAD:
            fail(f'{path} sets {name} = {value!r}, expected {type(old).__name__}')
        config[name] = checked
        _report(f'{name} = {checked!r} (from {path})')


def _coerce(value, default):
    """Return value as the type of default, or _BAD if it does not fit."""
    if isinstance(default, bool):
        return value if isinstance(value, bool) else _BAD
    if isinstance(value, bool):
        return _BAD  # True/False are ints to Python, but never a number setting
    if isinstance(default, float) and isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return _BAD
    return value if isinstance(value, type(default)) else _BAD


def _require_known(config, key, message):
    if key in config:
        return
    close = difflib.get_close_matches(key, list(config), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    fail(f"{message} '{key}'{hint}")


def _report(line):
    # Under DDP every process parses the same argv; only the first one talks.
    if os.environ.get('RANK', '0') == '0':
        print(f'config: {line}', file=sys.stderr)  # stderr, so sampled text on stdout stays clean


def fail(message):
    """End a script over a user's mistake: one line 'error: ...' on stderr and exit status 2. Every
    script ends this way. Under torchrun each process says it, named, as its reason may be its own
    (e.g. a GPU that process does not have)."""
    rank = os.environ.get('RANK', '0')
    who = f'process {rank}: ' if rank != '0' and int(os.environ.get('WORLD_SIZE', '1')) > 1 else ''
    # newlines (e.g. from an exception's text) are folded so the error is one line
    print(f'error: {who}' + ' '.join(message.splitlines()), file=sys.stderr)
    sys.exit(2)
