"""Step-time overhead of the spectral diagnostics at --diag_every 10 on the tiny preset.

In one process, two fresh Trainers side by side, one without diagnostics and one with
--diag_every 10, stepped alternately (step k of one, then step k of the other, so both see the
same load on a shared machine), `--rounds` times. Each takes one untimed warm-up step (step 0:
the hidden gradients are still zero there), then times steps 1..steps, which include one
diagnostics step (step 10) per 10 steps. Prints the mean step time of each arm, the overhead in percent (goal < 10%),
and the cost of one diagnostics step.

    python bench/diag_overhead.py [--steps 10] [--rounds 2] [--every 10] [--sample 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from base import UserError, run_cli
from base.cli import ArgumentParser
from harness import dist as hdist
from harness.config import load_config
from harness.plan import resolve_plan
from harness.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def make_trainer(every: int, sample: int, log_dir: str) -> Trainer:
    cfg = load_config(["--preset", "tiny", "--diag_every", str(every), "--diag_sample", str(sample),
                       "--run_id", "bench", "--log_dir", log_dir], env={})
    info = hdist.init()
    trainer = Trainer(resolve_plan(cfg, info), info)
    trainer.setup()
    return trainer


def timed_round(every: int, sample: int, steps: int, log_dir: str) -> tuple[list[float], list[float]]:
    """Step times (s) of steps 1..steps of two fresh tiny-preset runs, one without and one with
    diagnostics, stepped alternately so that both see the same machine load."""
    off, on = make_trainer(0, 0, log_dir), make_trainer(every, sample, log_dir)
    t_off, t_on = [], []
    for step in range(steps + 1):
        for trainer, times in ((off, t_off), (on, t_on)):
            t0 = time.perf_counter()
            trainer.train_step(trainer.plan.steps[step], collect_stats=False)
            if step:
                times.append(time.perf_counter() - t0)
            if trainer.diag is not None:
                trainer.diag.take_records()
    off.loader.close()
    on.loader.close()
    return t_off, t_on


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps per arm and round (default 10)")
    parser.add_argument("--rounds", type=int, default=2, metavar="N", help="rounds of both arms (default 2)")
    parser.add_argument("--every", type=int, default=10, metavar="N", help="diag_every of the diagnostics arm (default 10)")
    parser.add_argument("--sample", type=int, default=0, metavar="N", help="diag_sample of the diagnostics arm (default 0: every Muon matrix)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < args.every:
        raise UserError(f"--steps {args.steps} must be >= --every {args.every} (one diagnostics step at least)")
    os.chdir(ROOT)  # the tiny preset's data paths are relative to the repository
    off, on, diag_steps = [], [], []
    logs = tempfile.TemporaryDirectory(prefix="diag_overhead_")  # the arms' run logs: not kept
    for r in range(args.rounds):
        t_off, t_on = timed_round(args.every, args.sample, args.steps, logs.name)
        off += t_off
        on += t_on
        due = [t for s, t in enumerate(t_on, start=1) if s % args.every == 0]
        rest = [t for s, t in enumerate(t_on, start=1) if s % args.every]
        diag_steps += [t - statistics.mean(rest) for t in due]
        print(f"round {r + 1}: off {1000 * statistics.mean(t_off):.0f} ms/step, "
              f"on {1000 * statistics.mean(t_on):.0f} ms/step", flush=True)
    m_off, m_on = statistics.mean(off), statistics.mean(on)
    print(f"tiny preset, {args.steps} timed steps x {args.rounds} rounds per arm, diag_every {args.every}, "
          f"diag_sample {args.sample or 'all'}")
    print(f"step time without diagnostics: {1000 * m_off:.0f} ms")
    print(f"step time with diagnostics:    {1000 * m_on:.0f} ms")
    print(f"overhead: {100 * (m_on / m_off - 1):+.1f}% (ratio {m_on / m_off:.3f}; goal < 10%)")
    print(f"one diagnostics step costs {1000 * statistics.mean(diag_steps):.0f} ms extra "
          f"({statistics.mean(diag_steps) / m_off:.2f} plain steps)")
    return 0


if __name__ == "__main__":
    run_cli(main)
