"""Files written whole or not at all, and the writability probe run before any real output."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

from base.errors import UserError


def temp_path_for(path: str | os.PathLike) -> Path:
    """A unique hidden temp name next to ``path`` (same filesystem, so os.replace is atomic):
    ``.<name>.<pid>.<random>.tmp``. Opened with mode "x" it gets the usual umask permissions,
    unlike mkstemp's 0600."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], object], *,
                 encoding: str = "utf-8") -> Path:
    """Write ``path`` through a temp file in the same directory, then os.replace it into place:
    a process killed at any moment leaves either the old file or the complete new one under that
    name, and no temp file when it fails with an exception. ``content`` is the text, the bytes, or
    a function that writes the temp file at the path it is given (torch.save, fig.savefig, ...).
    Creates the parent directories. No fsync (a machine crash can still tear the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        if isinstance(content, str):
            with open(tmp, "x", encoding=encoding) as f:
                f.write(content)
        elif isinstance(content, (bytes, bytearray, memoryview)):
            with open(tmp, "xb") as f:
                f.write(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def dir_write_error(directory: str | os.PathLike) -> OSError | None:
    """Create `directory` if needed and write and remove a probe file in it: the OSError that
    stopped it, or None when the directory is writable (checked before any real output)."""
    probe = Path(directory) / f".write-test.{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e
    return None


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """A command's --out must be a directory it can write, checked before any real work."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a directory")
    e = dir_write_error(out)
    if e is not None:
        what = "a path in it is a file" if isinstance(e, (FileExistsError, NotADirectoryError)) else \
            f"cannot write there ({e.strerror or e})"
        raise UserError(f"--out {out}: {what}; pass --out DIR with a writable directory") from None
