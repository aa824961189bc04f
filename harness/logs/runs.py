"""Runs as the monitor and the plotter see them: discovery, status, summary, grouping.

Parsing stays in `harness.logs.format`; this module only interprets parsed `RunLog`s.

Status of a run (`run_status`):
- the log's own status line wins: finished, diverged, failed, preempted, interrupted;
- otherwise a non-finite last train or val loss means diverged;
- otherwise a validation at the last step (modded-nanogpt's logs have no status line) means finished;
- otherwise, when the file has not been written for longer than
  `max(stale_min_s, stale_factor * step_avg)` (60 s and 10x by default), the run is stale;
- otherwise it is running.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from base import UserError
from harness.config import ORD_FIELDS as CONFIG_ORD_FIELDS
from harness.logs.format import LogFollower, RunLog, find_logs
from harness.speedrun_stats import DEFAULT_TARGET, target_hit

STALE_MIN_S = 60.0
STALE_FACTOR = 10.0

ENDED = ("finished", "diverged", "failed", "preempted", "interrupted", "stale")


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


# ------------------------------------------------------------------------------------------
# Status and summary


def stale_threshold_s(step_avg_ms: float | None, stale_min_s: float = STALE_MIN_S, stale_factor: float = STALE_FACTOR) -> float:
    """Seconds without a write after which a run with no status line is stale."""
    return max(stale_min_s, stale_factor * (step_avg_ms or 0.0) / 1000.0)


def last_step_avg_ms(log: RunLog) -> float | None:
    last = log.last_step_record
    return last.step_avg_ms if last else None


def run_status(
    log: RunLog,
    last_write: float | None,
    now: float | None = None,
    stale_min_s: float = STALE_MIN_S,
    stale_factor: float = STALE_FACTOR,
) -> str:
    if log.status:
        return log.status
    last_train = log.train_steps[-1].train_loss if log.train_steps else None
    last_val = log.val_steps[-1].val_loss if log.val_steps else None
    if any(isinstance(v, float) and not math.isfinite(v) for v in (last_train, last_val)):
        return "diverged"
    if log.finished:
        return "finished"
    now = time.time() if now is None else now
    if last_write is not None and now - last_write > stale_threshold_s(last_step_avg_ms(log), stale_min_s, stale_factor):
        return "stale"
    return "running"


@dataclass
class RunSummary:
    """One row of the monitor; also what `--format json|csv` prints."""

    run_id: str
    tag: str
    path: str
    status: str
    step: int | None = None
    total: int | None = None
    progress: float | None = None  # step / total in [0, 1]
    train_loss: float | None = None  # last
    val_loss: float | None = None  # last
    val_step: int | None = None  # step of the last validation
    best_val_loss: float | None = None
    best_val_step: int | None = None
    final_val_loss: float | None = None
    step_avg_ms: float | None = None
    elapsed_s: float | None = None  # training time (excludes validation and compilation)
    eta_s: float | None = None  # remaining steps x step_avg, for running runs
    last_write: float | None = None  # unix time of the last write to the file
    seed: Any = None
    script: str = ""
    resumed: int = 0
    garbage_lines: int = 0
    partial_line: bool = False
    notes: list[str] = field(default_factory=list)
    target: float = DEFAULT_TARGET  # the val loss of steps_to_target / time_to_target_ms
    steps_to_target: int | None = None  # step of the first validation with val loss <= target
    time_to_target_ms: float | None = None  # its train_time

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no NaN/inf: write them as strings so a diverged run stays readable
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)
        return d


def _partial_line_is_news(log: RunLog) -> bool:
    """An unterminated last line worth flagging: binary bytes or a half-written record.
    (modded-nanogpt ends its logs with a `peak memory` line without a newline: not news.)"""
    text = log.partial_line
    if not text:
        return False
    if any((not c.isprintable() and c != "\t") or c == "\ufffd" for c in text):
        return True
    return text.startswith(("step:", "diag ", "status:", "config: ", "resumed ", "runlog:"))


def summarize(
    log: RunLog,
    last_write: float | None = None,
    now: float | None = None,
    stale_min_s: float = STALE_MIN_S,
    stale_factor: float = STALE_FACTOR,
    target: float = DEFAULT_TARGET,
) -> RunSummary:
    status = run_status(log, last_write, now, stale_min_s, stale_factor)
    cfg = log.config or {}
    s = RunSummary(
        run_id=log.name,
        tag=log.tag,
        path=log.path,
        status=status,
        last_write=last_write,
        seed=cfg.get("seed"),
        script=str(cfg.get("script") or ""),
        resumed=len(log.resumed_from),
        garbage_lines=log.garbage_lines,
        partial_line=_partial_line_is_news(log),
    )
    last = log.last_step_record
    if last is not None:
        s.step, s.total = last.step, last.total
        s.progress = min(1.0, last.step / last.total) if last.total > 0 else None
        s.elapsed_s = last.train_time_ms / 1000.0 if last.train_time_ms is not None else None
        s.step_avg_ms = last.step_avg_ms
    # the last train loss: modded-nanogpt's newer logs have none on step lines
    for rec in reversed(log.train_steps[-50:]):
        if rec.train_loss is not None:
            s.train_loss = rec.train_loss
            break
    if log.val_steps:
        s.val_loss, s.val_step = log.val_steps[-1].val_loss, log.val_steps[-1].step
        finite = [r for r in log.val_steps if _finite(r.val_loss)]
        if finite:
            best = min(finite, key=lambda r: r.val_loss)
            s.best_val_loss, s.best_val_step = best.val_loss, best.step
    s.final_val_loss = log.final_val_loss
    s.target = target
    hit = target_hit(log, target)
    if hit is not None:
        s.steps_to_target, s.time_to_target_ms = hit.step, hit.train_time_ms
    if status == "running" and s.step is not None and s.total and s.step_avg_ms:
        s.eta_s = max(0, s.total - s.step) * s.step_avg_ms / 1000.0
    if s.garbage_lines:
        s.notes.append(f"{s.garbage_lines} garbage line{'s' if s.garbage_lines != 1 else ''}")
    if s.partial_line:
        s.notes.append("half-written last line")
    if s.resumed:
        s.notes.append(f"resumed x{s.resumed}")
    if last is None and log.bytes_read:
        s.notes.append("no step lines")
    if status == "failed" and log.status_fields.get("reason") is not None:
        s.notes.append(f"reason: {log.status_fields['reason']}")
    return s


# ------------------------------------------------------------------------------------------
# Grouping


def group_key(log: RunLog, group_by: str = "tag") -> str:
    """The group of a run: `tag` (empty tag -> the script's stem; modded-nanogpt logs, which
    have no config -> the file stem), `script`, or any config FIELD (modded logs -> "modded";
    standard runs under an ORD field such as spectral_lr_mul -> "baseline")."""
    cfg = log.config
    if group_by == "tag":
        if cfg is None:
            return Path(log.path).stem or log.name
        return log.tag or Path(str(cfg.get("script") or "untagged")).stem
    if cfg is None:
        return "modded"
    if cfg.get("ord") is False and group_by in ORD_FIELDS:
        # a standard run has no ORD setting (null since the fork-parity change; older logs
        # recorded the field's default): grouped by an ORD field, it is the baseline
        return "baseline"
    value = cfg.get(group_by)
    if value is None:
        return "(none)"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# the ORD fields of today's config and of older logs
ORD_FIELDS = (*CONFIG_ORD_FIELDS, "ord_project", "ord_parallel_placement")


def group_runs(logs: Iterable[RunLog], group_by: str = "tag") -> dict[str, list[RunLog]]:
    out: dict[str, list[RunLog]] = {}
    for log in logs:
        out.setdefault(group_key(log, group_by), []).append(log)
    return out


def is_baseline_run(log: RunLog) -> bool:
    cfg = log.config or {}
    return Path(str(cfg.get("script") or "")).name == "train_gpt.py" or log.tag.startswith("baseline")


def default_baseline(groups: dict[str, list[RunLog]]) -> str | None:
    """The group holding the most baseline runs (tag `baseline*` first, then script train_gpt.py);
    ties broken by name. None where no run is a baseline."""
    best: tuple[int, int, str] | None = None
    for name, logs in groups.items():
        tagged = sum(1 for l in logs if l.tag.startswith("baseline"))
        scripted = sum(1 for l in logs if is_baseline_run(l))
        if tagged or scripted:
            key = (-tagged, -scripted, name)
            best = key if best is None or key < best else best
    return best[2] if best else None


# ------------------------------------------------------------------------------------------
# Comparison at a common step


def val_loss_at(log: RunLog, step: int) -> tuple[int, float] | None:
    """The last finite validation at or before `step`."""
    for rec in reversed(log.val_steps):
        if rec.step <= step and rec.val_loss is not None:
            return rec.step, rec.val_loss
    return None


@dataclass
class ComparisonRow:
    group: str
    n: int
    step: int  # the common step
    val_loss: float  # mean over the group's runs of the latest val loss at or before `step`
    delta: float  # from the best group


def compare_at_common_step(logs: Sequence[RunLog], group_by: str = "tag") -> list[ComparisonRow]:
    """Groups compared at the largest step every compared run has validated at or past:
    each run's latest val loss at or before that step, averaged per group, with the gap to the
    best group. Runs with no finite validation after step 0 are left out (they would pull the
    common step back to the initialization)."""
    usable = [l for l in logs if any(r.step > 0 and _finite(r.val_loss) for r in l.val_steps)]
    if not usable:
        return []
    common = min(max(r.step for r in l.val_steps if _finite(r.val_loss)) for l in usable)
    rows: list[ComparisonRow] = []
    for name, members in group_runs(usable, group_by).items():
        vals = [v[1] for v in (val_loss_at(l, common) for l in members) if v is not None and math.isfinite(v[1])]
        if vals:
            rows.append(ComparisonRow(name, len(vals), common, sum(vals) / len(vals), 0.0))
    if rows:
        best = min(r.val_loss for r in rows)
        for r in rows:
            r.delta = r.val_loss - best
    return sorted(rows, key=lambda r: (r.val_loss, r.group))


# ------------------------------------------------------------------------------------------
# Sweeps and the set of followed logs


def sweep_manifest_path(log_dir: str | os.PathLike, sweep_id: str) -> Path:
    return Path(log_dir) / "sweeps" / f"{sweep_id}.json"


def load_sweep(log_dir: str | os.PathLike, sweep_id: str) -> list[dict[str, Any]]:
    """The runs of a sweep manifest (`logs/sweeps/<ID>.json`: {"runs": [{"run_id": ...}, ...]})."""
    path = sweep_manifest_path(log_dir, sweep_id)
    if not path.is_file():
        raise UserError(f"{path}: no manifest for sweep {sweep_id!r} (sweeps are listed in {path.parent}/)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON sweep manifest ({e})") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and r.get("run_id") for r in runs):
        raise UserError(f'{path}: field "runs" must be a list of objects with a "run_id"')
    return runs


class RunTracker:
    """Follows the logs under some files/directories. Each refresh() looks for new files in the
    directories and reads only what was appended to each file since the last refresh."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = list(paths)
        self.followers: dict[str, LogFollower] = {}

    def refresh(self) -> list[LogFollower]:
        found = find_logs(self.paths)
        for p in found:
            key = str(p)
            if key not in self.followers:
                self.followers[key] = LogFollower(p)
        alive = {str(p) for p in found}
        for key in list(self.followers):
            if key not in alive:  # deleted: forget it
                del self.followers[key]
        for f in self.followers.values():
            f.refresh()
        return list(self.followers.values())


def matches(summary: RunSummary, text: str) -> bool:
    """--filter: a case-insensitive substring of the run id, tag or file name."""
    t = text.lower()
    return any(t in s.lower() for s in (summary.run_id, summary.tag, Path(summary.path).name))


def summarize_followers(
    followers: Iterable[LogFollower],
    *,
    now: float | None = None,
    stale_min_s: float = STALE_MIN_S,
    stale_factor: float = STALE_FACTOR,
    filter_text: str | None = None,
    sweep_runs: list[dict[str, Any]] | None = None,
    target: float = DEFAULT_TARGET,
) -> list[RunSummary]:
    now = time.time() if now is None else now
    out = [summarize(f.log, f.last_write, now, stale_min_s, stale_factor, target) for f in followers]
    if sweep_runs is not None:
        wanted = {str(r["run_id"]): r for r in sweep_runs}
        out = [s for s in out if s.run_id in wanted]
        seen = {s.run_id for s in out}
        # runs of the sweep with no log yet: the manifest's word on them
        for rid, r in wanted.items():
            if rid not in seen:
                out.append(RunSummary(run_id=rid, tag=str(r.get("tag") or ""), path="", status=str(r.get("status") or "pending"),
                                      notes=["no log yet"], target=target))
    if filter_text:
        out = [s for s in out if matches(s, filter_text)]
    return sorted(out, key=lambda s: (s.tag, s.run_id))


class Monitor:
    """The state of one monitor session: the followed logs and what to show."""

    def __init__(
        self,
        paths: Sequence[str],
        *,
        filter_text: str | None = None,
        sweep: str | None = None,
        stale_min_s: float = STALE_MIN_S,
        stale_factor: float = STALE_FACTOR,
        target: float = DEFAULT_TARGET,
    ):
        self.tracker = RunTracker(paths)
        self.target = target
        self.filter_text = filter_text
        self.stale_min_s = stale_min_s
        self.stale_factor = stale_factor
        self.sweep_id = sweep
        self.sweep_dir = next((p for p in paths if Path(p).is_dir()), "logs")
        self.sweep_runs = load_sweep(self.sweep_dir, sweep) if sweep else None

    def refresh(self) -> tuple[list[RunSummary], list[ComparisonRow]]:
        if self.sweep_id:  # the launcher rewrites its manifest as runs are queued
            self.sweep_runs = load_sweep(self.sweep_dir, self.sweep_id)
        followers = self.tracker.refresh()
        summaries = summarize_followers(
            followers,
            stale_min_s=self.stale_min_s,
            stale_factor=self.stale_factor,
            filter_text=self.filter_text,
            sweep_runs=self.sweep_runs,
            target=self.target,
        )
        shown = {s.path for s in summaries if s.status in ("finished", "running")}
        compared = [f.log for f in followers if f.path in shown]
        return summaries, compare_at_common_step(compared, "tag")
