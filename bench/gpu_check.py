"""The first GPU run in one command: prints ONE table, exits 1 on a wrong result (2 on bad input).

    python bench/gpu_check.py            # on one H100: under ~8 minutes
    python bench/gpu_check.py --cpu      # every part that can run on CPU, at small sizes (~1 min)

Parts (rows in the table, in this order):
  a  speedrun step time per batch stage, one GPU: the speedrun preset (the fork's model, batch
     stages 131072/262144/393216 tokens) with gradient accumulation standing in for 8 ranks (each
     stage's 8 per-rank micro-batches of batch/8 tokens run one after the other), next to the
     fork's logged 8xH100 per-stage step time x 8 (REF_STAGE_MS: one rank's share of the work is
     1/8 of a step; the fork's time also holds its communication, ours the whole optimizer).
     Peak memory (torch.cuda.max_memory_allocated) and compile time (the first step of each stage,
     which compiles its shapes). Data: synthetic shards written to a temporary directory (the
     GPU machine may have no FineWeb), the step time does not depend on the token values.
     --cpu: the same code at the reduced speedrun size of tests/test_speedrun_train.py.
  b  Triton Newton-Schulz kernels vs the torch path: 5 polar-express steps on the speedrun's
     matrix stacks in bf16 (40 of 768x768, 24 of 768x3072); error of each against the float32
     torch result, and time. Passes when Triton's error is at most 2x torch-bf16's own + 1e-3.
     --cpu: TRITON_INTERPRET=1 in a subprocess (it must be set before triton is imported), small
     shapes, float32 and bf16.
  c  polar express (ours, kernels.orthogonalize) vs torch.optim.Muon's orthogonalization (its
     _zeropower_via_newtonschulz, quintic 3.4445/-4.775/2.0315, 5 steps, bf16) on the speedrun
     shapes: relative Frobenius error against the SVD polar factor U Vᵀ in float64, and time.
     Passes when ours is finite and no worse than torch's (polar express is built to be better).
  d  a 30-step tiny run through the entry point (python train_gpt.py --preset tiny, a subprocess)
     on a synthetic, learnable corpus: passes when every loss is finite and the last val loss is
     below the first.
  e  the memory estimate per rank of the speedrun preset on 8 GPUs (harness/memory_estimate.py,
     meta device, runs anywhere): passes when the total fits in 80 GB.

Rows that need CUDA say "not run (no CUDA)" without it. Timings are printed with a reference
measured in the same process (or the fork's log, named), never judged: only errors fail.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from base import UserError, run_cli
from base.cli import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]

NOT_RUN = "not run (no CUDA)"

# The fork's per-stage step time on 8xH100, ms: the modded-nanogpt record log closest to the fork
# (tests/fixtures/modded_logs/track_1_short_2026-01-30_VeFused.txt: the same four batch stages,
# 1535 + 40 steps, H100 80GB HBM3), as (train_time at the stage's end - at its second step) /
# (its steps - 1). The 2025-11-29 BatchSizeSchedule log gives 33.8 / 60.1 / 88.1 / 88.4.
REF_STAGE_MS = (34.43, 61.48, 88.13, 88.49)
REF_SOURCE = "track_1_short_2026-01-30_VeFused.txt"
FORK_RANKS = 8


@dataclass
class Row:
    part: str
    item: str
    value: str
    reference: str = ""
    ok: bool | None = None  # None: information only (or not run)


# ------------------------------------------------------------------------------------------
# The pass/fail rules (unit-tested with bad numbers in tests/test_gpu_check.py)


def finite(*xs: float) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def kernel_ok(err_triton: float, err_torch: float) -> bool:
    """Triton's error (vs the float32 torch result) no worse than 2x torch's own at the same dtype."""
    return finite(err_triton, err_torch) and err_triton <= 2 * err_torch + 1e-3


def polar_ok(err_ours: float, err_theirs: float) -> bool:
    return finite(err_ours, err_theirs) and err_ours <= err_theirs and err_ours < 0.5


def loss_went_down(val_losses: list[float], train_losses: list[float]) -> bool:
    return (len(val_losses) >= 2 and len(train_losses) > 0 and finite(*val_losses, *train_losses)
            and val_losses[-1] < val_losses[0])


def step_time_ok(ms: float) -> bool:
    return finite(ms) and ms > 0


def fits(total_bytes: float, capacity: float) -> bool:
    return finite(total_bytes) and 0 < total_bytes <= capacity


def failed(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.ok is False]


def exit_code(rows: list[Row]) -> int:
    """1 when any row is a wrong result, else 0 (rows not run or information only do not fail)."""
    return 1 if failed(rows) else 0


def stage_ms_from_log(path, scheduled: int, extension: int) -> list[float]:
    """Per batch stage (three thirds of `scheduled`, then the extension): the mean step time of a
    modded-nanogpt log, (train_time at the stage's end - at its second step) / (its steps - 1),
    leaving out each stage's first step. How REF_STAGE_MS was read."""
    from harness.logs.format import read_log

    t = {r.step: r.train_time_ms for r in read_log(path).train_steps}
    b = [0, round(scheduled / 3), round(2 * scheduled / 3), scheduled, scheduled + extension]
    return [(t[b[i + 1]] - t[b[i] + 1]) / (b[i + 1] - b[i] - 1) for i in range(4)]


# ------------------------------------------------------------------------------------------
# Helpers


def synthetic_shards(out: Path, train_tokens: int, val_tokens: int, doc_len: int = 600, vocab: int = 512,
                     seed: int = 0) -> tuple[str, str]:
    """Train/val shards of BOS-led documents of `doc_len` tokens in which token i+1 = token i + 7
    (mod vocab) except 10% random tokens: a bigram rule, learnable in a few steps. Returns the two
    file patterns."""
    from data.packed import BOS_ID
    from data.shards import write_shard

    rng = np.random.default_rng(seed)

    def tokens(n: int) -> np.ndarray:
        i = np.arange(n)
        starts = rng.integers(0, vocab, size=n // doc_len + 1)
        out_t = (starts[i // doc_len] + 7 * (i % doc_len)) % vocab
        noise = rng.random(n) < 0.1
        out_t[noise] = rng.integers(0, vocab, size=int(noise.sum()))
        out_t[i % doc_len == 0] = BOS_ID
        return out_t

    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "synth_train_000.bin", tokens(train_tokens))
    write_shard(out / "synth_val_000.bin", tokens(val_tokens))
    return str(out / "synth_train_*.bin"), str(out / "synth_val_*.bin")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 3) -> tuple[object, float]:
    """(fn's last result, the best of `repeat` wall times in ms after one untimed call)."""
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) * 1000)
    return out, best


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------
# a: speedrun step time per batch stage

CPU_SPEEDRUN = [
    "--compact_vocab", "1", "--model_dim", "48", "--num_heads", "4", "--bigram_vocab_size", "1021",
    "--seq_len", "64", "--batch_sizes", "128,256,384,384", "--micro_batches", "2", "--val_tokens", "256",
    "--val_batch_size", "256", "--window_block", "8", "--num_scheduled_iterations", "6",
    "--num_extension_iterations", "1", "--compile", "off",
]
GPU_SPEEDRUN = ["--val_tokens", "524288", "--val_batch_size", "524288"]


def part_a(cpu: bool, steps: int, workdir: Path) -> list[Row]:
    from harness import dist as hdist
    from harness.config import load_config
    from harness.plan import resolve_plan
    from harness.speedrun_train import SpeedrunTrainer

    cuda = torch.cuda.is_available() and not cpu
    extra = GPU_SPEEDRUN if cuda else CPU_SPEEDRUN
    cfg0 = load_config(["--preset", "speedrun", *extra], env={})
    n_stage_steps = 1 + steps
    train_tokens = sum(cfg0.batch_sizes[:3]) * n_stage_steps * 2 + 100_000
    train, val = synthetic_shards(workdir / "a", train_tokens, cfg0.val_tokens * 2 + 10_000)
    cfg = load_config(["--preset", "speedrun", *extra, "--train_files", train, "--val_files", val,
                       "--warmup", "0"], env={})
    info = hdist.init()
    if not cuda:
        info = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)
    trainer = SpeedrunTrainer(resolve_plan(cfg, info), info)
    trainer.setup()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows: list[Row] = []
    compile_ms = 0.0
    bounds = trainer.fwd_schedule.boundaries
    size = "preset" if cuda else "reduced CPU size"
    for k in range(3):
        start = bounds[k][0]
        batch = cfg.batch_sizes[k]
        first = start + 1  # an odd step: Adam steps too, so its shapes compile now
        _sync(trainer.device)
        t0 = time.perf_counter()
        trainer.train_step(trainer.plan.steps[first], False)
        _sync(trainer.device)
        compile_ms += (time.perf_counter() - t0) * 1000
        times = []
        for s in range(first + 1, first + 1 + steps):
            _sync(trainer.device)
            t0 = time.perf_counter()
            loss = trainer.train_step(trainer.plan.steps[s], False)
            _sync(trainer.device)
            times.append((time.perf_counter() - t0) * 1000)
        ms = float(np.mean(times))
        per_rank = batch // cfg.micro_batches
        ref = FORK_RANKS * REF_STAGE_MS[k]
        rows.append(Row("a", f"stage {k + 1} step ({cfg.micro_batches}x{per_rank} tok, {size})", f"{ms:.1f} ms",
                        f"fork 8xH100 {REF_STAGE_MS[k]:.1f} ms x{FORK_RANKS} = {ref:.0f} ms ({ms / ref:.2f}x)"
                        if cuda else "fork: GPU only", step_time_ok(ms) and finite(loss)))
    rows.append(Row("a", "compile (first step of each stage)", f"{compile_ms / 1000:.1f} s",
                    "fork: ~7 min on first execution (its log line)" if cuda else "compile off on CPU",
                    None))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        cap = torch.cuda.get_device_properties(0).total_memory
        rows.append(Row("a", "peak memory (max_memory_allocated)", f"{peak / 2**30:.1f} GiB",
                        f"of {cap / 2**30:.1f} GiB", peak <= cap))
    else:
        rows.append(Row("a", "peak memory (max_memory_allocated)", NOT_RUN))
    del trainer
    return rows


# ------------------------------------------------------------------------------------------
# b: Triton kernels vs torch

KERNEL_SCRIPT = r'''
import json, sys, time, torch
from kernels import orthogonalize
shapes = [tuple(s) for s in json.loads(sys.argv[1])]
dtypes = sys.argv[2].split(",")
dev = sys.argv[3]
gen = torch.Generator(device=dev).manual_seed(0)
def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())
repeat = int(sys.argv[4])
def timed(fn):
    out = fn() if repeat > 1 else None
    best = float("inf")
    for _ in range(repeat):
        if dev == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter(); out = fn()
        if dev == "cuda": torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) * 1000)
    return out, best
res = []
for shape in shapes:
    G = torch.randn(*shape, generator=gen, device=dev)
    ref = orthogonalize(G, backend="torch", dtype=torch.float32)
    for name in dtypes:
        dt = getattr(torch, name)
        O_tr, t_tr = timed(lambda: orthogonalize(G, backend="triton", dtype=dt))
        O_to, t_to = timed(lambda: orthogonalize(G, backend="torch", dtype=dt))
        res.append(dict(shape=list(shape), dtype=name, err_triton=rel(O_tr, ref), err_torch=rel(O_to, ref),
                        maxabs=float((O_tr.double() - O_to.double()).abs().max()), ms_triton=t_tr, ms_torch=t_to))
print("RESULT " + json.dumps(res))
'''

GPU_KERNEL_SHAPES = [(40, 768, 768), (24, 768, 3072)]
CPU_KERNEL_SHAPES = [(2, 33, 70)]  # several 16x16 interpreter tiles, partial ones in m and k


def part_b(cpu: bool) -> list[Row]:
    cuda = torch.cuda.is_available() and not cpu
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if cuda:
        shapes, dtypes, dev = GPU_KERNEL_SHAPES, "bfloat16", "cuda"
        env.pop("TRITON_INTERPRET", None)
    else:
        shapes, dtypes, dev = CPU_KERNEL_SHAPES, "float32,bfloat16", "cpu"
        env["TRITON_INTERPRET"] = "1"
    repeat = "3" if cuda else "1"  # the interpreter's time means nothing: run each once
    proc = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT, json.dumps(shapes), dtypes, dev, repeat], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-1:])[:120]
        return [Row("b", "triton kernels", f"failed: {tail}", "", False)]
    rows = []
    mode = "" if cuda else " (interpreter)"
    for r in json.loads(lines[0][len("RESULT "):]):
        shape = "x".join(map(str, r["shape"]))
        rows.append(Row("b", f"triton NS5 {shape} {r['dtype']}{mode}",
                        f"err {r['err_triton']:.2e} (max|d| {r['maxabs']:.1e}) {r['ms_triton']:.2f} ms",
                        f"torch err {r['err_torch']:.2e} {r['ms_torch']:.2f} ms"
                        + (f" ({r['ms_torch'] / r['ms_triton']:.2f}x)" if cuda else ""),
                        kernel_ok(r["err_triton"], r["err_torch"])))
    return rows


# ------------------------------------------------------------------------------------------
# c: polar express vs torch.optim.Muon's orthogonalization

GPU_POLAR_SHAPES = [(768, 768), (768, 3072), (3072, 768)]
CPU_POLAR_SHAPES = [(64, 64), (64, 256)]


def part_c(cpu: bool) -> list[Row]:
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    from kernels import orthogonalize

    cuda = torch.cuda.is_available() and not cpu
    dev = "cuda" if cuda else "cpu"
    shapes = GPU_POLAR_SHAPES if cuda else CPU_POLAR_SHAPES
    gen = torch.Generator(device=dev).manual_seed(1)
    rows = []
    for shape in shapes:
        G = torch.randn(*shape, generator=gen, device=dev)
        U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        P = U @ Vh
        ours, t_ours = timed(lambda: orthogonalize(G, method="polar_express", steps=5, dtype=torch.bfloat16), dev)
        theirs, t_theirs = timed(lambda: _zeropower_via_newtonschulz(G, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS),
                                 dev)
        e_ours, e_theirs = rel(ours, P), rel(theirs, P)
        rows.append(Row("c", f"polar express {shape[0]}x{shape[1]} bf16 vs SVD",
                        f"err {e_ours:.3f} {t_ours:.2f} ms",
                        f"torch.optim.Muon NS err {e_theirs:.3f} {t_theirs:.2f} ms", polar_ok(e_ours, e_theirs)))
    return rows


# ------------------------------------------------------------------------------------------
# d: a 30-step tiny run through the entry point


def part_d(cpu: bool, workdir: Path) -> list[Row]:
    from harness.logs.format import read_log

    train, val = synthetic_shards(workdir / "d", 400_000, 40_000, doc_len=300, vocab=256, seed=2)
    logs = workdir / "d_logs"
    args = ["--preset", "tiny", "--train_files", train, "--val_files", val, "--compact_vocab", "1",
            "--num_layers", "2", "--model_dim", "64", "--num_heads", "2", "--seq_len", "64",
            "--batch_sizes", "512,512,512,512", "--device_batch_tokens", "512", "--val_tokens", "1024",
            "--num_scheduled_iterations", "27", "--num_extension_iterations", "3", "--val_loss_every", "15",
            "--log_dir", str(logs), "--run_id", "gpu_check_tiny"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - t0
    path = logs / "gpu_check_tiny.txt"
    if proc.returncode != 0 or not path.exists():
        tail = " ".join(proc.stderr.strip().splitlines()[-1:])[:120]
        return [Row("d", "tiny run, 30 steps", f"exit {proc.returncode}: {tail}", "", False)]
    log = read_log(path)
    vals = [r.val_loss for r in log.val_steps]
    trains = [r.train_loss for r in log.train_steps]
    ok = loss_went_down(vals, trains) and len(trains) == 30
    first, last = (vals[0], vals[-1]) if vals else (float("nan"), float("nan"))
    return [Row("d", f"tiny run, {len(trains)} steps ({'cpu' if cpu else 'auto'} device)",
                f"val {first:.3f} -> {last:.3f}", f"{secs:.0f} s wall, status {log.status}", ok)]


# ------------------------------------------------------------------------------------------
# e: memory estimate


def part_e() -> list[Row]:
    from harness.config import load_config
    from harness.memory_estimate import H100_BYTES, estimate, total_bytes

    cfg = load_config(["--preset", "speedrun"], env={})
    items = estimate(cfg, world_size=FORK_RANKS)
    rows = [Row("e", f"8xH100 est. {i.name}", f"{i.bytes / 2**30:.2f} GiB", i.note) for i in items]
    total = total_bytes(items)
    rows.append(Row("e", "8xH100 est. total per rank", f"{total / 2**30:.2f} GiB",
                    f"of 80 GB = {H100_BYTES / 2**30:.1f} GiB ({total / H100_BYTES:.0%})", fits(total, H100_BYTES)))
    return rows


# ------------------------------------------------------------------------------------------


def format_table(rows: list[Row]) -> str:
    head = ("part", "item", "value", "reference", "check")
    cells = [head] + [(r.part, r.item, r.value, r.reference,
                       "-" if r.ok is None else ("ok" if r.ok else "WRONG")) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_parts(parts: str, cpu: bool, steps: int) -> list[Row]:
    cuda = torch.cuda.is_available() and not cpu
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        for p in parts:
            try:
                if p == "a":
                    rows += part_a(cpu, steps, work)
                elif p == "b":
                    rows += part_b(cpu)
                elif p == "c":
                    rows += part_c(cpu)
                elif p == "d":
                    rows += part_d(cpu, work)
                elif p == "e":
                    rows += part_e()
            except Exception as e:  # noqa: BLE001 - a crashed part is a wrong result, the others still run
                rows.append(Row(p, "crashed", f"{type(e).__name__}: {' '.join(str(e).split())[:100]}", "", False))
            finally:
                gc.collect()  # an out-of-memory part leaves its tensors to the next one otherwise
                if cuda:
                    torch.cuda.empty_cache()
        if not cuda:
            gpu_only = {"a": "speedrun preset step times (8 micro-batches, 1 GPU)",
                        "b": "triton NS5 40x768x768, 24x768x3072 bf16",
                        "c": "polar express 768x768, 768x3072, 3072x768 bf16"}
            rows += [Row(p, item, NOT_RUN) for p, item in gpu_only.items() if p in parts]
    order = {p: i for i, p in enumerate("abcde")}
    return sorted(rows, key=lambda r: order.get(r.part, 9))


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run the CPU parts at small sizes, even with CUDA")
    ap.add_argument("--parts", default="abcde", help="which parts, e.g. 'ce' (default: all)")
    ap.add_argument("--steps", type=int, default=5, metavar="N", help="timed steps per batch stage in part a (default 5)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.parts or set(args.parts) - set("abcde"):
        raise UserError(f"--parts={args.parts!r}: letters among a, b, c, d, e")
    if args.steps < 1:
        raise UserError(f"--steps={args.steps}: must be >= 1")
    cpu = args.cpu or not torch.cuda.is_available()
    t0 = time.perf_counter()
    rows = run_parts(args.parts, cpu, args.steps)
    print(format_table(rows))
    bad = failed(rows)
    device = "cpu" if cpu else torch.cuda.get_device_name(0)
    print(f"device: {device}; {time.perf_counter() - t0:.0f} s; "
          + (f"{len(bad)} WRONG: " + "; ".join(f"{r.part} {r.item}" for r in bad) if bad else "all checks ok"))
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(run_cli(main))
