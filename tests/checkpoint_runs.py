"""Helpers of the checkpoint tests: real train_gpt.py runs (python or torchrun) at a size where
a step takes well under a second on CPU, started in their own process group so a test can
kill them like a scheduler would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# the micro preset (harness/config.py): GPT-2's vocabulary, everything else as small as it goes
TINY = ["--preset", "micro"]
TOTAL = PRESETS["micro"]["num_scheduled_iterations"]  # 30 steps, validation every 10


def command(tmp: Path, run_id: str, *extra: str, nproc: int = 1) -> list[str]:
    launcher = [str(BIN / "python")]
    if nproc > 1:
        launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + [
        str(ROOT / "train_gpt.py"), *TINY, "--run_id", run_id,
        "--log_dir", str(tmp / "logs"), "--checkpoint_dir", str(tmp / "ckpt"), *extra,
    ]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RUN_ID", "RESUME")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def start(tmp: Path, run_id: str, *extra: str, nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(command(tmp, run_id, *extra, nproc=nproc), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run(tmp: Path, run_id: str, *extra: str, nproc: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command(tmp, run_id, *extra, nproc=nproc), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before the awaited moment:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill_job(proc)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc): torchrun starts its workers in sessions of their
    own, so killing its process group would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its workers at once, as a node failure or scancel would."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def log_has_line(path: Path, prefix: str) -> bool:
    try:
        return any(line.startswith(prefix) for line in path.read_text().splitlines())
    except FileNotFoundError:
        return False
