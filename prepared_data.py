"""
Data preparation shared by the data/<name>/prepare.py scripts and train_bio.py: where the source
records come from (a local .jsonl, .json, .txt or .parquet file, or a HuggingFace hub dataset),
how a script's output files are put in place as one set, and the check that training reads a set
that belongs together.

A prepare script writes its outputs into <out_dir>/.preparing/, a folder made new for them (so no file
in it can be a link planted beforehand), and then `commit`s them, each renamed over its target: a
manifest.json that marks the set incomplete goes first, the files move into place, and the new
manifest (every file with its size) comes last. So an interrupted prepare leaves the previous
complete set, or a set marked incomplete, which `check` refuses; never a mix that training would
read unawares. train_bio.py runs that check at start and refuses, in one line naming the prepare
command, an incomplete set or files whose sizes do not match; a folder prepared before manifests
existed is used with a note.

Errors are ValueError with a one-line message for the scripts to print.
"""

import json
import os
import re
import shutil
import sys
import time
import urllib.request

import numpy as np

from files import NO_ROOM, remove_entry, write_file

MANIFEST = 'manifest.json'
STAGING = '.preparing'
LOCAL_FORMATS = {'.json': 'json', '.jsonl': 'json', '.txt': 'text', '.parquet': 'parquet'}
HUB_NAME = re.compile(r'[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+')  # owner/name, as the hub spells repositories (ASCII)
TINY_SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SCRIPT_REFUSED = 'Dataset scripts are no longer supported'  # what datasets >= 4 says of a loading script


def open_records(source, formats, config=None, split='train'):
    """A stream of records (dicts) from a local file with one of the suffixes in formats, or from the
    hub dataset named owner/name (its config and split), read as it downloads.

    A hub repository that holds only a loading script, which datasets 4 and later refuse to run,
    is read from the Parquet conversion the hub keeps of it (revision refs/convert/parquet); such
    a conversion may cover only part of the data, so callers should count what they read.
    """
    from datasets import load_dataset

    suffix = os.path.splitext(source)[1].lower()
    if os.path.isfile(source) or suffix in LOCAL_FORMATS:
        if not os.path.isfile(source):
            raise ValueError(f'dataset file not found: {source}')
        if suffix not in formats:
            raise ValueError(f"dataset file must end in {', '.join(formats)}: {source}")
        return load_dataset(LOCAL_FORMATS[suffix], data_files=source, split='train', streaming=True)
    if not HUB_NAME.fullmatch(source):
        raise ValueError(f'--dataset {source} is neither a file ({", ".join(formats)}) nor a hub name like owner/name')
    try:
        try:
            return load_dataset(source, config, split=split, streaming=True)
        except RuntimeError as e:
            if SCRIPT_REFUSED not in str(e):
                raise
        files = f'hf://datasets/{source}@refs%2Fconvert%2Fparquet/{config or "*"}/*{split}/*.parquet'
        print(f'note: {source} is a loading script, which datasets 4 and later do not run; reading the '
              f"hub's Parquet conversion of it instead: {files}", file=sys.stderr)
        return load_dataset('parquet', data_files=files, split='train', streaming=True)
    except Exception as e:  # offline, a typo in the name, no access: one line, not a traceback
        message = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ValueError(f'could not open the hub dataset {source} ({type(e).__name__}: {message}); check the '
                         'name and the connection, or pass a local file with --dataset') from None


def staging_dir(out_dir):
    """An empty folder for a prepare script's outputs (a leftover from an interrupted run is cleared)."""
    staging = os.path.join(out_dir, STAGING)
    remove_entry(staging)  # a link planted there is removed, not followed: the outputs go into a folder made here
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def write_array(target, array):
    """A numpy array's bytes to target, a path or a binary file object. Not numpy's tofile: its short write on
    a full disk raises an OSError without an errno ('N requested and M written'), which abandon cannot tell."""
    data = memoryview(np.ascontiguousarray(array))
    if isinstance(target, str):
        with open(target, 'wb') as f:
            f.write(data)
    else:
        target.write(data)


def commit(out_dir, written_by):
    """Move every file of the staging folder into out_dir, then write the manifest that vouches for them."""
    staging = os.path.join(out_dir, STAGING)
    names = sorted(os.listdir(staging))
    files = {name: os.path.getsize(os.path.join(staging, name)) for name in names}
    # until the new manifest lands, the folder's manifest says its set is incomplete and check() refuses it,
    # however many later preparations are stopped before they get here
    _put_manifest(out_dir, {'written_by': written_by, 'incomplete': True})
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    _put_manifest(out_dir, {'written_by': written_by, 'time': time.strftime('%Y-%m-%d %H:%M:%S'), 'files': files})
    os.rmdir(staging)


def _put_manifest(out_dir, manifest):
    """Write manifest.json whole or not at all (written in the staging folder, then renamed into place)."""
    staged = os.path.join(out_dir, STAGING, MANIFEST)
    with open(staged, 'w') as f:
        json.dump(manifest, f, indent=2)
    os.replace(staged, os.path.join(out_dir, MANIFEST))


def download_once(url, path):
    """Fetch url to path unless path exists; a cut-off download never passes for the file. ValueError if the
    fetch fails, naming where to put the file by hand (on a machine without internet, say)."""
    if os.path.exists(path):
        return
    print(f'downloading {url}')
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            downloaded = response.read()
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise ValueError(f'cannot download {url} ({getattr(e, "reason", e)}); put the file at {path} and rerun')
    write_file(path, downloaded)


def discard(out_dir):
    shutil.rmtree(os.path.join(out_dir, STAGING), ignore_errors=True)


def abandon(out_dir, error):
    """Clear the staging folder of a prepare stopped by error; Ctrl-C then ends the script (status 130), a full
    disk (or file-size limit) with one line (status 2); anything else is for the caller to re-raise."""
    discard(out_dir)
    if isinstance(error, KeyboardInterrupt) or (isinstance(error, OSError) and error.errno in NO_ROOM):
        if isinstance(error, KeyboardInterrupt):
            print(f'\ninterrupted: {out_dir} keeps the files it had', file=sys.stderr)
        else:
            print(f'error: no room to write the prepared files in {out_dir} ({error.strerror}): the disk is full or '
                  f'a size limit was reached; {out_dir} keeps the files it had; free some space and run again',
                  file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # not sys.exit: a streaming dataset's C++ reader threads, still running when the interpreter shuts
        # down, abort it ('terminate called without an active exception', SIGABRT); nothing is left to save
        os._exit(130 if isinstance(error, KeyboardInterrupt) else 2)


def is_file_name(name):
    """Whether name is a file's name alone: one a manifest may list (no path, nothing that leads out of its folder)."""
    return isinstance(name, str) and name not in ('', '.', '..') and os.path.basename(name) == name and '\\' not in name


def is_size(size):
    return isinstance(size, int) and not isinstance(size, bool) and size >= 0


def check(data_dir, names, prepare_command):
    """Raise ValueError unless data_dir's manifest lists each of names and every file it lists has its
    recorded size. Returns a note for a folder prepared before manifests existed (nothing to check)."""
    manifest_path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        return (f'note: {data_dir} has no {MANIFEST} (prepared by an older prepare.py), so nothing '
                'checks that its files belong together')
    try:
        with open(manifest_path, encoding='utf-8') as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past Python's stack
        raise ValueError(f'{manifest_path} is unreadable ({type(e).__name__}); run {prepare_command} again') from None
    if isinstance(manifest, dict) and manifest.get('incomplete'):
        raise ValueError(f'{data_dir} holds files of an unfinished preparation ({MANIFEST} says so); '
                         f'run {prepare_command} again')
    files = manifest.get('files') if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(is_file_name(name) and is_size(size) for name, size in files.items()):
        raise ValueError(f'{manifest_path} does not list its files (each a name in {data_dir} with its size in bytes); '
                         f'run {prepare_command} again')
    for name in names:
        if name not in files:
            raise ValueError(f'{data_dir}/{MANIFEST} does not list {name}; run {prepare_command} again')
    for name, size in files.items():
        path = os.path.join(data_dir, name)
        actual = os.path.getsize(path) if os.path.isfile(path) else None
        if actual != size:
            found = 'it is missing' if actual is None else f'it has {actual:,}'
            raise ValueError(f'{path} does not belong to the prepared set ({MANIFEST} says {size:,} bytes, '
                             f'{found}); run {prepare_command} again')
    return None
