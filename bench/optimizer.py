"""Muon optimizer step time, ours against torch.optim.Muon, and per-rank orthogonalization work.

    python bench/optimizer.py [--repeat 5] [--shapes tiny,speedrun]

1. Ours (ShardedMuon at world size 1: Nesterov, polar express 5 steps, NorMuon, in float32 on
   CPU / bfloat16 on CUDA) against torch.optim.Muon (quintic 5 steps, bfloat16, no NorMuon) on
   the hidden matrices of the tiny and the speedrun model, same gradients; goal ratio <= 1.0.
2. The orthogonalization work one rank does at world size 2 against world size 1: the share of
   every group a rank owns (ceil(K / W) matrices of each shape) orthogonalized as one stack;
   goal ratio <= 0.55.
Both measured side by side in this process; the median of --repeat runs is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch

from base.cli import ArgumentParser
from harness.config import load_config
from harness.dist import DistInfo
from harness.malloc import keep_freed_memory
from harness.model import GPT, ModelShape
from harness.optim import Optimizers, ns_dtype
from kernels import orthogonalize


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def muon_params(preset: str, device: torch.device):
    cfg = load_config(["--preset", preset], env={})
    with torch.device("meta"):
        model = GPT(ModelShape.from_config(cfg))
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return cfg, model


def bench_step(preset: str, device: torch.device, repeat: int) -> None:
    cfg, model = muon_params(preset, device)
    info = DistInfo(0, 1, 0, device, None)
    ours = Optimizers(model, cfg, info).muon
    refs = [r for g in ours.groups for r in g.refs]
    mats = [r.weight() for r in refs]
    grads = [torch.randn_like(m) for m in mats]
    for r in refs:  # the same gradients for both optimizers
        if r.param.grad is None:
            r.param.grad = torch.zeros_like(r.param)
    for r, grad in zip(refs, grads):
        r.grad().copy_(grad)

    theirs_params = [torch.nn.Parameter(m.detach().clone()) for m in mats]
    for p, g in zip(theirs_params, grads):
        p.grad = g
    theirs = torch.optim.Muon(theirs_params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_ref = median_time(lambda: (theirs.step(), sync()), repeat)
    print(f"{preset:9s} {len(mats):3d} matrices  torch.optim.Muon (quintic, bfloat16) {t_ref * 1e3:9.1f} ms")
    for dtype in dict.fromkeys([ns_dtype(cfg, device), torch.bfloat16]):
        ours.rule = dataclasses.replace(ours.rule, ns_dtype=dtype)
        t_ours = median_time(lambda: (ours.step(1.0, 0.95), sync()), repeat)
        print(f"{preset:9s}   ours (polar express, NorMuon, {dtype}) {t_ours * 1e3:9.1f} ms"
              f"  ratio {t_ours / t_ref:5.2f}  (goal <= 1.0)")


def bench_sharding(preset: str, device: torch.device, repeat: int) -> None:
    cfg, model = muon_params(preset, device)
    groups = Optimizers(model, cfg, DistInfo(0, 1, 0, device, None)).muon.groups
    dtype = ns_dtype(cfg, device)
    times = {}
    for world in (1, 2):
        stacks = [torch.randn(math.ceil(len(g.refs) / world), *g.shape, device=device) for g in groups]
        times[world] = median_time(lambda: [orthogonalize(s, dtype=dtype) for s in stacks], repeat)
    print(f"{preset:9s} per-rank orthogonalization: world 1 {times[1] * 1e3:9.1f} ms, world 2 {times[2] * 1e3:9.1f} ms"
          f"  ratio {times[2] / times[1]:5.2f}  (goal <= 0.55)")


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, metavar="N", help="timed runs; the median is printed (default 5)")
    ap.add_argument("--shapes", default="tiny,speedrun", help="comma-separated model presets (default tiny,speedrun)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        keep_freed_memory()
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for preset in args.shapes.split(","):
        bench_step(preset, device, args.repeat)
        bench_sharding(preset, device, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
