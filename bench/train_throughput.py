"""Tiny-preset training throughput on CPU at 1 and 2 ranks on GPT-2's vocabulary, and at 1 rank with
the compact vocabulary (the preset's default), in real train_gpt.py runs.

    python bench/train_throughput.py [--steps 12]

Each run trains the tiny preset's first stage (batch 2048 tokens) for --steps steps with no
validation except the compulsory first and last; tokens/s = tokens per step / step_avg, where
step_avg excludes the first two steps (warm-up). Prints both and the ratio 2 ranks / 1 rank, then
1 rank with the compact vocabulary (the local corpus's ids renumbered: a smaller head) and its
ratio to the GPT-2 vocabulary at 1 rank.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from base.cli import ArgumentParser
from harness.logs.format import read_log

ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, steps: int, out: Path, name: str, *extra: str) -> float:
    py = Path(sys.executable)
    cmd = [str(py), "train_gpt.py"] if nproc == 1 else \
        [str(py.parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py"]
    run_id = f"bench_{name}"
    cmd += [*extra, "--preset", "tiny", "--run_id", run_id, "--log_dir", str(out), "--val_loss_every", "0",
            "--val_tokens", "4096", "--num_scheduled_iterations", str(steps), "--num_extension_iterations", "0",
            "--batch_sizes", "2048,2048,2048,2048"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(2 // nproc or 1)})
    log = read_log(out / f"{run_id}.txt")
    t = {r.step: r.train_time_ms for r in log.train_steps}
    per_step_ms = (t[steps] - t[2]) / (steps - 2)
    return 2048 / (per_step_ms / 1000)


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, metavar="N", help="training steps per run (default 12)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        # GPT-2's vocabulary (the preset's default is the compact one): the figure earlier runs recorded
        r1 = run(1, args.steps, Path(tmp), "gpt2_1", "--compact_vocab", "0")
        r2 = run(2, args.steps, Path(tmp), "gpt2_2", "--compact_vocab", "0")
        rc = run(1, args.steps, Path(tmp), "compact_1", "--compact_vocab", "1")
    print(f"tiny preset, CPU: 1 rank {r1:8.0f} tokens/s, 2 ranks {r2:8.0f} tokens/s, ratio {r2 / r1:.2f}")
    print(f"tiny preset, CPU, 1 rank: compact vocabulary {rc:8.0f} tokens/s, ratio to GPT-2's {rc / r1:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
