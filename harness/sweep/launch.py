"""A sweep from declaration to summary: expand and validate every run, write the manifest,
hand the runs to the local or Slurm executor, resume what did not finish, print the table.

Modules of this package: spec (TOML/flags -> runs, run ids, validation), manifest (the JSON record,
outcomes), local (processes, GPU packing, signals), slurm (sbatch jobs).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from base.processes import pid_alive
from base import EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNS_FAILED, UserError
from harness.config import RUN_ID_PATTERN
from harness.logs.format import log_path
from harness.logs.runs import sweep_manifest_path
from harness.sweep.local import launch_prefix, marked_processes
from harness.sweep.manifest import ACTIVE, Manifest, RunRecord, read_run_log
from harness.sweep.spec import RunPlan, SweepSpec, expand, resolved_config, run_id_for, timestamp, validate_run


def _command(plan: RunPlan, run_id: str, log_dir: str, python: str, use_torchrun: str, resume: str | None = None) -> list[str]:
    return [*launch_prefix(plan.nproc, python, use_torchrun), plan.script, *plan.flags(run_id, log_dir, resume)]


def _plan_of(rec: RunRecord) -> RunPlan:
    return RunPlan(key=rec.key, tag=rec.tag, seed=rec.seed, script=rec.script, nproc=rec.nproc,
                   baseline=rec.baseline, fields=rec.fields, swept=rec.swept)


def _unique_run_id(base: str, log_dir: str, taken: set[str]) -> str:
    rid, n = base, 1
    while rid in taken or log_path(log_dir, rid).exists():
        n += 1
        rid = f"{base}-{n}"
    return rid


def create_sweep(
    spec: SweepSpec,
    *,
    repo_root: Path,
    log_dir: str,
    max_runs: int,
    python: str = sys.executable,
    use_torchrun: str = "auto",
    nodes: int = 1,
    argv: Sequence[str] = (),
) -> Manifest:
    """Every run expanded, given its run id and command, and validated as the trainer will;
    nothing is started and nothing is written."""
    if not RUN_ID_PATTERN.match(spec.name) or ".." in spec.name:
        raise UserError(f"sweep name {spec.name!r} is invalid: letters, digits and . _ = + , @ - only")
    plans = expand(spec, repo_root, max_runs)
    stamp = timestamp()
    sweep_id = spec.name + "-" + stamp
    n = 1
    while sweep_manifest_path(log_dir, sweep_id).exists():
        n += 1
        sweep_id = f"{spec.name}-{stamp}-{n}"
    with_seed = len({p.seed for p in plans}) > 1
    manifest = Manifest(sweep_id=sweep_id, log_dir=log_dir, source=spec.source, argv=list(argv))
    taken: set[str] = set()
    for plan in plans:
        rid = _unique_run_id(run_id_for(plan, stamp, with_seed, resolved_config(plan, log_dir)), log_dir, taken)
        taken.add(rid)
        validate_run(plan, rid, log_dir, nodes=nodes)
        manifest.runs.append(RunRecord(
            key=plan.key, tag=plan.tag, seed=plan.seed, script=plan.script, nproc=plan.nproc, baseline=plan.baseline,
            swept=plan.swept, fields=plan.fields, run_id=rid,
            command=_command(plan, rid, log_dir, python, use_torchrun),
        ))
    return manifest


def check_data(todo: list[RunRecord], repo_root: Path, log_dir: str) -> None:
    """Every run's training and validation shards exist, checked once per distinct path before
    any run starts (a missing data directory would otherwise fail every run, one by one).
    Relative paths are taken from the repository root, where the runs start."""
    from data.shards import find_shards

    seen: set[tuple[str, str]] = set()
    for rec in todo:
        cfg = resolved_config(_plan_of(rec), log_dir)
        for split, spec in (("train", cfg.train_files), ("val", cfg.val_files)):
            path = spec if Path(spec).is_absolute() else str(Path(repo_root) / spec)
            if (split, path) in seen:
                continue
            seen.add((split, path))
            try:
                find_shards(path, split)
            except UserError as e:
                raise UserError(f"run {rec.tag} seed {rec.seed}: {split}_files: {e} (checked before any run"
                                f" starts)") from None


def plan_resume(manifest: Manifest, *, python: str = sys.executable, use_torchrun: str = "auto",
                keep_diverged: bool = False, nodes: int = 1, slurm_active: Callable[[list[str]], dict] | None = None) -> list[RunRecord]:
    """The runs to do again. A finished log: kept. A log ending in status:preempted: the same
    run id with `--resume latest` (the trainer appends to its log). Anything else (failed,
    diverged unless kept, interrupted, never started): a fresh run under a new run id, since an
    old log is never overwritten; the earlier try is kept in `attempts`. Slurm jobs still
    queued or running are waited for, not resubmitted."""
    if manifest.launcher_pid and manifest.launcher_pid != os.getpid() and pid_alive(manifest.launcher_pid) \
            and any(r.status == "running" and not r.job_id for r in manifest.runs):
        raise UserError(f"sweep {manifest.sweep_id} is still running (launcher pid {manifest.launcher_pid}); stop it first")
    for rec in manifest.runs:
        if rec.status == "running" and not rec.job_id and marked_processes(f"{manifest.sweep_id}/{rec.run_id}"):
            raise UserError(f"run {rec.run_id} of sweep {manifest.sweep_id} is still running; stop it first")
    active_jobs = {}
    jobs = [r.job_id for r in manifest.runs if r.job_id and r.status in ACTIVE]
    if jobs and slurm_active is not None:
        active_jobs = slurm_active(jobs)
    stamp = timestamp()
    with_seed = len({r.seed for r in manifest.runs}) > 1
    taken = {r.run_id for r in manifest.runs}
    todo: list[RunRecord] = []
    for rec in manifest.runs:
        if rec.job_id and rec.job_id in active_jobs:
            rec.status = "submitted"
            todo.append(rec)
            continue
        log = read_run_log(manifest.log_dir, rec.run_id)
        if log is not None and log.finished:
            rec.status, rec.final_val_loss, rec.last_step = "finished", log.final_val_loss, log.last_step
            continue
        if keep_diverged and ((log is not None and log.status == "diverged") or rec.status == "diverged"):
            continue
        rec.attempts.append({k: getattr(rec, k) for k in ("run_id", "status", "exit_code", "reason", "final_val_loss",
                                                            "last_step", "job_id", "started", "ended")})
        plan = _plan_of(rec)
        if log is not None and (log.status == "preempted"
                                or (log.status in (None, "interrupted") and _has_checkpoint(plan, rec.run_id, manifest.log_dir))):
            # stopped (SIGTERM, Ctrl-C, killed) with a checkpoint: the same run id goes on from it
            resume = "latest"
        else:
            resume = None
            cfg = resolved_config(plan, manifest.log_dir)
            rec.run_id = _unique_run_id(run_id_for(plan, stamp, with_seed, cfg), manifest.log_dir, taken)
            taken.add(rec.run_id)
        validate_run(plan, rec.run_id, manifest.log_dir, nodes=nodes)
        rec.command = _command(plan, rec.run_id, manifest.log_dir, python, use_torchrun, resume)
        rec.status, rec.exit_code, rec.reason, rec.final_val_loss, rec.last_step = "pending", None, "", None, None
        rec.pid, rec.job_id, rec.gpus, rec.output, rec.started, rec.ended = None, None, None, "", None, None
        todo.append(rec)
    return todo


def _checkpoint_dir(plan, run_id: str, log_dir: str) -> Path | None:
    """`<checkpoint_dir>/<run_id>` of the run (runs start in the repo root), None if its config does not resolve."""
    try:
        cfg = resolved_config(plan, log_dir)
    except UserError:
        return None
    base = Path(cfg.checkpoint_dir)
    if not base.is_absolute():
        base = Path(__file__).resolve().parents[2] / base
    return base / run_id


def run_checkpoint_dir(rec: RunRecord, log_dir: str) -> Path | None:
    return _checkpoint_dir(_plan_of(rec), rec.run_id, log_dir)


def _has_checkpoint(plan, run_id: str, log_dir: str) -> bool:
    """Whether the run has a step_<N>.pt in its checkpoint directory."""
    directory = _checkpoint_dir(plan, run_id, log_dir)
    return directory is not None and directory.is_dir() \
        and any(re.match(r"^step_\d+\.pt$", p.name) for p in directory.iterdir())


def refresh_from_logs(manifest: Manifest) -> None:
    """Final val losses as the logs say now (a reader may have been slower than the run)."""
    for rec in manifest.runs:
        log = read_run_log(manifest.log_dir, rec.run_id)
        if log is not None:
            if log.final_val_loss is not None:
                rec.final_val_loss = log.final_val_loss
            if log.finished and rec.status in ACTIVE + ("pending",):
                rec.status = "finished"


# ------------------------------------------------------------------------------------------
# Commands and summary


def dry_run_text(manifest: Manifest,
                 slurm_scripts: Callable[[list[RunRecord]], list[tuple[Path, str]]] | None = None) -> str:
    out = [f"# sweep {manifest.sweep_id}: {len(manifest.runs)} run(s), logs in {manifest.log_dir}"]
    if slurm_scripts is not None:
        out += [f"# {path}\n{text}" for path, text in slurm_scripts(manifest.runs)]
    else:
        out += [shlex.join(rec.command) for rec in manifest.runs]
    return "\n".join(out)


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def baseline_loss(runs: Sequence[RunRecord]) -> tuple[float | None, str]:
    """Mean final val loss of the finished baseline runs (marked baseline, else those with
    script train_gpt.py where other runs use another script), and what it is."""
    marked = [r for r in runs if r.baseline]
    if not marked:
        standard = [r for r in runs if Path(r.script).name == "train_gpt.py"]
        marked = standard if len(standard) < len(runs) else []  # all standard: nothing to compare against
    vals = [r.final_val_loss for r in marked if r.status == "finished" and _finite(r.final_val_loss)]
    if not vals:
        return None, ""
    tags = sorted({r.tag for r in marked})
    return sum(vals) / len(vals), f"{','.join(tags)} (n={len(vals)})"


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, float) else "-"


def summary_table(manifest: Manifest) -> str:
    runs = manifest.runs
    base, base_what = baseline_loss(runs)
    ranked = sorted(runs, key=lambda r: (0, r.final_val_loss, r.tag, r.seed) if r.status == "finished" and _finite(r.final_val_loss)
                    else (1, math.inf, r.tag, r.seed))
    header = ["#", "tag", "seed", "status", "exit", "final_val", "delta", "run_id"]
    rows = []
    for i, r in enumerate(ranked, 1):
        delta = r.final_val_loss - base if base is not None and r.status == "finished" and _finite(r.final_val_loss) else None
        status = r.status + (f" ({r.reason})" if r.reason and r.status != "finished" else "")
        rows.append([str(i), r.tag + (" *" if r.baseline else ""), str(r.seed), status[:60],
                     "-" if r.exit_code is None else str(r.exit_code), _fmt(r.final_val_loss),
                     _fmt(delta, "+.4f"), r.run_id])
    lines = [f"sweep {manifest.sweep_id}: " + ", ".join(f"{n} {s}" for s, n in _counts(runs)),
             f"baseline: {base_what} final_val {base:.4f}" if base is not None else "baseline: none finished (no delta)"]
    lines += _table(header, rows)
    by_tag: dict[str, list[float]] = {}
    for r in runs:
        if r.status == "finished" and _finite(r.final_val_loss):
            by_tag.setdefault(r.tag, []).append(r.final_val_loss)
    if any(len(v) > 1 for v in by_tag.values()):
        rows = []
        for tag, vals in sorted(by_tag.items(), key=lambda kv: (statistics.fmean(kv[1]), kv[0])):
            mean = statistics.fmean(vals)
            rows.append([tag, str(len(vals)), f"{mean:.4f}", f"{statistics.stdev(vals):.4f}" if len(vals) > 1 else "-",
                         _fmt(mean - base if base is not None else None, "+.4f")])
        lines += ["", "by tag (finished runs):"] + _table(["tag", "n", "mean", "std", "delta"], rows)
    return "\n".join(lines)


def _counts(runs: Sequence[RunRecord]) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for r in runs:
        out[r.status] = out.get(r.status, 0) + 1
    return sorted(out.items())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def exit_status(manifest: Manifest, completed: bool) -> int:
    if not completed:
        return EXIT_INTERRUPTED
    ok = all(r.status == "finished" for r in manifest.runs)
    return EXIT_OK if ok else EXIT_RUNS_FAILED
