"""
A simulated HuggingFace hub for datasets.load_dataset, so the prepare scripts' hub code runs offline
as users run it, against the installed datasets library behaving as it does with the real hub.

simulate(spec_path) (sitecustomize.py calls it for SIMULATED_HUB) reads a JSON file:
    {"calls": "calls.jsonl",                   every load_dataset call is appended here
     "interrupt_after": 0,                     > 0: Ctrl-C after that many records of a stream
     "repos": {
        "Skylion007/openwebtext": {            a repository that holds only a loading script...
            "loading_script": "openwebtext.py",
            "parquet_conversion": {            ...and the hub's Parquet conversion of it
                "plain_text/partial-train/0000.parquet": "/local/file.parquet"}},
        "HuggingFaceTB/smoltalk2": {           a repository of data files, by config and split
            "configs": {"SFT": {"split_name": "/local/file.jsonl"}}}}}
A loading-script repository is refused by the real library itself (it is handed a local folder
holding such a script), with the message datasets >= 4 gives for hub repositories. Conversion
files are found by the hf://datasets/REPO@refs%2Fconvert%2Fparquet/PATTERN paths the hub serves
them under; everything is then read by the real library from the local files.
"""

import fnmatch
import json
import os
import tempfile

CONVERSION_REVISION = 'refs%2Fconvert%2Fparquet'
LOCAL_BUILDERS = {'.json': 'json', '.jsonl': 'json', '.parquet': 'parquet', '.txt': 'text'}


def simulate(spec_path):
    import datasets

    with open(spec_path) as f:
        spec = json.load(f)
    real_load_dataset = datasets.load_dataset
    script_dirs = tempfile.mkdtemp(prefix='simulated_hub_')

    def record(call):
        with open(spec['calls'], 'a') as f:
            f.write(json.dumps(call) + '\n')

    def interrupted(records):
        for i, item in enumerate(records):
            if i == spec.get('interrupt_after'):
                raise KeyboardInterrupt
            yield item

    def from_repo(repo_id, repo, name, split, streaming):
        if 'loading_script' in repo:
            folder = os.path.join(script_dirs, os.path.splitext(repo['loading_script'])[0])
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, repo['loading_script']), 'w').close()
            return real_load_dataset(folder)  # raises: 'Dataset scripts are no longer supported, but found ...'
        configs = repo['configs']
        config = name or 'default'
        if config not in configs:
            raise ValueError(f"BuilderConfig '{config}' not found. Available: {sorted(configs)}")
        if split not in configs[config]:
            raise ValueError(f"Bad split: {split}. Available splits: {sorted(configs[config])}")
        path = configs[config][split]
        return real_load_dataset(LOCAL_BUILDERS[os.path.splitext(path)[1]], data_files=path, split='train',
                                 streaming=streaming)

    def from_conversion(data_files, split, streaming):
        repo_id, _, rest = data_files[len('hf://datasets/'):].partition('@')
        revision, _, pattern = rest.partition('/')
        conversion = spec['repos'].get(repo_id, {}).get('parquet_conversion', {})
        parts = pattern.split('/')
        matched = [conversion[key] for key in sorted(conversion) if revision == CONVERSION_REVISION and
                   len(key.split('/')) == len(parts) and
                   all(fnmatch.fnmatchcase(k, p) for k, p in zip(key.split('/'), parts))]
        if not matched:
            raise FileNotFoundError(f"Unable to find '{data_files}'")
        return real_load_dataset('parquet', data_files=matched, split=split, streaming=streaming)

    def load_dataset(path, name=None, *, split=None, streaming=False, data_files=None, revision=None, **kwargs):
        record({'path': path, 'name': name, 'split': split, 'streaming': streaming, 'data_files': data_files,
                'revision': revision})
        if path in spec['repos']:
            result = from_repo(path, spec['repos'][path], name, split, streaming)
        elif path == 'parquet' and isinstance(data_files, str) and data_files.startswith('hf://datasets/'):
            result = from_conversion(data_files, split, streaming)
        else:
            result = real_load_dataset(path, name, split=split, streaming=streaming, data_files=data_files,
                                       revision=revision, **kwargs)
        return interrupted(result) if spec.get('interrupt_after') else result

    datasets.load_dataset = load_dataset


def simulate_uploads(folder):
    """Model uploads (export_hub.py --push_to_hub) go to folder instead of the hub: HfApi.create_repo and
    HfApi.upload_folder append their arguments to folder/calls.jsonl, and the uploaded files land in
    folder/OWNER/REPO/. Everything before the upload runs as with the real hub."""
    import shutil

    import huggingface_hub

    def record(call):
        with open(os.path.join(folder, 'calls.jsonl'), 'a') as f:
            f.write(json.dumps(call) + '\n')

    def create_repo(self, repo_id, **kwargs):
        record({'call': 'create_repo', 'repo_id': repo_id, **kwargs})

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        record({'call': 'upload_folder', 'repo_id': repo_id, 'folder_path': str(folder_path),
                'ignore_patterns': ignore_patterns, **kwargs})
        def ignored(where, names):  # as the library matches them: each path relative to the folder
            return [name for name in names if any(fnmatch.fnmatch(os.path.relpath(os.path.join(where, name), folder_path), p)
                                                  for p in ignore_patterns or [])]
        shutil.copytree(folder_path, os.path.join(folder, *repo_id.split('/')), dirs_exist_ok=True, ignore=ignored)

    huggingface_hub.HfApi.create_repo = create_repo
    huggingface_hub.HfApi.upload_folder = upload_folder
