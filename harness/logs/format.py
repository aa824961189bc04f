"""The run log: the text contract between the trainer (writer) and the monitor, plotter and
sweep launcher (readers). The format is defined here and only here.

A log is `logs/<run_id>.txt`, appended and flushed line by line by rank 0:

    runlog:1 run_id:<id>
    ====...(100)
    # source: train_gpt.py
    <the file>
    # source: harness/trainer.py
    ...
    ====...(100)
    env: python:3.11.7 torch:2.13.0 ...
    config: {"run_id": ..., "tag": ..., "seed": ..., "script": ...}
    step:0/100 val_loss:10.8258 train_time:0ms step_avg:0.00ms lr_mul:1.0000 batch_size:4096
    step:1/100 train_time:812ms step_avg:812.00ms train_loss:10.8102 lr_mul:1.0000 batch_size:4096
    diag step:25 layer:blocks.3.attn.qkv eff_rank:123.4 rho:0.0012
    resumed from step 15
    status:finished final_val_loss:3.2811 step:100

Readers also read modded-nanogpt's own logs (code at the top, then `====`, then step lines).
Parsing is by anchored patterns, never by position; lines inside our source block are skipped,
and a step line must be a strict `step:N/M key:value ...` sequence, so code never counts.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from base import UserError

FORMAT_VERSION = 1
SEPARATOR = "=" * 100
SOURCE_PREFIX = "# source: "

_TOKEN = r"[A-Za-z_][\w.]*:\S+"
STEP_RE = re.compile(rf"^step:(\d+)/(\d+)((?: {_TOKEN})+)\s*$")
DIAG_RE = re.compile(rf"^diag((?: {_TOKEN})+)\s*$")
STATUS_RE = re.compile(rf"^status:([a-z_]+)((?: {_TOKEN})*)\s*$")
CONFIG_RE = re.compile(r"^config: (\{.*\})\s*$")
HEADER_RE = re.compile(r"^runlog:(\d+) run_id:(\S+)\s*$")
RESUMED_RE = re.compile(r"^resumed from step (\d+)\b")
ENV_RE = re.compile(r"^env: (.*)$")

STATUSES = ("finished", "diverged", "failed", "preempted", "interrupted")


# ------------------------------------------------------------------------------------------
# Values


def _parse_value(text: str) -> float | str:
    """`61234ms` -> 61234.0, `612.34ms` -> 612.34, `nanms` -> nan, `4.01` -> 4.01, else the text."""
    core = text[:-2] if text.endswith("ms") else text
    try:
        return float(core)
    except ValueError:
        return text


def _parse_tokens(text: str) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for token in text.split():
        key, _, value = token.partition(":")
        out[key] = _parse_value(value)
    return out


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.4e}"
        return f"{value:.4f}"
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"run log value {text!r} must be non-empty and contain no whitespace")
    return text


def format_tokens(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}:{format_value(v)}" for k, v in fields.items() if v is not None)


# ------------------------------------------------------------------------------------------
# Records


@dataclass
class StepRecord:
    step: int
    total: int
    values: dict[str, float | str]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @property
    def val_loss(self) -> float | None:
        v = self.values.get("val_loss")
        return v if isinstance(v, float) else None

    @property
    def train_loss(self) -> float | None:
        v = self.values.get("train_loss")
        return v if isinstance(v, float) else None

    @property
    def train_time_ms(self) -> float | None:
        v = self.values.get("train_time")
        return v if isinstance(v, float) else None

    @property
    def step_avg_ms(self) -> float | None:
        v = self.values.get("step_avg")
        return v if isinstance(v, float) and math.isfinite(v) else None


@dataclass
class DiagRecord:
    step: int
    layer: str
    values: dict[str, float | str]


@dataclass
class StatusRecord:
    status: str
    values: dict[str, float | str]


Record = StepRecord | DiagRecord | StatusRecord


def parse_record(line: str) -> Record | None:
    """One step, diag or status line as its record; None for any other line. The same patterns
    as LogParser's (the trackers are fed through this from the lines the writer wrote)."""
    if line.startswith("step:"):
        m = STEP_RE.match(line)
        if m:
            return StepRecord(int(m.group(1)), int(m.group(2)), _parse_tokens(m.group(3)))
    elif line.startswith("diag "):
        m = DIAG_RE.match(line)
        if m:
            values = _parse_tokens(m.group(1))
            step = values.pop("step", None)
            layer = values.pop("layer", "")
            if isinstance(step, float):
                return DiagRecord(int(step), str(layer), values)
    elif line.startswith("status:"):
        m = STATUS_RE.match(line)
        if m:
            return StatusRecord(m.group(1), _parse_tokens(m.group(2)))
    return None


@dataclass
class RunLog:
    """Everything a reader knows about one log; built incrementally by LogParser."""

    path: str = ""
    ours: bool = False  # written by this harness (vs. modded-nanogpt's own)
    run_id: str = ""
    config: dict[str, Any] | None = None
    env: dict[str, float | str] = field(default_factory=dict)
    train_steps: list[StepRecord] = field(default_factory=list)
    val_steps: list[StepRecord] = field(default_factory=list)
    diags: list[DiagRecord] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    status: str | None = None
    status_fields: dict[str, float | str] = field(default_factory=dict)
    garbage_lines: int = 0  # lines after the header that matched nothing we know and are not printable text
    partial_tail: bool = False  # the file ends in the middle of a line
    partial_line: str = ""  # that unterminated last line (shown by the monitor, never parsed)
    bytes_read: int = 0

    @property
    def name(self) -> str:
        return self.run_id or Path(self.path).stem

    @property
    def tag(self) -> str:
        return str((self.config or {}).get("tag") or "")

    @property
    def total_steps(self) -> int | None:
        last = self.last_step_record
        return last.total if last else None

    @property
    def last_step_record(self) -> StepRecord | None:
        cands = [r for r in (self.train_steps[-1:] + self.val_steps[-1:])]
        return max(cands, key=lambda r: r.step) if cands else None

    @property
    def last_step(self) -> int | None:
        last = self.last_step_record
        return last.step if last else None

    @property
    def final_val_loss(self) -> float | None:
        if "final_val_loss" in self.status_fields and isinstance(self.status_fields["final_val_loss"], float):
            return self.status_fields["final_val_loss"]
        if self.val_steps and self.val_steps[-1].step == self.val_steps[-1].total:
            return self.val_steps[-1].val_loss
        return None

    @property
    def finished(self) -> bool:
        """A finished run: our status line, or (modded logs) a validation at the last step."""
        if self.status is not None:
            return self.status == "finished"
        return self.final_val_loss is not None


class LogParser:
    """Feeds text in any chunks; keeps an unterminated last line until its end arrives."""

    def __init__(self, path: str = ""):
        self.log = RunLog(path=str(path))
        self._pending = ""
        self._line_no = 0
        self._in_sources = False
        self._seen_separators = 0

    def feed(self, text: str) -> None:
        text = self._pending + text
        lines = text.split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line.rstrip("\r"))
        self.log.partial_tail = bool(self._pending)
        self.log.partial_line = self._pending[:200]

    def _line(self, line: str) -> None:
        self._line_no += 1
        log = self.log
        if self._line_no == 1:
            m = HEADER_RE.match(line)
            if m:
                log.ours = True
                log.run_id = m.group(2)
                return
        if line == SEPARATOR:
            self._seen_separators += 1
            # our logs: sources sit between the first two separators
            self._in_sources = log.ours and self._seen_separators == 1
            return
        if self._in_sources:
            return
        if line.startswith(("step:", "diag ", "status:")):
            rec = parse_record(line)
            if isinstance(rec, StepRecord):
                (log.val_steps if "val_loss" in rec.values else log.train_steps).append(rec)
                return
            if isinstance(rec, DiagRecord):
                log.diags.append(rec)
                return
            if isinstance(rec, StatusRecord):
                log.status, log.status_fields = rec.status, rec.values
                return
        elif line.startswith("config: "):
            m = CONFIG_RE.match(line)
            if m:
                try:
                    log.config = json.loads(m.group(1))
                    if not log.run_id:
                        log.run_id = str(log.config.get("run_id") or "")
                    return
                except json.JSONDecodeError:
                    pass
        elif line.startswith("resumed from step "):
            m = RESUMED_RE.match(line)
            if m:
                log.resumed_from.append(int(m.group(1)))
                # a resumed run continues: earlier outcome no longer stands
                log.status, log.status_fields = None, {}
                self._drop_after(int(m.group(1)))
                return
        elif line.startswith("env: "):
            log.env = _parse_tokens(ENV_RE.match(line).group(1))
            return
        if _is_garbage(line):
            log.garbage_lines += 1

    def _drop_after(self, step: int) -> None:
        """Steps logged after the checkpoint but before a crash are redone by the resumed run."""
        log = self.log
        log.train_steps = [r for r in log.train_steps if r.step <= step]
        log.val_steps = [r for r in log.val_steps if r.step <= step]
        log.diags = [d for d in log.diags if d.step <= step]


def _is_garbage(line: str) -> bool:
    if not line:
        return False
    bad = sum(1 for c in line if (not c.isprintable() and c != "\t") or c == "\ufffd")
    return bad > 0


def parse_text(text: str, path: str = "") -> RunLog:
    p = LogParser(path)
    p.feed(text)
    p.log.bytes_read = len(text.encode("utf-8", "surrogateescape"))
    return p.log


def read_log(path: str | os.PathLike) -> RunLog:
    """Parse a whole log file (ours or modded-nanogpt's)."""
    follower = LogFollower(path)
    follower.refresh()
    return follower.log


class LogFollower:
    """Reads a growing log incrementally: each refresh() reads only the bytes appended since
    the last one. A file that shrank (truncated), was replaced (new inode) or was rewritten in
    place (the last bytes already read changed) is re-read from the start."""

    CHECK_BYTES = 32  # bytes before the offset re-read on each refresh to detect a rewrite

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.offset = 0
        self._inode: int | None = None
        self._mtime_ns: int | None = None
        self._check = b""  # the last CHECK_BYTES bytes read, as they were
        self._parser = LogParser(self.path)
        self._decoder_tail = b""
        self.last_write: float | None = None  # mtime of the file at the last refresh
        self.resets = 0  # how many times the file was re-read from the start

    @property
    def log(self) -> RunLog:
        return self._parser.log

    def _reset(self) -> None:
        self.offset = 0
        self._check = b""
        self._parser = LogParser(self.path)
        self._decoder_tail = b""
        self.resets += 1

    def refresh(self) -> bool:
        """Read what was appended. Returns True when anything new was read (or the file was reset)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        reset = self._inode is not None and (st.st_ino != self._inode or st.st_size < self.offset)
        if reset:
            self._reset()
        unchanged = st.st_size == self.offset and st.st_mtime_ns == self._mtime_ns
        self._inode = st.st_ino
        self._mtime_ns = st.st_mtime_ns
        self.last_write = st.st_mtime
        if unchanged:
            return reset
        with open(self.path, "rb") as f:
            # re-read the last bytes we already have: if they changed, the file was rewritten
            f.seek(self.offset - len(self._check))
            data = f.read()
            if not data.startswith(self._check):
                self._reset()
                reset = True
                f.seek(0)
                data = f.read()
            else:
                data = data[len(self._check):]
        if not data:
            return reset
        self.offset += len(data)
        self._check = (self._check + data)[-self.CHECK_BYTES:]
        data = self._decoder_tail + data
        # keep an incomplete UTF-8 sequence for the next read instead of mangling it
        cut = len(data)
        for back in range(1, min(4, len(data)) + 1):
            b = data[-back]
            if b & 0xC0 == 0x80:
                continue
            if b & 0xC0 == 0xC0:
                need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4
                if back < need:
                    cut = len(data) - back
            break
        self._decoder_tail = data[cut:]
        self._parser.feed(data[:cut].decode("utf-8", errors="replace"))
        self._parser.log.bytes_read = self.offset
        return True


# ------------------------------------------------------------------------------------------
# Writer


class LogWriteError(UserError):
    """The run log could not be written (disk full, file system gone read-only)."""


def _fallocate_keep_size():
    """libc's fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, len), or None where there is none."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    except (OSError, AttributeError):
        return None

    def reserve(fd: int, offset: int, length: int) -> None:
        if fn(fd, 1, offset, length) != 0:  # 1 = FALLOC_FL_KEEP_SIZE
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return reserve


_reserve = _fallocate_keep_size()


class RunLogWriter:
    """Appends line by line (one unbuffered write each). Only rank 0 creates one.

    Nothing half-written: RESERVE_BYTES past the end of the file stay allocated (fallocate with
    KEEP_SIZE, where the file system has it), so when the disk fills up the line that ran into
    it is complete, the writer raises LogWriteError (a UserError: one line, exit 2), and the
    `status:failed` line still fits in the reserve. Where a write fails anyway, the file is
    cut back to its last complete line."""

    RESERVE_BYTES = 8192

    def __init__(self, path: str | os.PathLike, run_id: str, *, append: bool = False, echo: bool = True):
        self.path = Path(path)
        self.run_id = run_id
        self.echo = echo
        self.broken: str | None = None  # why the log cannot take more lines
        # given each step/diag/status record once its line is in the log (harness/trackers.py):
        # objects with record(rec) and close(); they never see a line the log does not have
        self.listeners: list[Any] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if append:
                if not self.path.exists():
                    raise UserError(f"{self.path}: cannot resume: the run log does not exist")
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            else:
                # exclusive create: an existing log is never overwritten
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except FileExistsError:
            if self.path.parent.is_dir():
                raise UserError(
                    f"{self.path}: a run log with run_id {run_id!r} already exists; refusing to overwrite it"
                    " (choose another RUN_ID, or --resume to continue that run)"
                ) from None
            raise UserError(f"log_dir={str(self.path.parent)!r}: is a file, not a directory") from None
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the run log ({e.strerror or e}); pass --log_dir DIR"
                            " with a writable directory") from None
        self._fd = fd
        self._size = os.fstat(fd).st_size  # the end of the last complete line
        self._reserve()

    def _reserve(self) -> None:
        if _reserve is None:
            return
        try:
            _reserve(self._fd, self._size, self.RESERVE_BYTES)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise self._fail(e) from None
            # EOPNOTSUPP and the like: a file system without it; lines are still cut back on failure

    def _fail(self, e: OSError) -> LogWriteError:
        self.broken = e.strerror or str(e)
        return LogWriteError(f"{self.path}: cannot write the run log ({self.broken}); it ends at its last"
                             " complete line; free some space and continue with --resume latest")

    def _write_bytes(self, data: bytes) -> None:
        if self.broken is not None:
            raise LogWriteError(f"{self.path}: the run log cannot be written ({self.broken})")
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._size)  # no half line
            except OSError:
                pass
            raise self._fail(e) from None
        self._size += len(data)
        self._reserve()

    def write(self, line: str, echo: bool | None = None) -> None:
        self._write_bytes((line.rstrip("\n") + "\n").encode("utf-8", "surrogateescape"))
        if self.echo if echo is None else echo:
            print(line, flush=True)
        if self.listeners:
            rec = parse_record(line.rstrip("\n"))
            if rec is not None:
                for listener in self.listeners:
                    listener.record(rec)

    def header(self, sources: Iterable[tuple[str, str]], env: dict[str, Any], config: dict[str, Any]) -> None:
        self.write(f"runlog:{FORMAT_VERSION} run_id:{self.run_id}", echo=False)
        self.write(SEPARATOR, echo=False)
        for path, text in sources:
            self.write(f"{SOURCE_PREFIX}{path}", echo=False)
            self._write_bytes((text if text.endswith("\n") else text + "\n").encode("utf-8", "surrogateescape"))
        self.write(SEPARATOR, echo=False)
        self.env(env)
        self.config(config)

    def env(self, env: dict[str, Any]) -> None:
        self.write("env: " + format_tokens(env))

    def config(self, config: dict[str, Any]) -> None:
        self.write("config: " + json.dumps(config, sort_keys=False, separators=(",", ":")))

    def raw(self, text: str) -> None:
        """Free text (e.g. nvidia-smi output), written as-is; readers ignore it."""
        for line in text.rstrip("\n").split("\n"):
            if STEP_RE.match(line) or STATUS_RE.match(line) or DIAG_RE.match(line):
                line = "  " + line  # never let free text pose as a record
            self.write(line, echo=False)

    def step(
        self,
        step: int,
        total: int,
        *,
        train_time_ms: float,
        step_avg_ms: float,
        val_loss: float | None = None,
        train_loss: float | None = None,
        **extra: Any,
    ) -> None:
        head = f"step:{step}/{total}"
        if val_loss is not None:
            head += f" val_loss:{val_loss:.4f}"
        head += f" train_time:{train_time_ms:.0f}ms step_avg:{step_avg_ms:.2f}ms"
        if train_loss is not None:
            extra = {"train_loss": train_loss, **extra}
        tail = format_tokens(extra)
        self.write(head + (" " + tail if tail else ""))

    def diag(self, step: int, layer: str, echo: bool = False, **metrics: Any) -> None:
        self.write(f"diag step:{step} layer:{layer} " + format_tokens(metrics), echo=echo)

    def resumed(self, step: int) -> None:
        self.write(f"resumed from step {step}")

    def status(self, status: str, **fields: Any) -> bool:
        """Write the status line; False (and nothing half-written) when the log cannot take it."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        tail = format_tokens(fields)
        line = f"status:{status}" + (" " + tail if tail else "")
        # after a failed write the reserve past the end is still ours: the last line fits there
        before, self.broken = self._size, None
        try:
            self.write(line)
        except LogWriteError:
            return self._size > before  # written, and only the reserve after it failed
        return True

    def close(self) -> None:
        if self._fd < 0:
            return
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener.close()
        try:
            if _reserve is not None:
                os.ftruncate(self._fd, self._size)  # give the reserve back
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = -1


def log_path(log_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(log_dir) / f"{run_id}.txt"


def find_logs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (their *.txt files) into a sorted list of log paths."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.glob("*.txt") if q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p}: no such log file or directory")
    return out
