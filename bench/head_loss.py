"""The head + soft-capped cross-entropy on CPU: the plain path against the fused chunked one
(harness/fused_loss.py), forward and backward, in the same process.

    python bench/head_loss.py [--tokens 2048] [--dim 256] [--vocab 22784] [--threads 1]

Prints the median milliseconds of each (after one warm-up), the ratio fused / plain, and the
largest difference of the loss and the gradients (they must agree).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from base import run_cli
from base.cli import ArgumentParser
from harness.fused_loss import softcapped_cross_entropy


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step (default 2048, the tiny preset's first stage)")
    ap.add_argument("--dim", type=int, default=256, help="model width (default 256)")
    ap.add_argument("--vocab", type=int, default=22784, help="head rows (default 22784: the local corpus's compact table)")
    ap.add_argument("--cap", type=float, default=15.0, help="logit soft-cap (default 15)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions of each (default 5)")
    return ap


def main() -> int:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h = torch.randn(args.tokens, args.dim, requires_grad=True)
    w = (torch.randn(args.vocab, args.dim) * 0.02).requires_grad_()
    y = torch.randint(0, args.vocab, (args.tokens,))

    def plain() -> torch.Tensor:
        z = F.linear(h, w).float()
        return F.cross_entropy(args.cap * torch.tanh(z / args.cap), y)

    def fused() -> torch.Tensor:
        return softcapped_cross_entropy(h, w, y, args.cap)

    results = {}
    for name, fn in (("plain", plain), ("fused", fused)):
        times = []
        for i in range(args.repeat + 1):
            h.grad = w.grad = None
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
        results[name] = (statistics.median(times) * 1000, loss.item(), h.grad.clone(), w.grad.clone())
    (pm, pl, ph, pw), (fm, fl, fh, fw) = results["plain"], results["fused"]
    print(f"head + soft-capped CE, {args.tokens} tokens x {args.vocab} ids x {args.dim}, {args.threads} thread(s):"
          f" plain {pm:.0f} ms, fused {fm:.0f} ms, fused / plain {fm / pm:.2f}")
    print(f"largest difference: loss {abs(pl - fl):.2e}, dh {(ph - fh).abs().max():.2e}, dW {(pw - fw).abs().max():.2e}")
    return 0


if __name__ == "__main__":
    run_cli(main)
