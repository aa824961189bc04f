import numpy as np
import pytest

from data.shards import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    check_vocab,
    compact_vocab,
    find_shards,
    open_shard,
    read_header,
    write_shard,
)
from base import UserError


def test_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = tmp_path / "a.bin"
    assert write_shard(path, tokens) == 5
    assert path.stat().st_size == HEADER_BYTES + 2 * 5
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == MAGIC == 20240520 and header[1] == VERSION == 1 and header[2] == 5
    assert not header[3:].any()
    assert read_header(path) == 5
    mm = open_shard(path)
    assert mm.dtype == np.uint16 and mm.tolist() == tokens.tolist()
    assert not mm.flags.writeable
    assert not list(tmp_path.glob("*.tmp"))  # no temp file left behind


def test_compact_vocab_renumbers_used_ids_in_order(tmp_path):
    write_shard(tmp_path / "a.bin", [50256, 17, 17, 300])
    write_shard(tmp_path / "b.bin", [65535, 300, 5])
    write_shard(tmp_path / "c.bin", [])
    table, used = compact_vocab([tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"])
    assert used == 5 and table.shape == (65536,)
    assert [int(table[i]) for i in (5, 17, 300, 50256, 65535)] == [0, 1, 2, 3, 4]
    assert int(table[6]) == 0  # an id that never occurs maps to 0


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", [])
    assert read_header(tmp_path / "e.bin") == 0
    assert len(open_shard(tmp_path / "e.bin")) == 0


@pytest.mark.parametrize("bad", [-1, 65536])
def test_write_rejects_out_of_range(tmp_path, bad):
    with pytest.raises(UserError, match=rf"x\.bin: token id {bad} does not fit in uint16"):
        write_shard(tmp_path / "x.bin", [1, bad, 2])
    assert not (tmp_path / "x.bin").exists()


def _write_raw(path, header_vals, ntok_bytes):
    header = np.zeros(256, dtype="<i4")
    header[: len(header_vals)] = header_vals
    path.write_bytes(header.tobytes() + b"\x01\x00" * ntok_bytes)


def _one_line_error(fn, path):
    with pytest.raises(UserError) as ei:
        fn(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_magic(tmp_path):
    p = tmp_path / "x.bin"
    _write_raw(p, [123, 1, 4], 4)
    assert "bad magic 123 (expected 20240520)" in _one_line_error(read_header, p)


def test_bad_version(tmp_path):
    p = tmp_path / "x.bin"
    _write_raw(p, [MAGIC, 7, 4], 4)
    assert "unsupported version 7 (expected 1)" in _one_line_error(open_shard, p)


def test_truncated(tmp_path):
    p = tmp_path / "x.bin"
    _write_raw(p, [MAGIC, 1, 10], 4)
    msg = _one_line_error(read_header, p)
    assert "truncated: header says 10 tokens (1044 bytes) but file has 1032 bytes" in msg


def test_too_long(tmp_path):
    p = tmp_path / "x.bin"
    _write_raw(p, [MAGIC, 1, 2], 4)
    assert "wrong size" in _one_line_error(read_header, p)


def test_shorter_than_header(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"\x00" * 100)
    assert "truncated" in _one_line_error(read_header, p)


def test_missing_file(tmp_path):
    assert "not found" in _one_line_error(read_header, tmp_path / "nope.bin")


def test_check_vocab(tmp_path):
    check_vocab(np.array([0, 50256], dtype=np.uint16), 50257, "s.bin")
    with pytest.raises(UserError, match=r"^s\.bin: token id 50300 >= vocab_size 50257"):
        check_vocab(np.array([5, 50300, 2], dtype=np.uint16), 50257, "s.bin")


def test_find_shards_dir_and_pattern(tmp_path):
    for name in ["b_001.bin", "a_000.bin", "b_000.bin"]:
        write_shard(tmp_path / name, [1, 2])
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in find_shards(tmp_path)] == ["a_000.bin", "b_000.bin", "b_001.bin"]
    assert [p.name for p in find_shards(tmp_path / "b_*.bin")] == ["b_000.bin", "b_001.bin"]
    assert [p.name for p in find_shards(tmp_path / "a_000.bin")] == ["a_000.bin"]


def test_find_shards_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match="no such shard file or data directory.*prepare_corpus.*cached_fineweb10B"):
        find_shards(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: data directory has no \.bin shards.*prepare_corpus"):
        find_shards(tmp_path / "empty")
    with pytest.raises(UserError, match=r"no shards match .*fineweb_train_\*\.bin.*cached_fineweb10B\.py N"):
        find_shards(tmp_path / "empty" / "fineweb_train_*.bin")
