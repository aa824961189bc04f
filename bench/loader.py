"""Loader throughput against a plain memmap read of the same bytes, in one process.

    python bench/loader.py [--tokens 50_000_000] [--batch 393216] [--seq_len 2048] [--world_size 8]

Writes a synthetic shard (random GPT-2 ids, a BOS every ~1000 tokens) to a temp dir, reads the
whole file once so both sides see a warm page cache, then times, in alternating rounds:
- reference: ``torch.from_numpy(mm[a:b].astype(np.int64))`` and the (inputs, targets) views,
  for the same rank slices of the same global batches;
- DistributedTokenLoader.next_batch (rank 0 of --world_size), plain and align_bos, in a tight loop
  without prefetch (the read path itself);
- the same with prefetch and a simulated training step between calls (``--step_ms``, a sleep,
  which like a GPU step releases the GIL): the time the training loop spends inside next_batch.
  (In a tight loop prefetch cannot help: there is nothing to overlap with, only a thread handoff.)
Prints tokens/s (per second spent reading / waiting) and the loader/reference ratio (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from base.cli import ArgumentParser
from data.loader import DistributedTokenLoader
from data.shards import HEADER_BYTES, write_shard
from data.tokenizer import EOT, VOCAB_SIZE


def _int(s: str) -> int:
    return int(s.replace("_", ""))


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=_int, default=50_000_000, metavar="N", help="tokens in the synthetic shard (default 50_000_000)")
    ap.add_argument("--batch", type=_int, default=393216, metavar="N", help="global batch in tokens (default 393216)")
    ap.add_argument("--seq_len", type=_int, default=2048, metavar="N", help="sequence length (default 2048)")
    ap.add_argument("--world_size", type=_int, default=8, metavar="N", help="ranks the batch is split over; rank 0 is read (default 8)")
    ap.add_argument("--rounds", type=_int, default=3, metavar="N", help="alternating rounds (default 3)")
    ap.add_argument("--step_ms", type=float, default=2.0, metavar="MS", help="simulated training step between calls, in ms (default 2)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    T, L, W = args.batch, args.seq_len, args.world_size
    per_rank = T // W

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench_000000.bin"
        rng = np.random.default_rng(0)
        toks = rng.integers(0, EOT, size=args.tokens, dtype=np.uint16)
        toks[:: 1000] = EOT
        write_shard(path, toks)
        del toks
        path.read_bytes()  # warm the page cache for both sides
        steps = (args.tokens - 1) // T  # batches one pass over the shard holds
        mm = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES)

        def reference() -> float:
            t0 = time.perf_counter()
            for k in range(steps):
                a = k * T  # rank 0's slice of global batch k
                t = torch.from_numpy(mm[a : a + per_rank + 1].astype(np.int64))
                _ = (t[:-1].view(-1, L), t[1:].view(-1, L))  # the slicing is what is timed
            return steps * per_rank / (time.perf_counter() - t0)

        def loader(align_bos: bool, prefetch: bool, step_s: float = 0.0) -> float:
            ld = DistributedTokenLoader([path], seq_len=L, rank=0, world_size=W, vocab_size=VOCAB_SIZE,
                                        align_bos=align_bos, prefetch=prefetch)
            ld.next_batch(T)  # opens the shard: vocab check (+ BOS scan); not part of the steady state
            n = steps - 2 if align_bos else steps - 1  # aligned windows advance a bit more per batch
            if step_s:
                n = min(n, 100)
            inside = 0.0
            for _ in range(n):
                if step_s:
                    time.sleep(step_s)
                t0 = time.perf_counter()
                x, y = ld.next_batch(T)
                inside += time.perf_counter() - t0
            ld.close()
            return n * per_rank / inside

        t0 = time.perf_counter()
        DistributedTokenLoader([path], seq_len=L, rank=0, world_size=W, vocab_size=VOCAB_SIZE, align_bos=True, prefetch=False).next_batch(T)
        open_s = time.perf_counter() - t0

        names = ["plain, no prefetch", "align_bos, no prefetch", f"plain, prefetch, {args.step_ms:g} ms step", f"align_bos, prefetch, {args.step_ms:g} ms step"]
        runs = [lambda: loader(False, False), lambda: loader(True, False),
                lambda: loader(False, True, args.step_ms / 1e3), lambda: loader(True, True, args.step_ms / 1e3)]
        ref, got = [], [[] for _ in runs]
        for _ in range(args.rounds):
            ref.append(reference())
            for g, run in zip(got, runs):
                g.append(run())
        r = float(np.median(ref))
        print(f"shard {args.tokens:,} tokens; global batch {T:,} tokens, seq_len {L}, rank 0 of {W} ({per_rank:,} tokens/call)")
        print(f"reference memmap slice -> int64 tensor      : {r / 1e6:9.1f} M tokens/s")
        for name, g in zip(names, got):
            v = float(np.median(g))
            print(f"DistributedTokenLoader {name:<21}: {v / 1e6:9.1f} M tokens/s   ratio {v / r:.2f}x")
        print(f"first open (vocab check + BOS scan of {args.tokens:,} tokens): {open_s * 1e3:.0f} ms, once per shard")
        mm = None  # unmap the shard
    return 0


if __name__ == "__main__":
    sys.exit(main())
