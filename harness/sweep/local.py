"""Running a sweep's runs on this machine: sequentially, K at once on CPU (`--parallel K`), or
packed onto disjoint GPU sets when a run needs fewer GPUs than the node has.

Each run is its own process group (start_new_session), so a signal reaches the run and not
the launcher's terminal. torchrun puts its workers in sessions of their own, and they outlive a
SIGKILLed torchrun: every run's environment carries a mark, and when a run ends the launcher
SIGKILLs whatever still carries it.
Concurrent torchrun runs use `--standalone`: its c10d store binds port 0, so the kernel hands
each run its own free port (no port list to manage, no race between picking and binding).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from base import UserError
from harness.sweep.manifest import Manifest, RunRecord, record_outcome

POLL_S = 0.2
GRACE_S = 20.0


# ------------------------------------------------------------------------------------------
# Commands


def torchrun_prefix(python: str) -> list[str]:
    """The torchrun next to this Python, else the same module run by it."""
    exe = Path(python).parent / "torchrun"
    return [str(exe)] if exe.is_file() else [python, "-m", "torch.distributed.run"]


def launch_prefix(nproc: int, python: str = sys.executable, use_torchrun: str = "auto") -> list[str]:
    """`python` for one process on auto, else `torchrun --standalone --nproc_per_node=N`."""
    if nproc == 1 and use_torchrun == "auto":
        return [python]
    return [*torchrun_prefix(python), "--standalone", f"--nproc_per_node={nproc}"]


# ------------------------------------------------------------------------------------------
# GPUs


def detect_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this launcher may use: CUDA_VISIBLE_DEVICES where set, else nvidia-smi's list."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        r = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [l.strip() for l in r.stdout.splitlines() if l.strip()] if r.returncode == 0 else []


def pick_gpus(free: Sequence[str], all_gpus: Sequence[str], n: int) -> list[str] | None:
    """n GPUs out of `free`: an aligned block of n first (GPUs 0-3 or 4-7 for n=4: on usual
    nodes those share a switch), then any contiguous block, then the lowest free ones."""
    if n > len(free):
        return None
    free_set = set(free)
    for start in range(0, len(all_gpus) - n + 1, n):
        block = list(all_gpus[start:start + n])
        if all(g in free_set for g in block):
            return block
    for start in range(len(all_gpus) - n + 1):
        block = list(all_gpus[start:start + n])
        if all(g in free_set for g in block):
            return block
    return [g for g in all_gpus if g in free_set][:n]


def plan_starts(
    queue: Sequence[tuple[str, int]],
    free: Sequence[str],
    all_gpus: Sequence[str],
    running: int,
    parallel: int | None,
) -> list[tuple[str, list[str] | None]]:
    """Which queued runs (key, nproc) start now, in queue order (first fit), and on which GPUs.
    Without GPUs only `parallel` limits concurrency; with GPUs each run needs nproc free GPUs."""
    starts: list[tuple[str, list[str] | None]] = []
    free = list(free)
    for key, nproc in queue:
        if parallel is not None and running + len(starts) >= parallel:
            break
        if not all_gpus:
            starts.append((key, None))
            continue
        gpus = pick_gpus(free, all_gpus, nproc)
        if gpus is None:
            continue  # a smaller run further back may still fit
        free = [g for g in free if g not in gpus]
        starts.append((key, gpus))
    return starts


# ------------------------------------------------------------------------------------------
# The executor


@dataclass
class _Live:
    rec: RunRecord
    proc: subprocess.Popen
    out: object
    t0: float


def cpu_threads_per_run(parallel: int, nproc: int, cpus: int | None = None) -> int:
    """Intra-op threads for each process of a CPU run when `parallel` runs of `nproc` processes
    share the machine's `cpus` (default: the cores this process may use); at least 1."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, parallel * nproc))


@dataclass
class LocalExecutor:
    manifest: Manifest
    repo_root: Path
    parallel: int | None = 1  # None: as many as the GPUs allow
    gpus: list[str] = field(default_factory=list)
    grace_s: float = GRACE_S
    env: Mapping[str, str] | None = None
    say: Callable[[str], None] = print
    stop_signal: int | None = None  # set by the signal handler
    force: bool = False

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:
            self.force = True  # a second Ctrl-C: no more grace
        self.stop_signal = signum

    def check(self, todo: list[RunRecord]) -> None:
        """Refuse, before anything starts, a run that needs more GPUs than the node has."""
        too_big = [r for r in todo if self.gpus and r.nproc > len(self.gpus)]
        if too_big:
            raise UserError(f"run {too_big[0].tag} needs {too_big[0].nproc} GPUs; this node has {len(self.gpus)}"
                            f" ({','.join(self.gpus)}; see --gpus, or --slurm)")

    def run(self, todo: list[RunRecord]) -> bool:
        """Run `todo`; returns False when stopped by a signal."""
        self.check(todo)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.manifest.launcher_pid = os.getpid()
        try:
            return self._loop(todo)
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _loop(self, todo: list[RunRecord]) -> bool:
        queue = list(todo)
        live: dict[str, _Live] = {}
        total = len(todo)
        done = 0
        while queue or live:
            if self.stop_signal is not None:
                self._stop_all(live)
                return False
            busy = {g for l in live.values() for g in (l.rec.gpus or [])}
            free = [g for g in self.gpus if g not in busy]
            starts = plan_starts([(r.key, r.nproc) for r in queue], free, self.gpus, len(live), self.parallel)
            for key, gpus in starts:
                rec = next(r for r in queue if r.key == key)
                queue.remove(rec)
                live[key] = self._start(rec, gpus)
                self.say(f"[{done + len(live)}/{total}] start {rec.run_id} (pid {rec.pid}"
                         + (f", GPUs {','.join(gpus)}" if gpus else "") + ")")
            if starts:
                self.manifest.save()
            time.sleep(POLL_S)
            for key in list(live):
                l = live[key]
                code = l.proc.poll()
                if code is None:
                    continue
                del live[key]
                self._finish(l, code)
                done += 1
                self._report(l, done, total)
        return True

    def _start(self, rec: RunRecord, gpus: list[str] | None) -> _Live:
        self.manifest.run_dir.mkdir(parents=True, exist_ok=True)
        rec.output = str(self.manifest.run_dir / f"{rec.run_id}.out")
        env = dict(os.environ if self.env is None else self.env)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        elif "OMP_NUM_THREADS" not in env:
            # CPU runs side by side: each would take every core and they would thrash
            env["OMP_NUM_THREADS"] = str(cpu_threads_per_run(self.parallel or 1, rec.nproc))
        env[MARK_VAR] = self._token(rec)
        out = open(rec.output, "ab")
        proc = subprocess.Popen(rec.command, cwd=self.repo_root, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        rec.status, rec.pid, rec.gpus, rec.started = "running", proc.pid, gpus, time.time()
        rec.exit_code, rec.reason, rec.ended = None, "", None
        return _Live(rec, proc, out, time.monotonic())

    def _token(self, rec: RunRecord) -> str:
        return f"{self.manifest.sweep_id}/{rec.run_id}"

    def _finish(self, l: _Live, code: int, status: str | None = None) -> None:
        kill_run_tree(l.proc.pid, self._token(l.rec))  # whatever the run left behind (orphaned workers)
        l.out.close()
        record_outcome(l.rec, self.manifest.log_dir, code, status)
        self.manifest.save()

    def _report(self, l: _Live, done: int, total: int) -> None:
        rec = l.rec
        val = f" final_val_loss {rec.final_val_loss:.4f}" if rec.final_val_loss is not None else ""
        why = f" ({rec.reason})" if rec.reason else ""
        self.say(f"[{done}/{total}] {rec.status} {rec.run_id}{val} exit {rec.exit_code} "
                 f"in {time.monotonic() - l.t0:.0f}s{why}")

    def _stop_all(self, live: dict[str, _Live]) -> None:
        """Pass the signal to every run's process group, give them `grace_s` to write their
        status line and exit, then SIGKILL what is left. All are marked interrupted (unless
        they finished, diverged or saved a pre-emption checkpoint meanwhile)."""
        sig = self.stop_signal or signal.SIGINT
        if live:
            self.say(f"{signal.Signals(sig).name}: stopping {len(live)} run(s) (grace {self.grace_s:.0f}s; again to kill now)")
        for l in live.values():
            _killpg(l.proc.pid, sig)
        deadline = time.monotonic() + self.grace_s
        while any(l.proc.poll() is None for l in live.values()) and time.monotonic() < deadline and not self.force:
            time.sleep(POLL_S)
        for l in live.values():
            if l.proc.poll() is None:
                kill_run_tree(l.proc.pid, self._token(l.rec))
                l.proc.wait()
            self._finish(l, l.proc.returncode, status="interrupted")
            self.say(f"{l.rec.status} {l.rec.run_id} exit {l.rec.exit_code}")
        live.clear()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


MARK_VAR = "LAUNCH_LR_SWEEP_RUN"  # set in each run's environment; every descendant inherits it


def marked_processes(token: str) -> list[int]:
    """Processes whose environment carries MARK_VAR=token: a run's whole tree, including
    workers that torchrun started in sessions of their own and that outlived it (Linux /proc;
    elsewhere an empty list, and only the process group is reached)."""
    needle = b"\0" + f"{MARK_VAR}={token}".encode() + b"\0"
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in b"\0" + f.read() + b"\0":
                    out.append(int(name))
        except OSError:
            pass
    return out


def kill_run_tree(pgid: int, token: str) -> None:
    _killpg(pgid, signal.SIGKILL)
    for pid in marked_processes(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
