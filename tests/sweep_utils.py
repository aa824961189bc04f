"""Helpers of the sweep launcher tests: the launcher command, a tiny model's --set flags, the
manifest, and waiting for runs to reach a step."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from harness.logs.format import log_path, read_log

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, str(ROOT / "launch_lr_sweep.py")]
TINY = ["num_layers=1", "model_dim=32", "num_heads=2", "seq_len=32", "batch_sizes=64,64,64,64",
        "device_batch_tokens=64", "val_tokens=64", "num_extension_iterations=0", "val_loss_every=0"]


def tiny_sets(steps: int) -> list[str]:
    out = []
    for s in TINY + [f"num_scheduled_iterations={steps}"]:
        out += ["--set", s]
    return out


def manifest_doc(log_dir: Path) -> dict:
    (path,) = (log_dir / "sweeps").glob("*.json")
    return json.loads(path.read_text())


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def held_env(tmp_path: Path, step: int) -> tuple[dict, Path]:
    """The environment for a launcher whose runs wait after logging training step `step` until
    the returned marker file exists or they get SIGTERM (harness.preemption.hold_for_test):
    a signal sent while a run holds there lands mid-run by construction, however fast the run."""
    marker = tmp_path / "release"
    return {**os.environ, "HARNESS_TEST_HOLD": f"{step}:{marker}"}, marker


def running_with_steps(logs: Path, n: int, at_step: int = 1):
    try:
        doc = manifest_doc(logs)
    except (ValueError, FileNotFoundError):
        return None
    out = []
    for x in doc["runs"]:
        p = log_path(logs, x["run_id"])
        if x["status"] == "running" and p.exists() and (ts := read_log(p).train_steps) and ts[-1].step >= at_step:
            out.append(x)
    return out if len(out) >= n else None
