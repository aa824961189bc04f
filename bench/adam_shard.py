"""Sharded Adam (ZeRO-1, harness/optim.py LabelledAdam) against the path before it (every rank
all-reduces every Adam gradient and updates every parameter), measured side by side in this
process at --ranks gloo ranks (CPU) or NCCL (CUDA) on a preset's shapes: the time of a whole
Optimizers step (Muon + Adam, on an Adam step), of Adam alone (launch + update), and the Adam
state a rank holds. Goal: Adam ratio <= 1.0, state 1 / ranks.

    python bench/adam_shard.py [--preset tiny] [--ranks 2] [--repeat 20]

Started plainly, it starts itself under torchrun with --ranks processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from base.cli import ArgumentParser
from base import run_cli
from harness import dist as hdist
from harness.config import load_config
from harness.malloc import keep_freed_memory
from harness.model import GPT, ModelShape
from harness.optim import LabelledAdam, Optimizers


class AllReducedAdam(LabelledAdam):
    """The unsharded path: the whole state on every rank (built as world size 1), every gradient
    all-reduced (mean) in one flat buffer, every parameter updated by every rank."""

    def launch_reduce(self) -> None:
        entries = self._active()  # (untied here: the tiny model has no split step)
        flat = torch.cat([(e.param.grad if e.param.grad is not None else torch.zeros_like(e.param)).reshape(-1).float()
                          for e in entries])
        wait, done = hdist.all_reduce_mean_async(flat), []

        def reduced() -> torch.Tensor:
            if not done:
                done.append(wait())
            return flat

        views = torch.split(flat, [e.param.numel() for e in entries])
        self._pending = [(e, (lambda v=v, e=e: (reduced(), v.view(e.exp_avg.shape))[1])) for e, v in zip(entries, views)]


def build(preset: str, info: hdist.DistInfo, sharded: bool) -> Optimizers:
    cfg = load_config(["--preset", preset], env={})
    torch.manual_seed(0)
    with torch.device(info.device):
        model = GPT(ModelShape.from_config(cfg))
    opt = Optimizers(model, cfg, info)
    if not sharded:
        one = hdist.DistInfo(0, 1, 0, info.device, None)
        opt.adam = AllReducedAdam([(e.name, e.label, e.param) for e in opt.adam.entries], cfg, None, one)
    return opt


def set_grads(opt: Optimizers, rank: int) -> None:
    """A different gradient on every rank (the reduction has something to average)."""
    g = torch.Generator().manual_seed(rank)
    for p in opt.model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    hdist.barrier()


def slowest(seconds: float, device: torch.device) -> float:
    """The slowest rank's time: the step is as slow as its slowest rank."""
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_once(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return slowest(time.perf_counter() - t0, device)


def bench(preset: str, info: hdist.DistInfo, repeat: int) -> dict[str, dict[str, float]]:
    opts = {"sharded": build(preset, info, True), "all-reduced": build(preset, info, False)}
    for opt in opts.values():
        set_grads(opt, info.rank)
    times: dict[str, dict[str, list[float]]] = {k: {"step": [], "adam": []} for k in opts}

    def whole(opt):
        return lambda: opt.step(1, 1.0, 0.95)  # step 1: an Adam step

    def adam_only(opt):
        return lambda: (opt.adam.launch_reduce(), opt.adam.step(1, 1.0))

    for i in range(repeat + 1):  # the first round warms up
        for name in (("sharded", "all-reduced") if i % 2 else ("all-reduced", "sharded")):
            opt = opts[name]
            for what, fn in (("step", whole(opt)), ("adam", adam_only(opt))):
                t = time_once(fn, info.device)
                if i:
                    times[name][what].append(t)
    out = {}
    for name, opt in opts.items():
        state = sum(t.numel() * t.element_size() for e in opt.adam.entries for t in (e.exp_avg, e.exp_avg_sq))
        out[name] = {k: statistics.median(v) for k, v in times[name].items()} | {"state": state}
    return out


def run_ranks(args) -> None:
    info = hdist.init()
    try:
        r = bench(args.preset, info, args.repeat)
        if info.is_main:
            s, a = r["sharded"], r["all-reduced"]
            print(f"torch {torch.__version__}, {info.world_size} ranks ({info.backend}), preset {args.preset},"
                  f" threads/rank {torch.get_num_threads()}; median of {args.repeat}, slowest rank")
            print(f"{'':14} {'step ms':>9} {'adam ms':>9} {'adam state/rank MB':>19}")
            for name, x in r.items():
                print(f"{name:14} {x['step'] * 1e3:9.2f} {x['adam'] * 1e3:9.2f} {x['state'] / 2**20:19.2f}")
            print(f"{'ratio':14} {s['step'] / a['step']:9.2f} {s['adam'] / a['adam']:9.2f}"
                  f" {s['state'] / a['state']:19.2f}", flush=True)
    finally:
        hdist.shutdown(info)


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="the model's preset (default tiny)")
    ap.add_argument("--ranks", type=int, default=2, help="gloo ranks (default 2)")
    ap.add_argument("--repeat", type=int, default=20, help="steps timed per path (default 20)")
    return ap


def main() -> int:
    args = build_parser().parse_args()
    keep_freed_memory()
    if "WORLD_SIZE" in os.environ:
        run_ranks(args)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={args.ranks}", __file__, *sys.argv[1:]], env=env).returncode


if __name__ == "__main__":
    run_cli(main)
