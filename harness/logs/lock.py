"""One run id, one writer: a lock file next to the run log.

`logs/<run_id>.lock` holds `pid host` of the process (rank 0) that writes `logs/<run_id>.txt`.
It is created exclusively before the log is opened and removed when the run ends, however it
ends (the trainer's `finally`). A lock whose process is gone (same host, pid not alive: a
kill -9) is stale and taken over with a note; a live one refuses the second run with one line
that names the holder. Without it a fresh run and a concurrent `--resume latest` of the same
run id both wrote to one log and the second one's lines were lost in the mix.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from base.processes import pid_alive
from base import UserError


def lock_path(log_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(log_dir) / f"{run_id}.lock"


def _dir_error(log_dir: Path, e: OSError) -> UserError:
    what = "is a file, not a directory" if log_dir.exists() and not log_dir.is_dir() else \
        f"cannot write there ({e.strerror or e})"
    return UserError(f"log_dir={str(log_dir)!r}: {what}; pass --log_dir DIR with a writable directory")


class RunLock:
    def __init__(self, log_dir: str | os.PathLike, run_id: str):
        self.path = lock_path(log_dir, run_id)
        self.run_id = run_id
        self.held = False
        self._stamp = f"{os.getpid()} {socket.gethostname()}\n"

    def acquire(self) -> "RunLock":
        log_dir = self.path.parent
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _dir_error(log_dir, e) from None
        if not log_dir.is_dir():
            raise _dir_error(log_dir, NotADirectoryError(20, "Not a directory"))
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._take_stale():
                    continue
                raise self._busy() from None
            except OSError as e:
                raise _dir_error(log_dir, e) from None
            try:
                os.write(fd, self._stamp.encode())
            except OSError as e:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise _dir_error(log_dir, e) from None
            os.close(fd)
            self.held = True
            return self
        raise self._busy()

    def _holder(self) -> tuple[int | None, str]:
        try:
            parts = self.path.read_text().split()
            return int(parts[0]), (parts[1] if len(parts) > 1 else "")
        except (OSError, ValueError, IndexError):
            return None, ""

    def _take_stale(self) -> bool:
        pid, host = self._holder()
        if pid is None:
            # a lock being written this instant, or an empty one left by a crash mid-write
            return False
        if host and host != socket.gethostname():
            return False  # another machine's process: cannot tell, never steal
        if pid_alive(pid):
            return False
        print(f"note: {self.path}: stale lock of pid {pid} (no such process); taking it over",
              file=sys.stderr, flush=True)
        self.path.unlink(missing_ok=True)
        return True

    def _busy(self) -> UserError:
        pid, host = self._holder()
        who = f"pid {pid}" + (f" on {host}" if host else "") if pid is not None else "another process"
        return UserError(
            f"{self.path}: run id {self.run_id!r} is being written by {who}; one run id has one writer"
            " (wait for that run to end, or use another RUN_ID; delete the lock file only if that process is gone)"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text() == self._stamp:
                self.path.unlink()
        except OSError:
            pass
