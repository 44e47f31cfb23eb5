"""
Settings for the training scripts from config files and --key=value overrides.

    python train_bio.py config_shakespeare_char_cpu.py --max_iters=100 --device=cpu

Each argument is applied in the order given, so a later one wins:
- a config file is plain Python, run with the current settings already defined
  (it may read them); every public name it assigns must be a known setting.
- --key=value is read as a Python literal; for string settings a bare word is
  taken as it is, so --device=cpu needs no quotes.
A value must match the type of the setting's default, and what values a setting allows is
declared beside its default as a string annotation, checked once every argument is applied:

    batch_size: '>= 1' = 12            a bound: '>= N', '> N', '<= N', '< N'
    dropout: 'in [0, 1)' = 0.0         an interval, each end closed [ ] or open ( )
    backend: 'one of nccl, gloo' = ... a choice of words

Every float must be finite and every int fit in 64 bits. Any mistake prints one line starting
with 'error: ' on stderr and exits with status 2 (fail(), which every script uses for its users'
mistakes); relations between settings (n_embd divisible by n_head) are the scripts' own checks.
All of this runs at a script's start, before it writes anything. The scripts that take --flags
through argparse (analysis/, data/*/prepare.py) declare the same rules on their flags, e.g.
type=ruled(int, '>= 1'), and end on any mistake the same way (one_line_errors).
--help (or -h) prints the script's docstring and every setting with its default and rule.
"""

import argparse
import ast
import difflib
import math
import os
import re
import sys
import types

# Names a config file may define for its own use without them being settings.
_NOT_SETTINGS = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)

_BAD = object()  # marks a value that does not fit the setting's type


def settings_in(namespace: dict) -> dict:
    """The settings among a script's globals: its public names that hold an int, float, bool or str, but
    for constants (names in capitals, such as those a script imports)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str))}


def script_defaults(path: str) -> dict:
    """The default settings of a script such as train_bio.py, as it has them before it reads its arguments:
    its code up to the line that imports this module, run here."""
    with open(path, encoding='utf-8') as f:
        source = f.read()
    head = source[:source.index('\nfrom configurator import')]
    namespace = {'__file__': path, '__name__': 'script_defaults'}
    exec(compile(head, path, 'exec'), namespace)
    return settings_in(namespace)


def declared_rules(path: str) -> dict:
    """{setting: rule} of a script's settings declared with a rule beside their default, as in
    `batch_size: '>= 1' = 12`: read from its source, so it holds for every Python version's annotations."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    rules = {}
    for node in tree.body:
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(node.annotation, ast.Constant) and isinstance(node.annotation.value, str)):
            _parse_rule(node.annotation.value)  # a malformed rule is the script's bug: it fails here, for its author
            rules[node.target.id] = node.annotation.value
    return rules


_BOUND = re.compile(r'(>=|>|<=|<) *(\S+)')
_INTERVAL = re.compile(r'in ([\[(]) *(\S+) *, *(\S+) *([\])])')
_COMPARE = {'>=': float.__ge__, '>': float.__gt__, '<=': float.__le__, '<': float.__lt__}


def _parse_rule(rule):
    """A rule as a test of a value: a function value -> bool."""
    if rule.startswith('one of '):
        choices = [c.strip() for c in rule[len('one of '):].split(',')]
        return lambda value: value in choices
    bound, interval = _BOUND.fullmatch(rule), _INTERVAL.fullmatch(rule)
    if bound:
        op, limit = _COMPARE[bound[1]], float(bound[2])
        return lambda value: op(float(value), limit)
    if interval:
        low, high = float(interval[2]), float(interval[3])
        above = float.__ge__ if interval[1] == '[' else float.__gt__
        below = float.__le__ if interval[4] == ']' else float.__lt__
        return lambda value: above(float(value), low) and below(float(value), high)
    raise ValueError(f'unknown setting rule {rule!r}')


def check_rules(config, rules):
    """fail() on the first setting whose value its rule, or every number's range, does not allow."""
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f'{key} = {value!r} is not allowed: it must be a finite number')
        if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            fail(f'{key} = {value} is not allowed: it must fit in 64 bits')
        if key in rules and not allows(rules[key], value):
            fail(f'{key} = {value!r} is not allowed: it must be {rules[key]}')


def allows(rule, value):
    """Whether rule (as declared beside a default) allows value: for checks of values given later, such as
    chat.py's /temp command."""
    return not (isinstance(value, float) and not math.isfinite(value)) and _parse_rule(rule)(value)


def check_folder(label, path):
    """fail() unless path is a folder, or one that can be made: its nearest existing ancestor must be a
    folder this process may write into. label names the setting in the error (out_dir, --out_dir)."""
    if not path:
        fail(f'{label} is empty; name a folder')
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f'{label}={path} cannot be a folder: {existing} is a file; name another folder')
    if not os.access(existing, os.W_OK):
        fail(f'{label}={path} cannot be written: {existing} is not writable; name another folder')


def ruled(kind, rule):
    """An argparse type for the scripts that take --flags through argparse: kind (int, float) whose value
    rule allows (as in declared_rules), e.g. parser.add_argument('--seeds', type=ruled(int, '>= 1'), default=3)."""
    allows = _parse_rule(rule)

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a{"n" if kind is int else ""} {kind.__name__}') from None
        if (isinstance(value, float) and not math.isfinite(value)) or not allows(value):
            raise argparse.ArgumentTypeError(f'{text} is not allowed: it must be {rule}')
        return value
    return convert


def one_line_errors(parser):
    """Make an argparse parser end on a user's mistake as every script does: one 'error: ' line, exit 2."""
    parser.error = lambda message: fail(message)
    return parser


def configure(defaults: dict, argv: list, rules=None, given=None) -> dict:
    """Return a copy of defaults with the config files and overrides in argv applied, each setting
    checked against its rule in rules ({setting: rule}, see declared_rules). given, a set if passed,
    receives the name of every setting an argument sets (a config file's only where it changes one)."""
    config = dict(defaults)
    given = set() if given is None else given
    if '--help' in argv or '-h' in argv:
        print_help(defaults, rules or {})
    for item in argv:
        if item.startswith('--'):
            given.add(_apply_override(config, item))
        elif item.startswith('-'):
            fail(f"unrecognised argument '{item}' (settings are written --key=value)")
        else:
            given.update(_apply_file(config, item))
    check_rules(config, rules or {})
    return config


def print_help(defaults, rules):
    """--help: the running script's docstring, then each setting with its default and what it allows; exit 0."""
    print((sys.modules['__main__'].__doc__ or '').strip() + '\n\nsettings (--key=value; default, and what is allowed):')
    for key, value in defaults.items():
        print(f'  {key} = {value!r}' + (f'  ({rules[key]})' if key in rules else ''))
    sys.exit(0)


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
    if isinstance(default, float) and isinstance(value, str) and text.strip().lower().lstrip('+-') in ('nan', 'inf', 'infinity'):
        fail(f'--{key}={text} is not allowed: it must be a finite number')
    checked = _coerce(value, default)
    if checked is _BAD:
        fail(f"--{key} expects {type(default).__name__}, got '{text}' ({type(value).__name__})")
    config[key] = checked
    _report(f'{key} = {_shown(key, checked)}')
    return key


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
    except SystemExit:  # exit() would end the script with status 0 and nothing done, as if it had succeeded
        fail(f"config file '{path}' calls exit(); a config file only sets settings (remove the call)")
    except Exception as e:  # whatever the file does wrong, report it in one line
        fail(f"config file '{path}' failed: {type(e).__name__}: {e}")
    changed = []
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
        _report(f'{name} = {_shown(name, checked)} (from {path})')
        changed.append(name)
    return changed


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


SECRET_SETTINGS = ('api_key',)  # their values are never printed (logs keep what a run prints)


def _shown(name, value):
    return '(set, not shown)' if name in SECRET_SETTINGS else repr(value)


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
