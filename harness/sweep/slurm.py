"""Running a sweep on Slurm: one sbatch job per run, or with --array one job array for all of
them, driven through Slurm's own commands (sbatch, squeue, scontrol/sacct, scancel). Every job
writes its run log to the same log_dir as local runs, and its console output next to the manifest.

--array: one `sbatch --array=0-(N-1)%K` script; task i reads run i's command from
`<run_id>.sh` next to the manifest; the manifest records each run's job as `<jobid>_<task>`.
--requeue: the job runs the trainer as a child and forwards SIGTERM to it; when the run's log
then ends in status:preempted the job requeues itself (`scontrol requeue`), and the requeued
job (SLURM_RESTART_COUNT > 0) continues from the run's latest checkpoint (`--resume latest`).

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

from base import UserError, atomic_write
from harness.logs.format import log_path
from harness.sweep.launch import run_checkpoint_dir
from harness.sweep.local import launch_prefix, torchrun_prefix
from harness.sweep.manifest import Manifest, RunRecord, record_outcome

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "RESV_DEL_HOLD"}
REQUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


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
    array: bool = False  # one job array for the runs instead of one job each
    array_parallel: int | None = None  # array tasks running at once (None: as many as Slurm allows)
    requeue: bool = False  # a pre-empted job requeues itself and resumes from its checkpoint

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("partition", "time", "nodes", "gpus_per_node", "signal_s", "extra", "poll_s",
                                              "wait", "array", "array_parallel", "requeue")}


def require_slurm() -> None:
    missing = [c for c in ("sbatch", "squeue", "scontrol", "scancel") if not shutil.which(c)]
    if missing:
        raise UserError(f"--slurm: Slurm commands not found on PATH: {', '.join(missing)}")


def job_command(rec: RunRecord, trainer_args: Sequence[str], opts: SlurmOptions, python: str,
                start: str = "exec ", tail: str = "") -> str:
    """The shell line(s) that start the run inside the job: `start` before the launcher, `tail`
    (raw shell words) after the trainer's arguments."""
    if opts.nodes == 1:
        return start + shlex.join([*launch_prefix(rec.nproc, python), rec.script, *trainer_args]) + tail
    torchrun = [*torchrun_prefix(python), "--nnodes=$SLURM_NNODES", f"--nproc_per_node={rec.nproc}",
                "--rdzv-backend=c10d", '--rdzv-endpoint="$head:$port"', '--rdzv-id="$SLURM_JOB_ID"']
    return "\n".join([
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "port=$((20000 + SLURM_JOB_ID % 20000))",
        start + "srun --nodes=$SLURM_NNODES --ntasks-per-node=1 --kill-on-bad-exit=1 "
        + " ".join(a if "$" in a else shlex.quote(a) for a in torchrun)
        + " " + shlex.join([rec.script, *trainer_args]) + tail,
    ])


def requeue_body(rec: RunRecord, trainer_args: Sequence[str], opts: SlurmOptions, python: str,
                 log_file: str, checkpoint_dir: str) -> list[str]:
    """The run as a child of the job's shell, which forwards SIGTERM to it (the trainer then
    checkpoints and logs status:preempted) and, when the log ends pre-empted while the job is
    still RUNNING (a time limit's signal, `scancel --signal=TERM --batch`; not a cancelled job),
    requeues the job. The requeued job resumes from the latest checkpoint of the run."""
    ckpt, log = shlex.quote(checkpoint_dir), shlex.quote(log_file)
    lines = []
    tail = ""
    if "--resume" not in trainer_args:  # (a resumed sweep's command names its checkpoint already)
        tail = ' ${resume[@]+"${resume[@]}"}'
        lines += [
            "resume=()",
            f"if [ \"${{SLURM_RESTART_COUNT:-0}}\" -gt 0 ] && ls {ckpt} 2>/dev/null | grep -q '^step_[0-9]*\\.pt$'; then",
            "  resume=(--resume latest)",
            f"  echo \"requeued (restart $SLURM_RESTART_COUNT): resuming from the latest checkpoint in \"{ckpt}",
            "fi",
        ]
    lines += [
        "child=",
        "trap '[ -z \"$child\" ] || kill -TERM \"$child\" 2>/dev/null' TERM",
        job_command(rec, trainer_args, opts, python, start="", tail=tail + " &"),
        "child=$!",
        "code=0",
        "while :; do",
        '  wait "$child" && code=0 || code=$?',
        '  kill -0 "$child" 2>/dev/null || break  # (a trapped signal ends the wait, not the run)',
        "done",
        f"last=$(grep '^status:' {log} 2>/dev/null | tail -n 1 | cut -d' ' -f1)",
        "state=$(scontrol show job -o \"$SLURM_JOB_ID\" | grep -o 'JobState=[A-Z_]*' || true)",
        'if [ "$last" = status:preempted ] && [ "$state" = JobState=RUNNING ]; then',
        '  echo "pre-empted: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$code"',
    ]
    return lines


def run_body(rec: RunRecord, trainer_args: Sequence[str], opts: SlurmOptions, python: str,
             log_file: str = "", checkpoint_dir: str = "") -> list[str]:
    """What a job (or an array task) runs for one run, in the repository root."""
    if not opts.requeue:
        return [job_command(rec, trainer_args, opts, python)]
    if not (log_file and checkpoint_dir):
        raise ValueError("--requeue: the job script needs the run's log file and checkpoint directory")
    return requeue_body(rec, trainer_args, opts, python, log_file, checkpoint_dir)


CPU_PRESETS = ("tiny", "classic", "micro")  # presets meant for CPU: their jobs request no GPU unless told to


def default_gpus(rec: RunRecord) -> int:
    """GPUs per node when --gpus_per_node is not given: one per process, except for a run on a
    CPU preset (the sweep's preset field, else PRESET in the environment, else the default)."""
    import os

    from harness.config import Config

    preset = str(rec.fields.get("preset") or os.environ.get("PRESET") or Config.preset)
    return 0 if preset in CPU_PRESETS else rec.nproc


def gpus_for(rec: RunRecord, opts: SlurmOptions) -> int:
    return default_gpus(rec) if opts.gpus_per_node is None else opts.gpus_per_node


def sbatch_header(job_name: str, output: Path, opts: SlurmOptions, gpus: int, array: str = "") -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name[-64:]}", f"#SBATCH --output={output}",
             "#SBATCH --open-mode=append", f"#SBATCH --nodes={opts.nodes}", "#SBATCH --ntasks-per-node=1"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
        if opts.signal_s > 0:  # B: the job's shell gets it (with --requeue it forwards it to the run)
            lines.append(f"#SBATCH --signal=B:TERM@{opts.signal_s}")
    if opts.requeue:
        lines.append("#SBATCH --requeue")
    if gpus > 0:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    lines += [f"#SBATCH {a}" for a in opts.extra]
    return lines


def sbatch_script(rec: RunRecord, trainer_args: Sequence[str], opts: SlurmOptions, repo_root: Path,
                  output: Path, python: str = sys.executable, log_file: str = "", checkpoint_dir: str = "") -> str:
    lines = sbatch_header(rec.run_id, output, opts, gpus_for(rec, opts))
    lines += ["set -eu", f"cd {shlex.quote(str(repo_root))}",
              *run_body(rec, trainer_args, opts, python, log_file, checkpoint_dir), ""]
    return "\n".join(lines)


def task_script(body: list[str], repo_root: Path) -> str:
    """An array task's command file: what the task runs for its run."""
    return "\n".join(["#!/bin/bash", "set -eu", f"cd {shlex.quote(str(repo_root))}", *body, ""])


def array_spec(n: int, parallel: int | None) -> str:
    return f"0-{n - 1}" + (f"%{parallel}" if parallel else "")


def array_script(job_name: str, run_ids: Sequence[str], run_dir: Path, opts: SlurmOptions, gpus: int) -> str:
    """One job array: task i runs `<run_dir>/<run_ids[i]>.sh`, its console output going to
    `<run_dir>/<run_id>.<jobid>_<task>.out` (`array.<jobid>_<task>.out` until it knows its run)."""
    d = shlex.quote(str(run_dir.resolve()))
    lines = sbatch_header(job_name, run_dir.resolve() / "array.%A_%a.out", opts, gpus,
                          array_spec(len(run_ids), opts.array_parallel))
    lines += [
        "set -eu",
        "runs=(" + " ".join(shlex.quote(r) for r in run_ids) + ")",
        'run_id=${runs[$SLURM_ARRAY_TASK_ID]}',
        f'exec >>{d}/"$run_id.${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}.out" 2>&1',
        f'exec bash {d}/"$run_id.sh"',
        "",
    ]
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
    # -r: one line per array task (`123_4`), pending ones too (not `123_[4-7]`)
    r = _run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids)])
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

    def _args(self, rec: RunRecord) -> list[str]:
        return rec.command[rec.command.index(rec.script) + 1:]

    def _run_files(self, rec: RunRecord) -> dict[str, str]:
        """The run's log file and checkpoint directory, which a --requeue job script reads."""
        if not self.opts.requeue:
            return {}
        ckpt = run_checkpoint_dir(rec, self.manifest.log_dir)
        if ckpt is None:
            raise UserError(f"--requeue: run {rec.run_id}: its config does not resolve (no checkpoint directory)")
        return {"log_file": str(log_path(self.manifest.log_dir, rec.run_id)), "checkpoint_dir": str(ckpt)}

    def script_for(self, rec: RunRecord) -> tuple[Path, str]:
        """One run's own sbatch script."""
        run_dir = self.manifest.run_dir
        output = (run_dir / f"{rec.run_id}.%j.out").resolve()
        return run_dir / f"{rec.run_id}.sbatch", sbatch_script(rec, self._args(rec), self.opts, self.repo_root, output,
                                                               self.python, **self._run_files(rec))

    def array_groups(self, recs: list[RunRecord]) -> list[list[RunRecord]]:
        """Runs that can share one array: the same GPUs per node (usually all of them)."""
        groups: dict[int, list[RunRecord]] = {}
        for rec in recs:
            groups.setdefault(gpus_for(rec, self.opts), []).append(rec)
        return list(groups.values())

    def _array_path(self, offset: int = 0) -> Path:
        n = len(list(self.manifest.run_dir.glob("array-*.sbatch"))) + 1 + offset
        return self.manifest.run_dir / f"array-{n}.sbatch"

    def array_files(self, group: list[RunRecord], offset: int = 0) -> list[tuple[Path, str]]:
        """The array's sbatch script, then each task's command file `<run_id>.sh`."""
        run_dir = self.manifest.run_dir
        script = array_script(self.manifest.sweep_id, [r.run_id for r in group], run_dir, self.opts,
                              gpus_for(group[0], self.opts))
        return [(self._array_path(offset), script)] + \
            [(run_dir / f"{r.run_id}.sh", task_script(run_body(r, self._args(r), self.opts, self.python, **self._run_files(r)),
                                                         self.repo_root)) for r in group]

    def scripts_for(self, recs: list[RunRecord]) -> list[tuple[Path, str]]:
        """Every file a submission of these runs writes (for --dry_run)."""
        if not self.opts.array:
            return [self.script_for(r) for r in recs]
        return [f for i, g in enumerate(self.array_groups(recs)) for f in self.array_files(g, i)]

    def run(self, todo: list[RunRecord]) -> bool:
        require_slurm()
        self.manifest.run_dir.mkdir(parents=True, exist_ok=True)
        new = []
        for rec in todo:
            if rec.status == "submitted" and rec.job_id:
                self.say(f"waiting for {rec.run_id} (job {rec.job_id}, queued earlier)")
                continue  # still queued from an earlier launch (resume): wait for it, never resubmit
            new.append(rec)
        if self.opts.array:
            for group in self.array_groups(new):
                self._submit_array(group)
        else:
            for rec in new:
                self._submit_one(rec)
        if not self.opts.wait:
            return True
        return self.wait(todo)

    def _submitted(self, rec: RunRecord, job_id: str, output: Path) -> None:
        rec.job_id = job_id
        rec.status, rec.started, rec.exit_code, rec.reason, rec.ended = "submitted", time.time(), None, "", None
        rec.output = str(output)

    def _submit_one(self, rec: RunRecord) -> None:
        path, text = self.script_for(rec)
        atomic_write(path, text)
        job_id = submit(path)
        self._submitted(rec, job_id, path.parent.resolve() / f"{rec.run_id}.{job_id}.out")
        self.manifest.save()
        self.say(f"submitted {rec.run_id} as job {job_id}")

    def _submit_array(self, group: list[RunRecord]) -> None:
        files = self.array_files(group)
        for path, text in files[1:] + files[:1]:  # the command files before the script that reads them
            atomic_write(path, text)
        job_id = submit(files[0][0])
        for task, rec in enumerate(group):
            self._submitted(rec, f"{job_id}_{task}", self.manifest.run_dir.resolve() / f"{rec.run_id}.{job_id}_{task}.out")
        self.manifest.save()
        self.say(f"submitted {len(group)} run(s) as job array {job_id} ({files[0][0].name}, tasks 0-{len(group) - 1})")

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
                        elif state in REQUEUED_STATES and rec.status == "running":
                            rec.status, changed = "submitted", True  # requeued (pre-empted): queued again
                            self.say(f"requeued {rec.run_id} (job {rec.job_id})")
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
