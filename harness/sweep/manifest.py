"""The sweep manifest `logs/sweeps/<sweep_id>.json`: every run's command, run id, status, exit
code and final val loss, rewritten atomically (temp file + os.replace) after every change, so a
reader (monitor_runs.py --sweep, `launch_lr_sweep.py --resume`) never sees half a file.

Run statuses: pending (not started), running, submitted (queued in Slurm), then the outcome:
finished, diverged, failed, interrupted, preempted (the log's own status where it has one).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from base import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError, atomic_write
from harness.logs.format import RunLog, log_path, read_log
from harness.logs.runs import sweep_manifest_path

FORMAT = 1
ACTIVE = ("running", "submitted")
OUTCOMES = ("finished", "diverged", "failed", "interrupted", "preempted")


@dataclass
class RunRecord:
    key: str
    tag: str
    seed: int
    script: str
    nproc: int
    baseline: bool
    swept: dict[str, Any]
    fields: dict[str, Any]
    run_id: str
    command: list[str]
    status: str = "pending"
    exit_code: int | None = None
    final_val_loss: float | None = None
    last_step: int | None = None
    reason: str = ""
    pid: int | None = None  # of the launched process group's leader (local)
    gpus: list[int] | None = None
    job_id: str | None = None  # Slurm: the job id, or <array job id>_<task> for a job array's task
    output: str = ""  # the run's console output (stdout + stderr)
    started: float | None = None
    ended: float | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier tries (resume)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["final_val_loss"], float) and not math.isfinite(d["final_val_loss"]):
            d["final_val_loss"] = str(d["final_val_loss"])
        return d


@dataclass
class Manifest:
    sweep_id: str
    log_dir: str
    source: str = ""
    argv: list[str] = field(default_factory=list)
    executor: dict[str, Any] = field(default_factory=dict)  # kind local|slurm and its options
    created: float = field(default_factory=time.time)
    launcher_pid: int | None = None
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return sweep_manifest_path(self.log_dir, self.sweep_id)

    @property
    def run_dir(self) -> Path:
        """Per-sweep files: run outputs, sbatch scripts."""
        return Path(self.log_dir) / "sweeps" / self.sweep_id

    def save(self) -> None:
        doc = {
            "format": FORMAT,
            "sweep_id": self.sweep_id,
            "log_dir": self.log_dir,
            "source": self.source,
            "argv": self.argv,
            "executor": self.executor,
            "created": self.created,
            "updated": time.time(),
            "launcher_pid": self.launcher_pid,
            "runs": [r.to_json() for r in self.runs],
        }
        atomic_write(self.path, json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, log_dir: str | os.PathLike, sweep_id: str) -> "Manifest":
        path = sweep_manifest_path(log_dir, sweep_id)
        if not path.is_file():
            raise UserError(f"{path}: no manifest for sweep {sweep_id!r} (sweeps are listed in {path.parent}/)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            runs = []
            for r in doc["runs"]:
                if isinstance(r.get("final_val_loss"), str):
                    r["final_val_loss"] = float(r["final_val_loss"])
                runs.append(RunRecord(**r))
            return cls(sweep_id=doc["sweep_id"], log_dir=str(log_dir), source=doc.get("source", ""),
                       argv=doc.get("argv", []), executor=doc.get("executor", {}), created=doc.get("created", 0.0),
                       launcher_pid=doc.get("launcher_pid"), runs=runs)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: not a sweep manifest of this launcher ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------
# Outcomes


def read_run_log(log_dir: str | os.PathLike, run_id: str) -> RunLog | None:
    path = log_path(log_dir, run_id)
    return read_log(path) if path.is_file() else None


def last_error_line(output_path: str | os.PathLike) -> str:
    """The last `error: ...` line of a run's console output, else its last non-empty line."""
    try:
        with open(output_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = [l.strip() for l in f.read().decode("utf-8", "replace").splitlines() if l.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    return lines[-1] if lines else ""


def outcome(exit_code: int | None, log: RunLog | None, output_path: str = "") -> tuple[str, str]:
    """(status, reason) of an ended run: the log's status line wins; otherwise the exit code."""
    if log is not None and log.status in OUTCOMES:
        reason = str(log.status_fields.get("reason", "")) if log.status == "failed" else ""
        return log.status, reason
    if exit_code == 0:
        if log is not None and log.finished:
            return "finished", ""
        return "failed", "exit code 0 but the log has no status:finished line"
    if exit_code == EXIT_DIVERGED:
        return "diverged", ""
    if exit_code in (EXIT_INTERRUPTED, -signal.SIGINT):
        return "interrupted", ""
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return "failed", f"killed by {name}"
    if exit_code is not None and exit_code > 128 and exit_code - 128 < 65:
        try:
            return "failed", f"killed by {signal.Signals(exit_code - 128).name}"
        except ValueError:
            pass
    detail = last_error_line(output_path) if output_path else ""
    what = "bad input" if exit_code == EXIT_USER_ERROR else f"exit code {exit_code}"
    return "failed", f"{what}: {detail}" if detail else what


def record_outcome(rec: RunRecord, log_dir: str, exit_code: int | None, status: str | None = None) -> None:
    """Fill status, reason, final val loss and last step from the exit code and the run log."""
    log = read_run_log(log_dir, rec.run_id)
    st, reason = outcome(exit_code, log, rec.output)
    if status is not None and st not in ("finished", "diverged", "preempted"):
        st = status  # e.g. interrupted by the launcher: say so whatever the child printed
    rec.status, rec.reason, rec.exit_code = st, reason, exit_code
    rec.ended = time.time()
    if log is not None:
        rec.final_val_loss = log.final_val_loss
        rec.last_step = log.last_step
