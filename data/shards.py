"""The modded-nanogpt / llm.c token shard format.

A shard is 256 little-endian int32 (1024 bytes) of header ``[MAGIC, VERSION, num_tokens, 0, ...]``
followed by ``num_tokens`` little-endian uint16 token ids; the file size is exactly
``1024 + 2 * num_tokens``. Every error names the file, so a bad shard in a directory of a
hundred is found at once.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from base import UserError, atomic_write

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")

HOW_TO_MAKE_SHARDS = (
    "create shards with `python -m data.prepare_corpus` (local text, offline) "
    "or `python data/cached_fineweb10B.py N` (FineWeb, N train shards)"
)


def write_shard(path: str | os.PathLike, tokens) -> int:
    """Write ``tokens`` (ints in [0, 65535]) as a shard at ``path``, atomically. Returns num_tokens."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            bad = lo if lo < 0 else hi
            raise UserError(f"{path}: token id {bad} does not fit in uint16 (allowed 0..65535)")
    if arr.size >= 2**31:
        raise UserError(f"{path}: {arr.size} tokens do not fit in one shard (int32 header)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            f.write(header.tobytes())
            f.write(arr.astype(TOKEN_DTYPE, copy=False).tobytes())

    atomic_write(path, write)
    return int(arr.size)


def read_header(path: str | os.PathLike) -> int:
    """Validate the shard at ``path`` (magic, version, size) and return its number of tokens."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"{path}: shard not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a shard file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read shard ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise UserError(
            f"{path}: truncated: file has {size} bytes, fewer than the {HEADER_BYTES}-byte header"
        )
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, num_tokens = int(header[0]), int(header[1]), int(header[2])
    if magic != MAGIC:
        raise UserError(f"{path}: bad magic {magic} (expected {MAGIC}); not a token shard")
    if version != VERSION:
        raise UserError(f"{path}: unsupported version {version} (expected {VERSION})")
    if num_tokens < 0:
        raise UserError(f"{path}: header says {num_tokens} tokens (must be >= 0)")
    expected = HEADER_BYTES + 2 * num_tokens
    if size != expected:
        what = "truncated" if size < expected else "wrong size"
        raise UserError(
            f"{path}: {what}: header says {num_tokens} tokens ({expected} bytes) "
            f"but file has {size} bytes"
        )
    return num_tokens


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Validated, read-only uint16 memmap of the shard's tokens (no bytes are read up front)."""
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def check_vocab(tokens, vocab_size: int, path: str | os.PathLike) -> None:
    """UserError naming ``path`` if any token id is >= vocab_size."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    hi = int(arr.max())
    if hi >= vocab_size:
        raise UserError(
            f"{path}: token id {hi} >= vocab_size {vocab_size}; the shard was made with "
            "another tokenizer or the model's vocab_size is too small"
        )


def used_token_ids(files) -> np.ndarray:
    """The token ids that occur in ``files``, ascending: compact_vocab's model id i is ids[i]."""
    seen = np.zeros(2 ** 16, dtype=bool)
    for f in files:
        tokens = open_shard(f)
        for a in range(0, len(tokens), 1 << 24):  # bounded memory on big shards
            seen |= np.bincount(np.asarray(tokens[a:a + (1 << 24)]), minlength=2 ** 16) > 0
    return np.flatnonzero(seen)


def compact_vocab(files) -> tuple[np.ndarray, int]:
    """(table, V): the token ids that occur in ``files``, renumbered 0..V-1 in id order.

    ``table`` maps every uint16 id to its new id (ids that never occur map to 0). No token is
    merged, so a model trained on renumbered ids learns the same task with a smaller embedding
    and head: on a CPU the 50304-row head is most of a small GPT's cost."""
    ids = used_token_ids(files)
    table = np.zeros(2 ** 16, dtype=np.int64)
    table[ids] = np.arange(len(ids))
    return table, len(ids)


_SPLIT_WORDS = ("train", "val")


def _split_of(name: str) -> str | None:
    """"train" or "val" when the file name says so as a word (fineweb_train_000001.bin,
    local_val_000000.bin), else None."""
    words = set(re.split(r"[^a-z]+", name.lower()))
    found = [w for w in _SPLIT_WORDS if w in words]
    return found[0] if len(found) == 1 else None


def find_shards(pattern_or_dir: str | os.PathLike, split: str | None = None) -> list[Path]:
    """Sorted shard paths: the ``*.bin`` of a directory, or the files matching a glob pattern.

    A directory with ``split`` ("train" or "val") given resolves to the shards of that split
    (by the word in their names), and one without shards of the asked split is refused: a
    directory passed as the training data once trained on the val shard."""
    spec = str(pattern_or_dir)
    p = Path(spec)
    if p.is_dir():
        files = sorted(q for q in p.glob("*.bin") if q.is_file())
        if not files:
            raise UserError(f"{p}: data directory has no .bin shards; {HOW_TO_MAKE_SHARDS}")
        splits = {q: _split_of(q.name) for q in files}
        named = {v for v in splits.values() if v}
        if split is not None and named:
            mine = [q for q in files if splits[q] == split]
            if not mine:
                raise UserError(f"{p}: data directory has no {split} shards (its shards are"
                                f" {', '.join(sorted(named))} shards); pass the {split} files, e.g. {p / ('*_' + split + '_*.bin')}")
            return mine
        return files
    if glob.has_magic(spec):
        files = sorted(Path(q) for q in glob.glob(spec) if Path(q).is_file())
        if not files:
            raise UserError(f"no shards match {spec!r}; {HOW_TO_MAKE_SHARDS}")
        return files
    if p.is_file():
        return [p]
    raise UserError(f"{spec}: no such shard file or data directory; {HOW_TO_MAKE_SHARDS}")


FINGERPRINT_SAMPLES = 16  # 4 KiB blocks read per shard, spread over the file
_SAMPLE_BYTES = 4096


def fingerprint(files) -> list[dict]:
    """A cheap fingerprint of shards (for checkpoints): per file its name, token count and a
    BLAKE2b digest of its header and FINGERPRINT_SAMPLES blocks of 4 KiB spread evenly over it
    (about 64 KiB read per shard, whatever its size). A rebuilt or replaced shard changes it;
    a rename of the directory does not."""
    out = []
    for f in files:
        f = Path(f)
        n = read_header(f)
        size = HEADER_BYTES + 2 * n
        h = hashlib.blake2b(digest_size=16)
        with open(f, "rb") as fh:
            h.update(fh.read(HEADER_BYTES))
            span = max(size - HEADER_BYTES - _SAMPLE_BYTES, 0)
            for i in range(FINGERPRINT_SAMPLES):
                fh.seek(HEADER_BYTES + (span * i) // max(FINGERPRINT_SAMPLES - 1, 1))
                h.update(fh.read(_SAMPLE_BYTES))
        out.append({"file": f.name, "tokens": n, "digest": h.hexdigest()})
    return out


def fingerprint_changes(saved: list[dict], now: list[dict], where: str) -> list[str]:
    """What differs between two fingerprints, one phrase per file (empty: the same data)."""
    if [s.get("digest") for s in saved] == [s["digest"] for s in now]:
        return []
    if len(saved) != len(now):
        return [f"{where}: {len(saved)} shard(s) in the checkpoint, {len(now)} now"]
    out = []
    for a, b in zip(saved, now):
        if a.get("digest") != b["digest"]:
            detail = f"{a.get('tokens')} tokens then, {b['tokens']} now" if a.get("tokens") != b["tokens"] \
                else "same size, other contents"
            out.append(f"{where} shard {b['file']} changed ({detail})")
    return out
