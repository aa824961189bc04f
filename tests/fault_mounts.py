"""Places that fail like real disks do, for the fault tests: a read-only directory (a read-only
bind mount: root ignores permission bits) and a tiny tmpfs that fills up. Both need root and
mount rights; the tests that use them skip with the reason where there are none."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here (needs root and mount rights): {r.stderr.strip() or r.returncode}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_dir(path: Path):
    """path (created) as a read-only bind mount of itself: writes there fail with EROFS."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(path), str(path))
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        probe = path / ".probe"
        try:
            probe.write_bytes(b"")
        except OSError as e:
            assert e.errno == errno.EROFS
        else:
            probe.unlink()
            pytest.skip("the read-only bind mount still takes writes")
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "64m"):
    """A tmpfs of `size` at path (created); fill() it to make the next write fail with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


def fill(directory: Path) -> Path:
    """Write a filler file in directory until the file system is full; returns it."""
    filler = directory / "filler"
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno in (errno.ENOSPC, errno.EDQUOT), e
    # the last partial page too
    with open(filler, "ab", buffering=0) as f:
        for _ in range(4096):
            try:
                f.write(b"\0")
            except OSError:
                break
    return filler
