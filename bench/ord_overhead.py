"""Step-time overhead of ORD on the tiny preset on CPU (goal < 3%).

    python bench/ord_overhead.py [--steps 6] [--rounds 3]

One process, one model shape, random tokens: full training steps (forward, backward, NorMuon
+ Adam) with the standard update and with the fork's ORD (spectral_lr_mul 0.1), alternating in rounds so
drift of the machine hits both alike; prints the median step time of each and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from base.cli import ArgumentParser
from harness.config import load_config
from harness.dist import DistInfo
from harness.malloc import keep_freed_memory
from harness.model import GPT, ModelShape
from harness.optim import Optimizers


def make(overrides: dict):
    cfg = load_config([], env={}, overrides=overrides)
    torch.manual_seed(0)
    model = GPT(ModelShape.from_config(cfg))
    opt = Optimizers(model, cfg, DistInfo(0, 1, 0, torch.device("cpu"), None))
    return cfg, model, opt


def step_times(cfg, model, opt, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (cfg.device_batch_tokens // cfg.seq_len, cfg.seq_len), generator=g)
    out = []
    for step in range(steps):
        t0 = time.perf_counter()
        model(x, x).backward()
        opt.step(step, 1.0, 0.95, unit_scale=cfg.device_batch_tokens / 4)
        opt.zero_grad()
        out.append(time.perf_counter() - t0)
    return out


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, metavar="N", help="timed steps per arm and round (default 6)")
    ap.add_argument("--rounds", type=int, default=3, metavar="N", help="alternating rounds (default 3)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    variants = {"standard": make({"ord": False}), "ord(0.1)": make({"ord": True, "spectral_lr_mul": 0.1})}
    times = {k: [] for k in variants}
    for name, v in variants.items():
        step_times(*v, 1)  # warm-up
    for _ in range(args.rounds):
        for name, v in variants.items():
            times[name] += step_times(*v, args.steps)
    med = {k: statistics.median(t) for k, t in times.items()}
    for k, m in med.items():
        print(f"{k:10s} median step {m * 1e3:8.1f} ms over {len(times[k])} steps")
    print(f"ORD overhead: ratio {med['ord(0.1)'] / med['standard']:.3f} (goal < 1.03)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
