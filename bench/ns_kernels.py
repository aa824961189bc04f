"""Benchmark: Triton X Xᵀ and full 5-step polar-express orthogonalization against torch.matmul.

On CUDA (bfloat16): for the speedrun shapes 768x768 and 768x3072 (the MLP's 3072x768 is the same
after the internal transpose), unbatched and batched as the sharded optimizer stacks them (6 per
rank on 8 GPUs: 48 matrices of each shape / 8; and 48 on one GPU), times
  xxt:   kernels.triton_kernels.xxt(X)  vs  torch.bmm(X, X.mT)
  ns5:   orthogonalize(backend="triton")  vs  orthogonalize(backend="torch")  (5 polar-express steps)
and prints milliseconds, TFLOP/s and the torch/triton time ratio (> 1: Triton faster).

TFLOP/s count the useful flops, the same count for both sides: X Xᵀ of an (m, k) X needs
m(m+1)k (the distinct entries of the symmetric result, 2k flops each); one NS step needs that,
plus m(m+1)m for A·A, plus 2m²k for B·X.

Without CUDA it says so and times the torch path only (float32, the CPU working dtype), against
the literal formula (b*A + c*(A@A), fresh tensors each step) as the in-process reference.

    python bench/ns_kernels.py [--batches 1,6,48] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from base import UserError, run_cli
from base.cli import ArgumentParser
from kernels import ns_coefficients, orthogonalize
from kernels.newton_schulz import normalize

SHAPES = ((768, 768), (768, 3072))


def xxt_flops(batch: int, m: int, k: int) -> float:
    return batch * m * (m + 1) * k


def ns_flops(batch: int, m: int, k: int, steps: int) -> float:
    return steps * (xxt_flops(batch, m, k) + batch * m * (m + 1) * m + batch * 2 * m * m * k)


def naive_orthogonalize(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The formula as written, fresh tensors every step: the reference the torch path is timed against."""
    X = normalize(G, torch.float32)
    for a, b, c in ns_coefficients("polar_express", steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


def time_cpu(fn, min_reps: int = 3, min_seconds: float = 0.5) -> float:
    """Median seconds of fn() over at least min_reps runs (after one warm-up)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return sorted(times)[len(times) // 2]


def time_cuda(fn) -> float:
    """Median seconds by triton.testing.do_bench (CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench

    fn()  # autotune outside the timed region
    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def row(name: str, shape: str, flops: float, t_ref: float, t_new: float | None) -> str:
    ref = f"{t_ref * 1e3:9.3f} ms {flops / t_ref / 1e12:7.2f} TF/s"
    if t_new is None:
        return f"  {name:<5} {shape:<14} {ref}"
    new = f"{t_new * 1e3:9.3f} ms {flops / t_new / 1e12:7.2f} TF/s"
    return f"  {name:<5} {shape:<14} torch {ref} | triton {new} | ratio torch/triton {t_ref / t_new:5.2f}"


def bench_cuda(batches: list[int], steps: int) -> None:
    from kernels import triton_kernels as tk

    dtype = torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}; bfloat16; polar express, {steps} steps; useful-flop TFLOP/s")
    for m, k in SHAPES:
        for batch in batches:
            shape = f"{batch}x{m}x{k}"
            X = torch.randn(batch, m, k, device="cuda", dtype=dtype) / k**0.5
            A = torch.empty(batch, m, m, device="cuda", dtype=dtype)
            rel = ((tk.xxt(X).float() - (X.float() @ X.float().mT)).norm() / (X.float() @ X.float().mT).norm()).item()
            t_torch = time_cuda(lambda: torch.bmm(X, X.mT, out=A))
            t_triton = time_cuda(lambda: tk.xxt(X, out=A))
            print(row("xxt", shape, xxt_flops(batch, m, k), t_torch, t_triton) + f"  (rel err {rel:.1e})")

            G = torch.randn(batch, m, k, device="cuda", dtype=torch.float32)
            o_tr = orthogonalize(G, steps=steps, dtype=dtype, backend="triton")
            o_to = orthogonalize(G, steps=steps, dtype=dtype, backend="torch")
            rel = ((o_tr - o_to).norm() / o_to.norm()).item()
            t_torch = time_cuda(lambda: orthogonalize(G, steps=steps, dtype=dtype, backend="torch"))
            t_triton = time_cuda(lambda: orthogonalize(G, steps=steps, dtype=dtype, backend="triton"))
            print(row(f"ns{steps}", shape, ns_flops(batch, m, k, steps), t_torch, t_triton) + f"  (rel diff {rel:.1e})")


def bench_cpu(batches: list[int], steps: int) -> None:
    torch.manual_seed(0)
    print(f"no CUDA: timing the torch path only (float32 on CPU, {torch.get_num_threads()} threads); "
          "Triton kernels need a GPU for timings")
    for m, k in SHAPES:
        for batch in batches:
            shape = f"{batch}x{m}x{k}"
            X = torch.randn(batch, m, k) / k**0.5
            A = torch.empty(batch, m, m)
            t = time_cpu(lambda: torch.bmm(X, X.mT, out=A))
            print(row("xxt", shape, xxt_flops(batch, m, k), t, None))
            G = torch.randn(batch, m, k)
            t_path = time_cpu(lambda: orthogonalize(G, steps=steps, backend="torch"))
            t_naive = time_cpu(lambda: naive_orthogonalize(G, steps))
            flops = ns_flops(batch, m, k, steps)
            print(f"  ns{steps:<3} {shape:<14} naive formula {t_naive * 1e3:9.1f} ms {flops / t_naive / 1e12:6.3f} TF/s"
                  f" | torch path {t_path * 1e3:9.1f} ms {flops / t_path / 1e12:6.3f} TF/s"
                  f" | ratio naive/torch path {t_naive / t_path:5.2f}")


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--batches {text!r}: expected comma-separated positive integers, e.g. 1,6,48") from None
    if not batches or min(batches) <= 0:
        raise UserError(f"--batches {text!r}: expected comma-separated positive integers, e.g. 1,6,48")
    return batches


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default=None, help="stack sizes (default 1,6,48 on CUDA, 1,6 on CPU)")
    ap.add_argument("--steps", type=int, default=5, metavar="N", help="timed calls per measurement (default 5)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps <= 0:
        raise UserError(f"--steps {args.steps}: must be a positive integer")
    cuda = torch.cuda.is_available()
    batches = parse_batches(args.batches or ("1,6,48" if cuda else "1,6"))
    (bench_cuda if cuda else bench_cpu)(batches, args.steps)
    return 0


if __name__ == "__main__":
    run_cli(main)
