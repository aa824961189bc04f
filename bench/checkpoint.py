"""Checkpoint save and load time and file size, against a bare torch.save / torch.load of the
same state dict, measured side by side in this process (goal: ratio <= 1.2).

    python bench/checkpoint.py [--presets tiny,speedrun] [--repeat 3]

The model is built on CPU with each preset's shape; the optimizer state is filled as after a
step (Adam by a real step, the Muon momentum and second moment with random values: a real
Muon step of the speedrun shapes would take a minute of CPU here and changes nothing in size).
"save" is harness.checkpoint.save (gather the state, write a temp file, rename, prune);
"load" is harness.checkpoint.load (weights_only load, structure checks and the CRC-32 check of
every record, in a thread beside torch.load), "load-crc" the same without the CRC check;
"restore" (copying into model, optimizer, loader) is shown apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from base import run_cli
from base.cli import ArgumentParser
from data.loader import DistributedTokenLoader
from harness import checkpoint as ck
from harness.config import load_config
from harness.dist import DistInfo
from harness.malloc import keep_freed_memory
from harness.model import GPT, ModelShape
from harness.optim import Optimizers

ROOT = Path(__file__).resolve().parents[1]


def build(preset: str, out_dir: Path):
    cfg = load_config(["--preset", preset, "--run_id", f"bench-{preset}", "--checkpoint_dir", str(out_dir),
                       "--keep_last", "1"], env={})
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    torch.manual_seed(0)
    model = GPT(ModelShape.from_config(cfg))
    opt = Optimizers(model, cfg, info)
    for e in opt.adam.entries:
        e.param.grad = torch.randn_like(e.param) * 1e-3
    opt.adam.launch_reduce()
    opt.adam.step(1, 1.0)  # fills Adam's exp_avg / exp_avg_sq
    for g in opt.muon.groups:
        g.momentum.normal_()
        g.second_moment.uniform_()
    opt.zero_grad()
    loader = DistributedTokenLoader(str(ROOT / "data/local/local_train_*.bin"), seq_len=cfg.seq_len, rank=0,
                                    world_size=1, vocab_size=cfg.vocab_size, prefetch=False)
    return cfg, info, model, opt, loader


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(preset: str, repeat: int, where: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=where) as tmp:
        tmp = Path(tmp)
        cfg, info, model, opt, loader = build(preset, tmp)
        n_params = sum(p.numel() for p in model.parameters())
        run_state = {"step": 100, "train_time_ms": 1.0, "last_val_loss": 3.0, "val_step": 100}
        ref_path = tmp / "bare.pt"
        save_args = dict(step=100, model=model, opt=opt, loader=loader, run_state=run_state)
        rows = {"save": [], "ref_save": [], "load": [], "load_nocrc": [], "ref_load": [], "restore": []}
        path = ck.step_path(ck.run_dir(cfg), 100)
        for i in range(repeat):
            # the same state dict the checkpoint holds, saved bare; who goes first alternates,
            # as the disk's write-back of the one before slows the one after
            state = ck.build_state(cfg, info, **save_args)
            ref = lambda: rows["ref_save"].append(timed(lambda: torch.save(state, ref_path)))  # noqa: E731
            ours = lambda: rows["save"].append(timed(lambda: ck.save(cfg, info, **save_args)))  # noqa: E731
            for f in ((ref, ours) if i % 2 else (ours, ref)):
                f()
            state = None  # free it before the loads (the lambdas above are done with it)
            rows["ref_load"].append(timed(lambda: torch.load(ref_path, map_location="cpu", weights_only=True)))
            rows["load_nocrc"].append(timed(lambda: ck.load(path, verify=False)))
            box = {}
            rows["load"].append(timed(lambda: box.setdefault("c", ck.load(path))))
            rows["restore"].append(timed(lambda: ck.restore(box["c"], path, model=model, opt=opt, loader=loader,
                                                            info=info)))
            box = None
        best = {k: min(v) for k, v in rows.items()}
        return {"preset": preset, "params": n_params, "size": path.stat().st_size, "ref_size": ref_path.stat().st_size,
                **best}


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,speedrun", help="comma-separated model presets (default tiny,speedrun)")
    ap.add_argument("--repeat", type=int, default=5, metavar="N", help="timed repeats of each measurement (default 5)")
    ap.add_argument("--dir", default="/tmp", help="where to write (default /tmp; /dev/shm leaves the disk out)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # as the trainer does on CPU: no page faults on every big allocation
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; best of {args.repeat}; files in {args.dir}")
    print(f"{'preset':9} {'params':>8} {'file MB':>8} {'bare MB':>8} {'save s':>8} {'bare s':>8} {'ratio':>6}"
          f" {'load s':>8} {'bare s':>8} {'ratio':>6} {'load-crc s':>10} {'ratio':>6} {'restore s':>9}")
    for preset in args.presets.split(","):
        r = bench(preset, args.repeat, args.dir)
        print(f"{r['preset']:9} {r['params'] / 1e6:7.1f}M {r['size'] / 2**20:8.1f} {r['ref_size'] / 2**20:8.1f}"
              f" {r['save']:8.3f} {r['ref_save']:8.3f} {r['save'] / r['ref_save']:6.2f}"
              f" {r['load']:8.3f} {r['ref_load']:8.3f} {r['load'] / r['ref_load']:6.2f}"
              f" {r['load_nocrc']:10.3f} {r['load_nocrc'] / r['ref_load']:6.2f} {r['restore']:9.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
