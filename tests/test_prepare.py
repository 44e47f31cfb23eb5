"""
The data prepare scripts, run as subprocesses on small inputs inside tmp dirs (the hub simulated).

    python -m pytest tests/test_prepare.py              (-m "not slow": the quick ones only)
"""
import json
import os
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import prepared_data
from conftest import REPO, SHARED, TINY, message_lines, run_script, simulated_env

SHAKESPEARE_TEXT = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")
OWT_SCRIPT = os.path.join(REPO, "data", "openwebtext", "prepare.py")
EOT_TEXT = "<|endoftext|>"

# The scripts run in subprocesses; give them the offline BPE files unless the caller chose some.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
# Local files only: never let datasets wait on the unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(args, cwd, env=None, fresh=False):
    return run_script(cwd, *args, check=False, env=env, fresh=fresh)


def read_tokens(path):
    return np.fromfile(path, dtype=np.uint16).tolist()


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE_TEXT), reason=f"tiny Shakespeare not found at {SHAKESPEARE_TEXT}")
def test_shakespeare_char(tmp_path):
    script_dir = tmp_path / "shakespeare_char"
    script_dir.mkdir()
    shutil.copy(os.path.join(REPO, "data", "shakespeare_char", "prepare.py"), script_dir)
    shutil.copyfile(SHAKESPEARE_TEXT, script_dir / "input.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = run([str(script_dir / "prepare.py")], cwd=elsewhere, env={**os.environ, "PYTHONPATH": REPO}, fresh=True)
    assert result.returncode == 0, result.stderr

    assert os.listdir(elsewhere) == []  # outputs land beside the script, not in the cwd
    train = read_tokens(script_dir / "train.bin")
    val = read_tokens(script_dir / "val.bin")
    assert len(train) + len(val) == 1_115_394
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.001
    with open(script_dir / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["vocab_size"] == 65
    text = open(SHAKESPEARE_TEXT, encoding="utf-8").read()
    assert "".join(meta["itos"][i] for i in train[:100]) == text[:100]
    assert "".join(meta["itos"][i] for i in val[-100:]) == text[-100:]
    assert sorted(os.listdir(script_dir)) == ["input.txt", "manifest.json", "meta.pkl", "prepare.py", "train.bin", "val.bin"]
    files = json.loads((script_dir / "manifest.json").read_text())["files"]
    assert files == {name: os.path.getsize(script_dir / name) for name in ("meta.pkl", "train.bin", "val.bin")}


def owt_docs(count):
    # Distinct, varied documents: numbered so any reordering or loss shows, with non-ASCII text.
    return [f"Document {i}: naïve café — {'word ' * (i % 7)}the end.\nSecond line {i}." for i in range(count)]


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def prepare_owt(tmp_path, dataset, out_name, *extra, fresh=False):
    out_dir = tmp_path / out_name
    result = run([OWT_SCRIPT, "--dataset", str(dataset), "--out_dir", str(out_dir), *extra], cwd=tmp_path, fresh=fresh)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out_dir)) == ["manifest.json", "train.bin", "val.bin"]  # nothing left behind
    return read_tokens(out_dir / "train.bin"), read_tokens(out_dir / "val.bin")


def split_docs(tokens):
    encoding = tiktoken.get_encoding("gpt2")
    text = encoding.decode(tokens)
    assert text.endswith(EOT_TEXT)
    return text[: -len(EOT_TEXT)].split(EOT_TEXT)


@pytest.mark.slow
def test_openwebtext_local_jsonl(tmp_path):
    docs = owt_docs(50)
    dataset = tmp_path / "docs.jsonl"
    write_jsonl(dataset, docs)
    encoding = tiktoken.get_encoding("gpt2")

    train, val = prepare_owt(tmp_path, dataset, "out", "--val_fraction", "0.2", fresh=True)
    assert len(train) + len(val) == sum(len(encoding.encode_ordinary(d)) + 1 for d in docs)
    assert train.count(encoding.eot_token) + val.count(encoding.eot_token) == len(docs)
    val_docs = split_docs(val)
    train_docs = split_docs(train)
    assert 0 < len(val_docs) < len(docs)
    assert train_docs == [d for d in docs if d not in val_docs]
    assert val_docs == [d for d in docs if d in val_docs]

    # The seeded split does not change between runs.
    assert prepare_owt(tmp_path, dataset, "again", "--val_fraction", "0.2") == (train, val)

    limited_train, limited_val = prepare_owt(tmp_path, dataset, "limited", "--max_docs", "10")
    assert limited_train.count(encoding.eot_token) + limited_val.count(encoding.eot_token) == 10
    # The default val fraction picks nothing from 10 docs, so the last one is moved to val.
    assert split_docs(limited_train) == docs[:9]
    assert split_docs(limited_val) == [docs[9]]


@pytest.mark.slow
def test_openwebtext_local_txt_is_one_document_per_line(tmp_path):
    dataset = tmp_path / "lines.txt"
    dataset.write_text("first line\n\nsecond line é\nthird line\n", encoding="utf-8")
    train, val = prepare_owt(tmp_path, dataset, "out")
    # Blank lines are skipped rather than becoming empty documents.
    assert split_docs(train) == ["first line", "second line é"]
    assert split_docs(val) == ["third line"]


@pytest.mark.slow
def test_openwebtext_missing_dataset_file(tmp_path):
    result = run([OWT_SCRIPT, "--dataset", str(tmp_path / "absent.jsonl"), "--out_dir", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "absent.jsonl" in result.stderr
    assert not (tmp_path / "out").exists()


def write_parquet(path, docs):
    pq.write_table(pa.table({"text": docs}), path)


def hub(tmp_path, repos, interrupt_after=0):
    """The environment of a script run against a simulated hub (tests/simulated/simulated_hub.py); its calls log."""
    spec = {"calls": str(tmp_path / "hub_calls.jsonl"), "repos": repos, "interrupt_after": interrupt_after}
    (tmp_path / "hub.json").write_text(json.dumps(spec))
    return simulated_env(SIMULATED_HUB=tmp_path / "hub.json", HF_HUB_OFFLINE="1")


def hub_calls(tmp_path):
    return [json.loads(line) for line in (tmp_path / "hub_calls.jsonl").read_text().splitlines()]


def openwebtext_repo(tmp_path, docs):
    """Skylion007/openwebtext as the hub has it: a loading script, and a partial Parquet conversion."""
    write_parquet(tmp_path / "part0.parquet", docs[: len(docs) // 2])
    write_parquet(tmp_path / "part1.parquet", docs[len(docs) // 2:])
    return {"Skylion007/openwebtext": {"loading_script": "openwebtext.py", "parquet_conversion": {
        "plain_text/partial-train/0000.parquet": str(tmp_path / "part0.parquet"),
        "plain_text/partial-train/0001.parquet": str(tmp_path / "part1.parquet")}}}


@pytest.mark.slow
def test_openwebtext_from_the_hub_with_a_datasets_that_refuses_loading_scripts(tmp_path):
    docs = owt_docs(40)
    env = hub(tmp_path, openwebtext_repo(tmp_path, docs))
    result = run([OWT_SCRIPT, "--out_dir", str(tmp_path / "out"), "--val_fraction", "0.2"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    first, second = hub_calls(tmp_path)
    assert first["path"] == "Skylion007/openwebtext" and first["split"] == "train" and first["streaming"]
    assert second["path"] == "parquet" and second["streaming"]
    assert second["data_files"] == "hf://datasets/Skylion007/openwebtext@refs%2Fconvert%2Fparquet/*/*train/*.parquet"
    assert "loading script" in result.stderr and "Parquet conversion" in result.stderr
    assert "40 documents: train has" in result.stdout
    assert "of OpenWebText's 8,013,769 documents" in result.stdout  # a conversion may be partial: the count tells
    train, val = read_tokens(tmp_path / "out" / "train.bin"), read_tokens(tmp_path / "out" / "val.bin")
    assert sorted(split_docs(train) + split_docs(val)) == sorted(docs)
    # the same documents from a local file give the same files
    write_jsonl(tmp_path / "docs.jsonl", docs)
    assert prepare_owt(tmp_path, tmp_path / "docs.jsonl", "local", "--val_fraction", "0.2") == (train, val)


@pytest.mark.slow
def test_other_hub_datasets_by_name_and_hub_errors_in_one_line(tmp_path):
    write_parquet(tmp_path / "corpus.parquet", ["one document", "another document"])
    env = hub(tmp_path, {"someone/corpus": {"configs": {"default": {"train": str(tmp_path / "corpus.parquet")}}}})
    result = run([OWT_SCRIPT, "--dataset", "someone/corpus", "--out_dir", str(tmp_path / "out")], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert split_docs(read_tokens(tmp_path / "out" / "train.bin")) == ["one document"]
    assert "OpenWebText" not in result.stdout
    # the real library, offline: a hub name it cannot reach is one line, and nothing is written
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = run([OWT_SCRIPT, "--dataset", "nobody/nothing", "--out_dir", str(tmp_path / "none")], cwd=tmp_path, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "could not open the hub dataset nobody/nothing" in result.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_smoltalk_from_the_hub_by_config_and_split(tmp_path):
    conversation = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "smol.jsonl").write_text((json.dumps(conversation) + "\n") * 5)
    split = "smoltalk_smollm3_smol_magpie_ultra_no_think"
    env = hub(tmp_path, {"HuggingFaceTB/smoltalk2": {"configs": {"SFT": {split: str(tmp_path / "smol.jsonl")}}}})
    script = os.path.join(REPO, "data", "smoltalk", "prepare.py")
    result = run([script, "--out_dir", str(tmp_path / "out")], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert [(c["path"], c["name"], c["split"], c["streaming"]) for c in hub_calls(tmp_path)] == [
        ("HuggingFaceTB/smoltalk2", "SFT", split, True)]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train"]["conversations"] + meta["val"]["conversations"] == 5


@pytest.mark.slow
def test_an_interrupted_prepare_leaves_the_previous_set(tmp_path):
    out = tmp_path / "out"
    write_jsonl(tmp_path / "first.jsonl", owt_docs(20))
    prepare_owt(tmp_path, tmp_path / "first.jsonl", "out")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    # Ctrl-C while the documents stream in from the hub
    env = hub(tmp_path, openwebtext_repo(tmp_path, owt_docs(40)), interrupt_after=25)
    result = run([OWT_SCRIPT, "--out_dir", str(out)], cwd=tmp_path, env=env)
    assert result.returncode == 130 and "keeps the files it had" in result.stderr
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert prepared_data.check(str(out), ["train.bin", "val.bin"], "prepare") is None


def test_a_set_cut_off_while_moving_into_place_is_refused(tmp_path, monkeypatch):
    for attempt, size in (("old", 10), ("new", 20)):
        staging = prepared_data.staging_dir(str(tmp_path))
        for name in ("train.bin", "val.bin"):
            (tmp_path / prepared_data.STAGING / name).write_bytes(b"x" * size)
        if attempt == "new":  # interrupted after the first file moved
            real_replace, moved = os.replace, []

            def replace(src, dst):
                if any(name.endswith(".bin") for name in moved):
                    raise KeyboardInterrupt
                moved.append(dst)
                real_replace(src, dst)

            monkeypatch.setattr(os, "replace", replace)
            with pytest.raises(KeyboardInterrupt):
                prepared_data.commit(str(tmp_path), "test")
            monkeypatch.undo()
        else:
            prepared_data.commit(str(tmp_path), "test")
            assert prepared_data.check(str(tmp_path), ["train.bin", "val.bin"], "prepare") is None
    assert (tmp_path / "train.bin").stat().st_size == 20 and (tmp_path / "val.bin").stat().st_size == 10  # a mix
    with pytest.raises(ValueError, match="unfinished preparation .*run prepare again"):
        prepared_data.check(str(tmp_path), ["train.bin", "val.bin"], "prepare")
    # a later preparation stopped before its commit clears its staging folder: the mix is still refused
    prepared_data.staging_dir(str(tmp_path))
    prepared_data.abandon(str(tmp_path), ValueError("no documents"))
    assert not os.path.exists(staging)
    with pytest.raises(ValueError, match="unfinished preparation"):
        prepared_data.check(str(tmp_path), ["train.bin", "val.bin"], "prepare")


@pytest.mark.slow
def test_training_refuses_files_that_do_not_belong_together(workdir):
    data = workdir / "data" / "tiny"
    (data / "val.bin").write_bytes((data / "val.bin").read_bytes()[:-2])  # e.g. another preparation's val.bin
    proc = run_script(workdir, "train_bio.py", *TINY, "--out_dir=out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message_lines(proc.stderr) == [
        f"error: {data}/val.bin does not belong to the prepared set (manifest.json says 2,000 bytes, it has 1,998); "
        "run python data/tiny/prepare.py again"]
    assert not (workdir / "out").exists()


def test_a_manifest_that_is_not_one_is_refused_in_one_line(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"x" * 4)
    manifest = tmp_path / "manifest.json"
    unreadable = f"{manifest} is unreadable (JSONDecodeError); run prepare again"
    not_text = f"{manifest} is unreadable (UnicodeDecodeError); run prepare again"
    too_deep = f"{manifest} is unreadable (RecursionError); run prepare again"  # past Python's stack
    no_files = (f"{manifest} does not list its files (each a name in {tmp_path} with its size in bytes); "
                "run prepare again")
    for text, message in [('{"files": {"train.bin": 4', unreadable), ("\xff", not_text), ("{}", no_files),
                          ("[]", no_files), ('{"files": ["train.bin"]}', no_files),
                          ('{"files": {"train.bin": "4"}}', no_files), ('{"files": {"train.bin": -4}}', no_files),
                          ('{"files": {"../train.bin": 4}}', no_files), ('{"files": {"/etc/passwd": 4}}', no_files),
                          ('{"files": {"sub/train.bin": 4}}', no_files), ('{"files": {"..": 4}}', no_files),
                          ("[" * 100000, too_deep), ('{"files": ' + "[" * 100000, too_deep)]:
        manifest.write_text(text, encoding="latin-1")
        with pytest.raises(ValueError) as raised:
            prepared_data.check(str(tmp_path), ["train.bin"], "prepare")
        assert str(raised.value) == message, text
    manifest.write_text('{"files": {"train.bin": 4}}')
    assert prepared_data.check(str(tmp_path), ["train.bin"], "prepare") is None


def test_a_failed_download_is_one_line_and_leaves_no_file(tmp_path):
    # port 9 of this machine refuses connections: the offline case, without waiting on a real host
    target = tmp_path / "input.txt"
    with pytest.raises(ValueError, match=f"cannot download http://127.0.0.1:9/input.txt .*put the file at {target}"):
        prepared_data.download_once("http://127.0.0.1:9/input.txt", str(target))
    assert os.listdir(tmp_path) == []
    target.write_text("kept")
    prepared_data.download_once("http://127.0.0.1:9/input.txt", str(target))  # present: not fetched again
    assert target.read_text() == "kept"


def test_gpt2_s_bpe_files_out_of_reach_are_one_line(workdir, tmp_path):
    # an empty tiktoken cache and a proxy that refuses: the offline machine, without waiting on a real host
    folder = workdir / "data" / "shakespeare"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "data", "shakespeare", "prepare.py"), folder)
    shutil.copy(os.path.join(SHARED, "data", "tinyshakespeare", "input.txt"), folder)
    (tmp_path / "empty-cache").mkdir()
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = run([str(folder / "prepare.py")], workdir, env=env, fresh=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message_lines(proc.stderr) == ["error: GPT-2's BPE files could not be loaded (ProxyError); tiktoken downloads "
                                          "them once when online, or reads them from TIKTOKEN_CACHE_DIR"]
    assert sorted(os.listdir(folder)) == ["input.txt", "prepare.py"]


def test_openwebtext_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    import signal
    import subprocess
    import sys

    write_jsonl(tmp_path / "docs.jsonl", owt_docs(200))

    def small_files():  # the last buffers, written as the script ends, pass 4 kB: as on a full disk
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run([sys.executable, OWT_SCRIPT, "--dataset", "docs.jsonl", "--out_dir", "out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    lines = message_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == ("error: no room to write the prepared files in out (File too large): the disk is full or a size "
                         "limit was reached; out keeps the files it had; free some space and run again"), proc.stderr
    assert os.listdir(tmp_path / "out") == []
