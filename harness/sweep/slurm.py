"""Running a sweep on Slurm: one sbatch job per run, driven through Slurm's own commands
(sbatch, squeue, scontrol/sacct, scancel). Every job writes its run log to the same log_dir
as local runs, and its console output next to the manifest.

The job script runs the same trainer command as a local run. One node: `torchrun --standalone`
(or plain python for one process). Several nodes: one torchrun per node via srun, meeting at
a c10d rendezvous on the job's first node, on a port derived from the job id (two jobs that
share a head node do not collide). With --time, Slurm sends SIGTERM `signal_s` seconds before
the limit: the trainer then checkpoints and writes status:preempted, and --resume continues it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from base import UserError
from harness.sweep.local import launch_prefix, torchrun_prefix
from harness.sweep.manifest import Manifest, RunRecord, record_outcome

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "RESV_DEL_HOLD"}


@dataclass
class SlurmOptions:
    partition: str | None = None
    time: str | None = None  # Slurm's time format, e.g. 02:00:00
    nodes: int = 1
    gpus_per_node: int | None = None  # None: the run's nproc (0 on a CPU preset); 0: CPU nodes
    signal_s: int = 120
    extra: list[str] = field(default_factory=list)  # more `#SBATCH` arguments, e.g. --qos=high
    poll_s: float = 10.0
    wait: bool = True

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("partition", "time", "nodes", "gpus_per_node", "signal_s", "extra", "poll_s", "wait")}


def require_slurm() -> None:
    missing = [c for c in ("sbatch", "squeue", "scontrol", "scancel") if not shutil.which(c)]
    if missing:
        raise UserError(f"--slurm: Slurm commands not found on PATH: {', '.join(missing)}")


def job_command(rec: RunRecord, trainer_args: Sequence[str], opts: SlurmOptions, python: str) -> str:
    """The shell line(s) that start the run inside the job."""
    if opts.nodes == 1:
        return "exec " + shlex.join([*launch_prefix(rec.nproc, python), rec.script, *trainer_args])
    torchrun = [*torchrun_prefix(python), "--nnodes=$SLURM_NNODES", f"--nproc_per_node={rec.nproc}",
                "--rdzv-backend=c10d", '--rdzv-endpoint="$head:$port"', '--rdzv-id="$SLURM_JOB_ID"']
    return "\n".join([
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "port=$((20000 + SLURM_JOB_ID % 20000))",
        "exec srun --nodes=$SLURM_NNODES --ntasks-per-node=1 --kill-on-bad-exit=1 "
        + " ".join(a if "$" in a else shlex.quote(a) for a in torchrun)
        + " " + shlex.join([rec.script, *trainer_args]),
    ])


CPU_PRESETS = ("tiny",)  # presets meant for CPU: their jobs request no GPU unless told to


def default_gpus(rec: RunRecord) -> int:
    """GPUs per node when --gpus-per-node is not given: one per process, except for a run on a
    CPU preset (the sweep's preset field, else PRESET in the environment, else the default)."""
    import os

    from harness.config import Config

    preset = str(rec.fields.get("preset") or os.environ.get("PRESET") or Config.preset)
    return 0 if preset in CPU_PRESETS else rec.nproc


def sbatch_script(rec: RunRecord, trainer_args: Sequence[str], opts: SlurmOptions, repo_root: Path,
                  output: Path, python: str = sys.executable) -> str:
    gpus = default_gpus(rec) if opts.gpus_per_node is None else opts.gpus_per_node
    lines = ["#!/bin/bash", f"#SBATCH --job-name={rec.run_id[-64:]}", f"#SBATCH --output={output}",
             "#SBATCH --open-mode=append", f"#SBATCH --nodes={opts.nodes}", "#SBATCH --ntasks-per-node=1"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
        if opts.signal_s > 0:
            lines.append(f"#SBATCH --signal=B:TERM@{opts.signal_s}")
    if gpus > 0:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    lines += [f"#SBATCH {a}" for a in opts.extra]
    lines += ["set -eu", f"cd {shlex.quote(str(repo_root))}", job_command(rec, trainer_args, opts, python), ""]
    return "\n".join(lines)


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def submit(script_path: Path) -> str:
    r = _run(["sbatch", "--parsable", str(script_path)])
    if r.returncode != 0:
        raise UserError(f"sbatch {script_path}: {' '.join(r.stderr.split()) or 'exit ' + str(r.returncode)}")
    return r.stdout.strip().split(";")[0]


def queued_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Jobs still known to squeue, with their state."""
    if not job_ids:
        return {}
    r = _run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)])
    out: dict[str, str] = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def final_state(job_id: str) -> tuple[str, int | None]:
    """(state, exit code) of an ended job: scontrol while Slurm remembers it, else sacct.
    A job killed by a signal reads as -signal, like a local process."""
    r = _run(["scontrol", "show", "job", "-o", job_id])
    m_state = re.search(r"\bJobState=(\S+)", r.stdout)
    m_exit = re.search(r"\bExitCode=(\d+):(\d+)", r.stdout)
    if r.returncode != 0 or not m_state:
        if shutil.which("sacct"):
            s = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"])
            line = s.stdout.strip().splitlines()[:1]
            if s.returncode == 0 and line and "|" in line[0]:
                state, code = line[0].split("|", 1)
                m_exit = re.match(r"(\d+):(\d+)", code)
                return state.split()[0], _exit(m_exit)
        return "UNKNOWN", None
    return m_state.group(1), _exit(m_exit)


def _exit(m: re.Match | None) -> int | None:
    if not m:
        return None
    code, sig = int(m.group(1)), int(m.group(2))
    return -sig if sig else code


@dataclass
class SlurmExecutor:
    manifest: Manifest
    repo_root: Path
    opts: SlurmOptions
    python: str = sys.executable
    say: Callable[[str], None] = print
    stop_signal: int | None = None

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def script_for(self, rec: RunRecord) -> tuple[Path, str]:
        run_dir = self.manifest.run_dir
        output = (run_dir / f"{rec.run_id}.%j.out").resolve()
        args = rec.command[rec.command.index(rec.script) + 1:]
        return run_dir / f"{rec.run_id}.sbatch", sbatch_script(rec, args, self.opts, self.repo_root, output, self.python)

    def run(self, todo: list[RunRecord]) -> bool:
        require_slurm()
        self.manifest.run_dir.mkdir(parents=True, exist_ok=True)
        for rec in todo:
            if rec.status == "submitted" and rec.job_id:
                self.say(f"waiting for {rec.run_id} (job {rec.job_id}, queued earlier)")
                continue  # still queued from an earlier launch (resume): wait for it, never resubmit
            path, text = self.script_for(rec)
            path.write_text(text)
            rec.job_id = submit(path)
            rec.status, rec.started, rec.exit_code, rec.reason, rec.ended = "submitted", time.time(), None, "", None
            rec.output = str(path.parent.resolve() / f"{rec.run_id}.{rec.job_id}.out")
            self.manifest.save()
            self.say(f"submitted {rec.run_id} as job {rec.job_id}")
        if not self.opts.wait:
            return True
        return self.wait(todo)

    def wait(self, todo: list[RunRecord]) -> bool:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            pending = [r for r in todo if r.status in ("submitted", "running")]
            done, total = 0, len(pending)
            while pending:
                if self.stop_signal is not None:
                    self._cancel(pending)
                    return False
                states = queued_states([r.job_id for r in pending])
                changed = False
                for rec in list(pending):
                    state = states.get(rec.job_id)
                    if state in ACTIVE_STATES:
                        if state == "RUNNING" and rec.status != "running":
                            rec.status, changed = "running", True
                        continue
                    pending.remove(rec)
                    self._finish(rec)
                    done += 1
                    changed = True
                    val = f" final_val_loss {rec.final_val_loss:.4f}" if rec.final_val_loss is not None else ""
                    self.say(f"[{done}/{total}] {rec.status} {rec.run_id} (job {rec.job_id}){val}"
                             + (f" ({rec.reason})" if rec.reason else ""))
                if changed:
                    self.manifest.save()
                if pending:
                    self._sleep(self.opts.poll_s)
            return True
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.stop_signal is None:
            time.sleep(min(0.2, seconds))

    def _finish(self, rec: RunRecord, status: str | None = None) -> None:
        state, code = final_state(rec.job_id)
        if state.startswith("CANCELLED") and status is None:
            status = "interrupted"
        record_outcome(rec, self.manifest.log_dir, code, status)
        if rec.status == "failed" and state not in ("COMPLETED", "FAILED", "UNKNOWN"):
            rec.reason = f"slurm {state}" + (f"; {rec.reason}" if rec.reason else "")

    def _cancel(self, pending: list[RunRecord]) -> None:
        """scancel sends SIGTERM (the trainer checkpoints: status:preempted, resumable), then SIGKILL."""
        ids = [r.job_id for r in pending]
        self.say(f"{signal.Signals(self.stop_signal).name}: cancelling {len(ids)} job(s): {' '.join(ids)}")
        _run(["scancel", *ids])
        deadline = time.monotonic() + 60
        while queued_states(ids) and time.monotonic() < deadline:
            time.sleep(1)
        for rec in pending:
            self._finish(rec, "interrupted")
        self.manifest.save()
