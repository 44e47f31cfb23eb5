"""The data prepare scripts, run as subprocesses on small inputs inside tmp dirs."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
SHAKESPEARE_TEXT = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")
OWT_SCRIPT = os.path.join(REPO, "data", "openwebtext", "prepare.py")
EOT_TEXT = "<|endoftext|>"

# The scripts run in subprocesses; give them the offline BPE files unless the caller chose some.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
# Local files only: never let datasets wait on the unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


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

    result = run([str(script_dir / "prepare.py")], cwd=elsewhere)
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
    assert not list(script_dir.glob("*.tmp"))


def owt_docs(count):
    # Distinct, varied documents: numbered so any reordering or loss shows, with non-ASCII text.
    return [f"Document {i}: naïve café — {'word ' * (i % 7)}the end.\nSecond line {i}." for i in range(count)]


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def prepare_owt(tmp_path, dataset, out_name, *extra):
    out_dir = tmp_path / out_name
    result = run([OWT_SCRIPT, "--dataset", str(dataset), "--out_dir", str(out_dir), *extra], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out_dir)) == ["train.bin", "val.bin"]  # no .tmp files left behind
    return read_tokens(out_dir / "train.bin"), read_tokens(out_dir / "val.bin")


def split_docs(tokens):
    encoding = tiktoken.get_encoding("gpt2")
    text = encoding.decode(tokens)
    assert text.endswith(EOT_TEXT)
    return text[: -len(EOT_TEXT)].split(EOT_TEXT)


def test_openwebtext_local_jsonl(tmp_path):
    docs = owt_docs(50)
    dataset = tmp_path / "docs.jsonl"
    write_jsonl(dataset, docs)
    encoding = tiktoken.get_encoding("gpt2")

    train, val = prepare_owt(tmp_path, dataset, "out", "--val_fraction", "0.2")
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


def test_openwebtext_local_txt_is_one_document_per_line(tmp_path):
    dataset = tmp_path / "lines.txt"
    dataset.write_text("first line\n\nsecond line é\nthird line\n", encoding="utf-8")
    train, val = prepare_owt(tmp_path, dataset, "out")
    # Blank lines are skipped rather than becoming empty documents.
    assert split_docs(train) == ["first line", "second line é"]
    assert split_docs(val) == ["third line"]


def test_openwebtext_missing_dataset_file(tmp_path):
    result = run([OWT_SCRIPT, "--dataset", str(tmp_path / "absent.jsonl"), "--out_dir", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "absent.jsonl" in result.stderr
    assert not (tmp_path / "out").exists()
