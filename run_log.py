"""
A run's log.jsonl, which train_bio.py appends one JSON object to per log step and evaluation: reading
it back, past a last line that a crash cut off mid-write.
"""

import json


def read_log(path):
    """The records (dicts) of a log.jsonl, in file order; lines that are not whole JSON objects (cut off, garbled,
    nested too deep to parse) are skipped."""
    records = []
    with open(path, errors='replace') as f:
        for line in f:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # torn by a crash, or nested past Python's stack
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
