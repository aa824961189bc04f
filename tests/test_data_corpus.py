import json
import os
import subprocess
import sys

import numpy as np
import pytest

from base import UserError
from data.prepare_corpus import prepare_corpus, split_train_val
from data.shards import find_shards, open_shard
from data.tokenizer import EOT, gpt2_encoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_corpus(d):
    """A small folder of given files: .py docs (one empty, one with invalid UTF-8), a .txt, a skipped dir."""
    (d / "pkg" / "sub").mkdir(parents=True)
    (d / "pkg" / "__pycache__").mkdir()
    (d / "site-packages").mkdir()
    texts = {}
    for i in range(12):
        name = f"pkg/mod_{i:02d}.py" if i % 2 else f"pkg/sub/file_{i:02d}.py"
        texts[name] = f"def f_{i}(x):\n    return x * {i}  # doc {i}\n" * (i + 3)
    texts["pkg/special.py"] = "s = '<|endoftext|>'  # special text is plain text inside a document\n"
    for name, t in texts.items():
        (d / name).write_text(t)
    (d / "pkg" / "empty.py").write_text("")
    (d / "pkg" / "latin1.py").write_bytes(b"# caf\xe9\nx = 1\n")
    (d / "pkg" / "notes.txt").write_text("not python\n")
    (d / "pkg" / "__pycache__" / "junk.py").write_text("junk = 1\n")
    (d / "site-packages" / "vendored.py").write_text("vendored = 1\n")
    return texts


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "data.prepare_corpus", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_cli_end_to_end_deterministic(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = _make_corpus(src)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    r = _run_cli(src, "--out", out1, "--val_fraction", "0.2", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "wrote 1 train + 1 val shards" in r.stdout and str(out1) in r.stdout
    meta = json.loads((out1 / "meta.json").read_text())
    n_docs = len(texts) + 1  # + latin1.py; empty.py, notes.txt, __pycache__, site-packages left out
    assert meta["documents"] == n_docs and meta["empty_files"] == 1 and meta["files_with_bad_utf8"] == 1
    assert f"{meta['train_tokens']:,} tokens in {meta['train_documents']:,} documents" in r.stdout

    train = np.concatenate([open_shard(p) for p in find_shards(out1 / "local_train_*.bin")])
    val = np.concatenate([open_shard(p) for p in find_shards(out1 / "local_val_*.bin")])
    assert train[0] == EOT and val[0] == EOT
    assert int((train == EOT).sum()) == meta["train_documents"]
    assert int((val == EOT).sum()) == meta["val_documents"]
    assert meta["train_documents"] + meta["val_documents"] == n_docs
    assert meta["train_tokens"] == len(train) and meta["val_tokens_written"] == len(val)
    assert len(val) >= 0.2 * (len(train) + len(val))

    # train/val disjoint, each document exactly once, content = BOS + GPT-2 ids of the file
    enc = gpt2_encoding()
    docs = [np.split(a, np.flatnonzero(a == EOT)[1:]) for a in (train, val)]
    decoded = sorted(enc.decode(d[1:].tolist()) for part in docs for d in part)
    expected = sorted(list(texts.values()) + ["# caf\ufffd\nx = 1\n"])
    assert decoded == expected
    assert len(meta["val_documents_list"]) == meta["val_documents"]
    assert all(n.startswith("src/pkg/") for n in meta["val_documents_list"])

    r2 = _run_cli(src, "--out", out2, "--val_fraction", "0.2", "--workers", "1")
    assert r2.returncode == 0, r2.stderr
    names = sorted(p.name for p in out1.iterdir())
    assert names == sorted(p.name for p in out2.iterdir())
    for n in names:
        assert (out1 / n).read_bytes() == (out2 / n).read_bytes(), n


def test_idempotent_and_force(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _make_corpus(src)
    out = tmp_path / "out"
    first = prepare_corpus([src], out, val_fraction=0.2, progress=False)
    assert not first["skipped"]
    mtime = (out / "local_train_000000.bin").stat().st_mtime_ns
    second = prepare_corpus([src], out, val_fraction=0.2, progress=False)
    assert second["skipped"] and second["train_tokens"] == first["train_tokens"]
    assert (out / "local_train_000000.bin").stat().st_mtime_ns == mtime
    r = _run_cli(src, "--out", out, "--val_fraction", "0.2")
    assert r.returncode == 0 and "up to date" in r.stdout
    forced = prepare_corpus([src], out, val_fraction=0.2, force=True, progress=False)
    assert not forced["skipped"]
    # changed settings rebuild; smaller shards; a later smaller build removes stale shards
    small = prepare_corpus([src], out, val_fraction=0.2, shard_tokens=100, progress=False)
    assert not small["skipped"] and len(small["train_shards"]) > 1
    assert all(s["tokens"] <= 100 for s in small["train_shards"])
    prepare_corpus([src], out, val_fraction=0.2, progress=False)
    assert len(list(out.glob("local_train_*.bin"))) == 1
    # an edited input rebuilds
    (src / "pkg" / "mod_01.py").write_text("changed = True\n")
    assert not prepare_corpus([src], out, val_fraction=0.2, progress=False)["skipped"]
    # a damaged shard rebuilds
    with open(out / "local_val_000000.bin", "ab") as f:
        f.write(b"\0\0")
    assert not prepare_corpus([src], out, val_fraction=0.2, progress=False)["skipped"]


def test_val_tokens_and_max_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _make_corpus(src)
    r = prepare_corpus([src], tmp_path / "o", val_tokens=50, max_files=6, progress=False)
    assert r["files"] == 6 and r["val_tokens_written"] >= 50
    assert r["train_documents"] + r["val_documents"] == r["documents"] == 6 - r["empty_files"]


def test_split_takes_just_enough_documents():
    """Validation documents are taken in SHA-1-of-name order (computed here with hashlib) until
    their tokens reach the target: the split of a file depends on its name, not on its position,
    so adding files elsewhere does not move it."""
    import hashlib

    def expected(lengths, names, target):
        val, got = set(), 0
        for n in sorted(names, key=lambda n: hashlib.sha1(n.encode()).digest()):
            if got >= target:
                break
            val.add(n)
            got += lengths[names.index(n)]
        return [n in val for n in names]

    names = ["a", "b", "c", "d"]  # SHA-1 order: d, c, a, b
    is_val = split_train_val([10, 10, 10, 10], names, 15)
    assert sum(is_val) == 2 and is_val == expected([10, 10, 10, 10], names, 15) == [False, False, True, True]
    lengths = [3, 40, 5, 7, 1]
    names = ["x.py", "y.py", "z.py", "w.py", "v.py"]  # SHA-1 order: z, v, y, x, w
    assert split_train_val(lengths, names, 6) == expected(lengths, names, 6) == [False, False, True, False, True]
    assert split_train_val(lengths, names, 7) == expected(lengths, names, 7) == [False, True, True, False, True]
    # the same names in another order: the same documents are validation
    perm = [4, 2, 0, 3, 1]
    assert split_train_val([lengths[i] for i in perm], [names[i] for i in perm], 7) == [
        split_train_val(lengths, names, 7)[i] for i in perm]
    assert split_train_val([10, 10], ["a", "b"], 0) == [False, False]


def test_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare_corpus([tmp_path / "missing"], tmp_path / "o", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no input files with extension \.py"):
        prepare_corpus([tmp_path / "empty"], tmp_path / "o", progress=False)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n")
    with pytest.raises(UserError, match="cannot split 1 documents"):
        prepare_corpus([tmp_path / "one"], tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="--val_fraction 1.5"):
        prepare_corpus([tmp_path / "one"], tmp_path / "o", val_fraction=1.5, progress=False)
    r = _run_cli(tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'missing'}: input file or directory does not exist\n"


def test_ext_option(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _make_corpus(src)
    (src / "pkg" / "more.txt").write_text("more text here\n" * 5)
    r = prepare_corpus([src], tmp_path / "o", exts=(".txt",), val_tokens=1, progress=False)
    assert r["documents"] == 2
