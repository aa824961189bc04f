"""Corpus encoding throughput: our path against bare tiktoken, on the same texts, in one process.

    python bench/tokenizer.py [--max_mb 8] [--workers N]

Texts: the Python standard library's .py sources (what `python -m data.prepare_corpus` reads by
default), the first --max_mb MB in the corpus's file order. Times, in alternating rounds:
- reference: ``enc.encode_ordinary_batch(texts, num_threads=workers)``;
- ours: ``data.prepare_corpus.encode_documents`` (the same call plus BOS and the uint16 arrays
  that become shards).
Prints MB/s of UTF-8 text and the ratio ours/reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from base.cli import ArgumentParser
from data.prepare_corpus import default_inputs, encode_documents, list_documents, read_text
from data.tokenizer import gpt2_encoding


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max_mb", type=float, default=8.0, metavar="MB", help="MB of text from the corpus (default 8)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N", help="encoding threads (default: CPU count)")
    ap.add_argument("--rounds", type=int, default=3, metavar="N", help="alternating rounds (default 3)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    texts, size = [], 0
    for doc in list_documents(default_inputs()):
        text, _ = read_text(doc.path)
        if text:
            texts.append(text)
            size += len(text.encode())
        if size >= args.max_mb * 1e6:
            break
    enc = gpt2_encoding()
    enc.encode_ordinary_batch(texts[:50], num_threads=args.workers)  # warm up

    def reference() -> float:
        t0 = time.perf_counter()
        enc.encode_ordinary_batch(texts, num_threads=args.workers)
        return size / (time.perf_counter() - t0)

    def ours() -> float:
        t0 = time.perf_counter()
        encode_documents(texts, args.workers)
        return size / (time.perf_counter() - t0)

    ref, got = [], []
    for _ in range(args.rounds):
        ref.append(reference())
        got.append(ours())
    r, o = float(np.median(ref)), float(np.median(got))
    print(f"{len(texts)} stdlib files, {size / 1e6:.1f} MB of text, {args.workers} threads")
    print(f"reference enc.encode_ordinary_batch : {r / 1e6:6.2f} MB/s")
    print(f"encode_documents (BOS + uint16)     : {o / 1e6:6.2f} MB/s   ratio {o / r:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
