"""Numerical study: how close polar express and quintic Newton-Schulz get to the polar factor.

For each input class (Gaussian, low-rank plus noise, ill-conditioned with cond 1e3 and 1e6), each
working dtype (float32, bfloat16) and 1..8 iterations, prints for the output O = orthogonalize(G):
the smallest and largest singular value of O, and err = ||U Vᵀ - O||_F / sqrt(n), the RMS error
per singular direction against the exact polar factor U Vᵀ of G from a float64 SVD (n = min side).
Then, for each class and dtype, whether polar express beats quintic at 5 iterations.

    python bench/ns_study.py [--shape 256x512] [--seed 0] [--max_steps 8]
"""

from __future__ import annotations

import argparse
import math

import torch

from base import UserError, run_cli
from base.cli import ArgumentParser
from kernels import orthogonalize

METHODS = ("polar_express", "quintic")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _with_spectrum(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """U diag(s) Vᵀ with Haar-random orthonormal U (m x k), V (n x k), k = len(s)."""
    k = s.numel()
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return (U * s) @ V.T


def make_inputs(m: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """The input classes, in float64 (cast to float32 before orthogonalizing)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    rank = max(1, k // 32)
    signal = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(
        rank, n, generator=gen, dtype=torch.float64
    )
    noise = torch.randn(m, n, generator=gen, dtype=torch.float64)
    low_rank = signal / signal.norm() + 0.1 * noise / noise.norm()  # noise 10% of the signal's norm
    return {
        "gaussian": torch.randn(m, n, generator=gen, dtype=torch.float64),
        f"low-rank {rank} + 10% noise": low_rank,
        "ill-cond 1e3": _with_spectrum(m, n, torch.logspace(0, -3, k, dtype=torch.float64), gen),
        "ill-cond 1e6": _with_spectrum(m, n, torch.logspace(0, -6, k, dtype=torch.float64), gen),
    }


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def measure(G: torch.Tensor, P: torch.Tensor, method: str, steps: int, dtype: torch.dtype) -> tuple[float, float, float]:
    O = orthogonalize(G.float(), method=method, steps=steps, dtype=dtype, backend="torch").double()
    s = torch.linalg.svdvals(O)
    err = (P - O).norm().item() / math.sqrt(min(G.shape))
    return s.min().item(), s.max().item(), err


def parse_shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--shape {text!r}: expected ROWSxCOLS, e.g. 256x512") from None
    if m <= 0 or n <= 0:
        raise UserError(f"--shape {text!r}: both sides must be positive")
    return m, n


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="256x512", help="ROWSxCOLS of the test matrices (default 256x512)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the test matrices (default 0)")
    ap.add_argument("--max_steps", type=int, default=8, metavar="N", help="iterations 1..N, N >= 5 (default 8)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    m, n = parse_shape(args.shape)
    if args.max_steps < 5:
        raise UserError(f"--max_steps {args.max_steps}: must be at least 5 (the comparison is at 5 iterations)")
    steps_range = range(1, args.max_steps + 1)
    inputs = make_inputs(m, n, args.seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    verdicts = []
    print(f"shape {m}x{n}, seed {args.seed}; err = ||UVᵀ - O||_F / sqrt({min(m, n)}); torch backend on CPU")
    for dname, dtype in DTYPES.items():
        for cname, G in inputs.items():
            P = polar_factor(G)
            print(f"\n[{dname}] {cname}")
            print(f"  {'method':<14}{'':>6}" + "".join(f"{k:>9}" for k in steps_range))
            at5 = {}
            for method in METHODS:
                rows = [measure(G, P, method, k, dtype) for k in steps_range]
                at5[method] = rows[4][2]
                for label, idx in (("err", 2), ("s_min", 0), ("s_max", 1)):
                    name = method if label == "err" else ""
                    print(f"  {name:<14}{label:>6}" + "".join(f"{r[idx]:>9.4f}" for r in rows))
            wins = at5["polar_express"] < at5["quintic"]
            verdicts.append((dname, cname, at5["polar_express"], at5["quintic"], wins))

    print("\nat 5 iterations (err, lower is better):")
    for dname, cname, pe, q, wins in verdicts:
        print(f"  [{dname:<8}] {cname:<26} polar_express {pe:.4f}  quintic {q:.4f}  "
              f"ratio {pe / q:.3f}  {'polar express better' if wins else 'POLAR EXPRESS NOT BETTER'}")
    losers = [v for v in verdicts if not v[4]]
    print("polar express beats quintic at 5 iterations on every class and dtype" if not losers
          else f"polar express does NOT beat quintic at 5 iterations on {len(losers)} of {len(verdicts)} cases")
    return 0


if __name__ == "__main__":
    run_cli(main)
