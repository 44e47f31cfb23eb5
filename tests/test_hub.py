"""
Checkpoints by hub name (hf:OWNER/REPO/FILE.pt, hf:OWNER/REPO) and export_hub.py's folders. The hub is
unreachable here: downloads go through a patched huggingface_hub.hf_hub_download (in-process), or through
the real library reading a cache laid out as it lays one out, with HF_HUB_OFFLINE=1 (scripts).

    python -m pytest tests/test_hub.py              (-m "not slow": the quick ones only)
"""

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import hf_raise_for_status
from safetensors import safe_open

from checkpoints import export_model, load_model, parse_hub_name
from codec import tokenizer_facts
from conftest import TINY, hub_cache, message_lines, read_log, run_script, simulated_env, write_original_checkpoint


def hub_env(cache):
    return {**os.environ, 'HF_HUB_CACHE': str(cache), 'HF_HUB_OFFLINE': '1'}


def test_hub_names_name_a_repository_a_path_and_a_revision():
    assert parse_hub_name('hf:edeneldith/WiggleGPT/ckpt_pretrain.pt') == ('edeneldith/WiggleGPT', 'ckpt_pretrain.pt', None)
    assert parse_hub_name('hf:own/repo/sub/dir/ckpt.pt@v1.0') == ('own/repo', 'sub/dir/ckpt.pt', 'v1.0')
    assert parse_hub_name('hf:own/repo@refs/pr/3') == ('own/repo', '', 'refs/pr/3')
    for bad in ('hf:own', 'hf:own//x.pt', 'hf:own/repo@', 'hf:', 'hf://own/repo/x.pt', 'hf:own/repo@v1@v2'):
        with pytest.raises(ValueError, match='is not a hub name'):
            parse_hub_name(bad)


def test_a_hub_name_downloads_through_huggingface_hub_then_loads_as_the_local_file(tmp_path, monkeypatch):
    weights, model_args = write_original_checkpoint(tmp_path / 'ckpt_pretrain.pt')
    calls = []

    def download(repo_id, filename, *, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
    idx = torch.randint(0, model_args['vocab_size'], (2, 12))
    local, local_ckpt = load_model(str(tmp_path / 'ckpt_pretrain.pt'), 'cpu')
    for name, revision in [('hf:edeneldith/WiggleGPT/ckpt_pretrain.pt', None),
                           ('hf:edeneldith/WiggleGPT/ckpt_pretrain.pt@a1b2c3', 'a1b2c3')]:
        calls.clear()
        remote, remote_ckpt = load_model(name, 'cpu')
        assert calls == [('edeneldith/WiggleGPT', 'ckpt_pretrain.pt', revision)]
        # the original release's facts hold as for the local file: no positions, the same logits bit for bit
        assert remote_ckpt['model_args'] == local_ckpt['model_args'] and remote_ckpt['model_args']['use_positions'] is False
        assert torch.equal(remote.eval()(idx, idx)[0], local.eval()(idx, idx)[0])


def test_an_exported_model_on_the_hub_is_its_two_files_and_a_bad_one_is_one_line(tmp_path, monkeypatch):
    write_original_checkpoint(tmp_path / 'original.pt')
    model, checkpoint = load_model(str(tmp_path / 'original.pt'), 'cpu')
    folder = tmp_path / 'repo' / 'sub'
    export_model(model, checkpoint, {'type': 'characters', 'chars': [chr(65 + i) for i in range(64)]}, str(folder))
    calls = []

    def download(repo_id, filename, *, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(tmp_path / 'repo' / filename)

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
    idx = torch.randint(0, 64, (1, 12))
    for name in ('hf:own/repo/sub@v2', 'hf:own/repo/sub/model.safetensors@v2'):
        calls.clear()
        remote, remote_ckpt = load_model(name, 'cpu')
        assert calls == [('own/repo', 'sub/config.json', 'v2'), ('own/repo', 'sub/model.safetensors', 'v2')]
        assert torch.equal(remote.eval()(idx)[0], model.eval()(idx)[0])
        assert remote_ckpt['iter_num'] == 600000 and tokenizer_facts(remote_ckpt)['chars'][:2] == ['A', 'B']
    calls.clear()
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', lambda repo_id, filename, **kw: calls.append(filename) or str(tmp_path / 'original.pt'))
    load_model('hf:own/repo/weights.PTH', 'cpu')  # a file by its suffix, in any case
    assert calls == ['weights.PTH']

    config_path = folder / 'config.json'
    good = json.loads(config_path.read_text())
    for broken, reason in [({'model_type': 'wigglegpt'}, 'is malformed'), (dict(good, training='x'), 'is malformed'),
                           (dict(good, architecture=dict(good['architecture'], n_layer='2')), 'describes no buildable model'),
                           (dict(good, model_type='llama'), 'does not describe a WiggleGPT model')]:
        config_path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=reason) as raised:
            load_model(str(folder), 'cpu')
        assert '\n' not in str(raised.value)


def test_an_exported_model_s_config_is_checked_before_its_weights_download(tmp_path, monkeypatch):
    calls = []

    def download(repo_id, filename, *, revision=None, **kwargs):
        calls.append(filename)
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
    (tmp_path / 'model.safetensors').write_bytes(b'gigabytes of something else')
    foreign = "does not describe a WiggleGPT model or a GPT-2 (its model_type is not 'wigglegpt' or 'gpt2')"
    for config, message in [('{"model_type": "llama"}', foreign), ('[1, 2]', foreign),
                            ('{"model_type": ', 'is unreadable (JSONDecodeError: Expecting value: line 1 column 16 (char 15)); '
                                               'export the model again')]:
        (tmp_path / 'config.json').write_text(config)
        calls.clear()
        with pytest.raises(ValueError) as raised:
            load_model('hf:own/llama', 'cpu')
        assert str(raised.value) == f'the config.json of hf:own/llama {message}'
        assert calls == ['config.json']  # the weights are never fetched


def library_error(status, code):
    """The exception huggingface_hub itself raises for a hub reply of this status and X-Error-Code."""
    response = httpx2.Response(status, headers={'X-Error-Code': code} if code else {},
                               request=httpx2.Request('HEAD', 'https://huggingface.co/own/repo/resolve/main/x.pt'))
    try:
        hf_raise_for_status(response)
    except Exception as e:
        return e


@pytest.mark.parametrize('status, code, message', [
    (404, 'RepoNotFound', 'no hub repository own/repo (or it is private'),
    (401, '', 'no hub repository own/repo (or it is private'),
    (404, 'RevisionNotFound', 'the hub repository own/repo has no revision v9'),
    (404, 'EntryNotFound', 'the hub repository own/repo has no file x.pt at revision v9'),
    (500, '', 'could not download hf:own/repo/x.pt@v9 (HfHubHTTPError'),
])
def test_hub_failures_are_one_line_errors(monkeypatch, status, code, message):
    def download(*args, **kwargs):
        raise library_error(status, code)

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
    with pytest.raises(ValueError) as raised:
        load_model('hf:own/repo/x.pt@v9', 'cpu')
    assert str(raised.value).startswith(message) and '\n' not in str(raised.value)


@pytest.mark.slow
def test_scripts_take_hub_names_through_the_real_library_offline(workdir):
    """sample_bio.py, train_bio.py's init_from and the analysis scripts, with hf: names the installed
    huggingface_hub resolves from its cache (HF_HUB_OFFLINE=1), as it would after a download."""
    write_original_checkpoint(workdir / 'original.pt', vocab_size=50, n_layer=2, n_embd=32)
    original = torch.load(workdir / 'original.pt', weights_only=True)
    original['config'] = {'dataset': 'tiny'}  # the tiny dataset's characters decode it
    torch.save(original, workdir / 'original.pt')
    cache = workdir / 'hub-cache'
    hub_cache(cache, 'own/wiggle', {'ckpt_pretrain.pt': workdir / 'original.pt'}, revision='v1')
    sample = ['sample_bio.py', '--device=cpu', '--num_samples=1', '--max_new_tokens=8', '--temperature=0', '--start=ab']
    by_path = run_script(workdir, *sample, '--out_dir=.', '--ckpt=original.pt', env=hub_env(cache))
    assert len(by_path.stdout.split('---')[0].strip()) == 10
    # by name, its dataset is the uploader's: data/tiny/meta.pkl here is not its characters, and not read
    by_name = run_script(workdir, *sample, '--ckpt=hf:own/wiggle/ckpt_pretrain.pt@v1', env=hub_env(cache), check=False)
    assert by_name.returncode == 2 and by_name.stdout == ''
    assert [line for line in message_lines(by_name.stderr) if not line.startswith('note: ')] == [
        'error: the hub checkpoint has a 50-token vocabulary but does not carry its characters, and a hub '
        "checkpoint's are never read from data/ here: download the file and pass its local path, with its dataset "
        'prepared in data/']

    run_script(workdir, 'train_bio.py', *TINY, '--max_iters=2', '--eval_interval=2', '--out_dir=tuned',
               '--init_from=hf:own/wiggle/ckpt_pretrain.pt@v1', env=hub_env(cache))
    assert read_log(workdir / 'tuned')[-1]['iter'] == 2
    run_script(workdir, 'analysis/analyze_wiggle.py', 'hf:own/wiggle/ckpt_pretrain.pt@v1', '--out_dir=wiggle',
               env=hub_env(cache))
    assert json.loads((workdir / 'wiggle' / 'wiggle_stats.json').read_text())['n_layers'] == 2

    # not in the cache, offline: one line that says so, for every script
    for args in (['train_bio.py', *TINY, '--out_dir=x', '--init_from=hf:own/other/ckpt.pt'],
                 ['analysis/analyze_wiggle.py', 'hf:own/wiggle@v2']):
        proc = run_script(workdir, *args, check=False, env=hub_env(cache))
        assert proc.returncode == 2 and 'is not in the local hub cache' in proc.stderr, (args, proc.stderr)
        assert len(message_lines(proc.stderr)) == 1, proc.stderr
    assert not (workdir / 'x').exists()  # nothing made before the download failed


@pytest.mark.slow
def test_exporting_again_keeps_a_card_edited_by_hand_unless_asked(workdir):
    write_original_checkpoint(workdir / 'original.pt', vocab_size=50)
    original = torch.load(workdir / 'original.pt', weights_only=True)
    original['config'] = {'dataset': 'tiny'}  # the tiny dataset's characters decode it
    torch.save(original, workdir / 'original.pt')
    export = ['export_hub.py', '--out_dir=.', '--ckpt=original.pt', '--export_dir=exported']
    run_script(workdir, *export)
    card = (workdir / 'exported' / 'README.md').read_text()
    (workdir / 'exported' / 'README.md').write_text('# my model\n\nNotes written by hand.\n')
    for _ in range(2):  # the second time over a README.new.md from the first
        proc = run_script(workdir, *export)
        assert proc.stdout.strip() == ('exported ./original.pt to exported (model.safetensors, config.json, README.new.md); '
                                       'README.md is kept as it was, the new card is README.new.md '
                                       '(--overwrite_card=True replaces README.md)')
        assert (workdir / 'exported' / 'README.md').read_text() == '# my model\n\nNotes written by hand.\n'
        assert (workdir / 'exported' / 'README.new.md').read_text() == card
    proc = run_script(workdir, *export, '--overwrite_card=True')
    assert proc.stdout.strip() == 'exported ./original.pt to exported (model.safetensors, config.json, README.md)'
    assert (workdir / 'exported' / 'README.md').read_text() == card


@pytest.mark.slow
def test_export_writes_a_hub_folder_that_loads_back_and_pushes_where_asked(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'run')
    run_script(workdir, 'export_hub.py', '--out_dir=run', '--export_dir=exported', fresh=True)
    exported = workdir / 'exported'
    assert sorted(os.listdir(exported)) == ['README.md', 'config.json', 'model.safetensors']
    ckpt_model, ckpt = load_model(str(workdir / 'run' / 'ckpt.pt'), 'cpu')
    with safe_open(exported / 'model.safetensors', 'pt') as f:
        names = set(f.keys())
    # the tied embedding once: every parameter but the tied copy, and the file holds each weight once
    assert names == set(ckpt_model.state_dict()) - {'lm_head.weight'}
    n_weights = sum(p.numel() for p in ckpt_model.parameters())
    assert abs(os.path.getsize(exported / 'model.safetensors') - 4 * n_weights) < 8192
    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == ckpt['model_args'] and config['training']['iter_num'] == 4
    assert config['tokenizer'] == {'type': 'characters', 'chars': list('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX')}
    last = read_log(workdir / 'run')[-1]
    card = (exported / 'README.md').read_text()
    assert f"val loss {last['val_loss']:.4f}" in card and "| ` optimizer ` | ` 'adamw' ` |" in card

    folder_model, folder_ckpt = load_model(str(exported), 'cpu')
    assert folder_model.lm_head.weight is folder_model.transformer.wte.weight
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(folder_model.eval()(idx, idx)[0], ckpt_model.eval()(idx, idx)[0])
    assert folder_ckpt['best_val_loss'] == pytest.approx(float(ckpt['best_val_loss']))

    # the folder needs no dataset: its characters travel in config.json
    sample = ['sample_bio.py', '--device=cpu', '--num_samples=1', '--max_new_tokens=8', '--temperature=0', '--start=ab']
    by_ckpt = run_script(workdir, *sample, '--out_dir=run')
    os.rename(workdir / 'data' / 'tiny', workdir / 'data' / 'moved')
    assert run_script(workdir, *sample, '--ckpt=exported').stdout == by_ckpt.stdout  # the folder, wherever out_dir is
    cache = workdir / 'hub-cache'
    hub_cache(cache, 'own/exported', {f'{n}': exported / n for n in os.listdir(exported)})
    assert run_script(workdir, *sample, '--ckpt=hf:own/exported', env=hub_env(cache)).stdout == by_ckpt.stdout
    os.rename(workdir / 'data' / 'moved', workdir / 'data' / 'tiny')

    # never over other files; an earlier export is replaced
    (workdir / 'mine').mkdir()
    (workdir / 'mine' / 'README.md').write_text('my notes')
    proc = run_script(workdir, 'export_hub.py', '--out_dir=run', '--export_dir=mine', check=False)
    assert proc.returncode == 2 and 'already holds other files (README.md)' in proc.stderr
    assert (workdir / 'mine' / 'README.md').read_text() == 'my notes' and os.listdir(workdir / 'mine') == ['README.md']
    (workdir / 'deep').mkdir()
    (workdir / 'deep' / 'config.json').write_text('[' * 100000)  # nested past Python's stack: not an earlier export
    proc = run_script(workdir, 'export_hub.py', '--out_dir=run', '--export_dir=deep', check=False)
    assert proc.returncode == 2 and message_lines(proc.stderr) == [
        'error: deep already holds other files (config.json); export into a new or empty folder (--export_dir=...)']
    with open(workdir / 'run' / 'log.jsonl', 'a') as f:
        f.write('{"iter": 5, "train_lo')  # cut off by a crash: skipped
    run_script(workdir, 'export_hub.py', '--out_dir=run', '--export_dir=exported')
    assert f"val loss {last['val_loss']:.4f}" in (exported / 'README.md').read_text()
    proc = run_script(workdir, 'export_hub.py', '--out_dir=run', '--export_dir=run/ckpt.pt/x', check=False)
    assert proc.returncode == 2 and 'cannot make the folder run/ckpt.pt/x (Not a directory)' in proc.stderr
    assert len(message_lines(proc.stderr)) == 1

    # pushed: the real library is offline here (one line), a simulated hub takes the upload
    proc = run_script(workdir, 'export_hub.py', '--out_dir=run', '--push_to_hub=own/pushed', check=False,
                      env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert proc.returncode == 2 and 'could not upload to the hub repository own/pushed (OfflineModeIsEnabled' in proc.stderr
    assert len(message_lines(proc.stderr)) == 1
    uploads = workdir / 'uploads'
    uploads.mkdir()
    proc = run_script(workdir, 'export_hub.py', '--out_dir=run', '--export_dir=push', '--push_to_hub=own/pushed',
                      env=simulated_env(SIMULATED_HUB_UPLOADS=uploads))
    calls = [json.loads(line) for line in (uploads / 'calls.jsonl').read_text().splitlines()]
    assert [(c['call'], c['repo_id']) for c in calls] == [('create_repo', 'own/pushed'), ('upload_folder', 'own/pushed')]
    assert calls[1]['folder_path'] == 'push' and 'load it with --ckpt=hf:own/pushed' in proc.stdout
    assert sorted(os.listdir(uploads / 'own' / 'pushed')) == ['README.md', 'config.json', 'model.safetensors']
    assert '--ckpt=hf:own/pushed' in (uploads / 'own' / 'pushed' / 'README.md').read_text()
    names = ('justaname', '/', 'own/', 'own/re po', 'hf:own/repo')  # refused before anything is written
    with ThreadPoolExecutor(2) as pool:
        procs = pool.map(lambda name: run_script(workdir, 'export_hub.py', '--out_dir=run', '--export_dir=refused',
                                                 f'--push_to_hub={name}', check=False), names)
    for name, proc in zip(names, procs):
        assert proc.returncode == 2 and 'must name a hub repository as OWNER/REPO' in proc.stderr, name
    assert not (workdir / 'refused').exists()
