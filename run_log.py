"""
A run's log.jsonl, which train_bio.py appends one JSON object to per log step and evaluation: reading
it back, past a last line that a crash cut off mid-write, and past records whose numbers are not numbers
(edited or written by something else), which the plots and tables could not use.
"""

import json
import sys

# the keys train_bio.py writes a number under (mfu and sparsity may also be null), and those of them that count
NUMBERS = ('iter', 'loss', 'train_loss', 'val_loss', 'lr', 'time_ms', 'tokens', 'skipped_steps')
COUNTS = ('iter', 'tokens', 'skipped_steps')


def read_log(path):
    """The records (dicts) of a log.jsonl, in file order; lines that are not whole JSON objects (cut off, garbled,
    nested too deep to parse), or that hold something else than a number under a key of NUMBERS, are skipped."""
    records = []
    with open(path, errors='replace') as f:
        for line in f:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # torn by a crash, or nested past Python's stack
                continue
            if isinstance(record, dict) and all(is_number(record[key]) and (key not in COUNTS or isinstance(record[key], int))
                                                for key in NUMBERS if key in record):
                records.append(record)
    return records


def is_number(value):
    """A float, or an int a float can hold (JSON's integers have no bound)."""
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                        and abs(value) <= sys.float_info.max)
