"""Generate text on CPU from a checkpoint or a weight export (export_weights.py).

    python sample.py --checkpoint exports/r1 --prompt "def main(" --max_new_tokens 50
    python sample.py --checkpoint checkpoints/r1/step_1600.pt --prompt "import" --temperature 0.8 --top_k 50 --seed 1

Prints the prompt followed by the continuation. --temperature 0 is greedy (argmax); otherwise
tokens are drawn from softmax(logits / T) (top_k: from the K most likely) with --seed, so a seed
gives the same text every time. The prompt is tokenized with GPT-2's tokenizer (data/tokenizer.py),
after <|endoftext|> (every document in the shards starts with it); an <|endoftext|> from the
model ends the text. --model gpt runs only (harness/model.py); see harness/sampling.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

from base import UserError, run_cli
from base.cli import ArgumentParser


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH_OR_EXPORT_DIR", help="a step_<N>.pt file or an export directory")
    p.add_argument("--prompt", default="", metavar="TEXT", help="the text to continue (default: none, a new document)")
    p.add_argument("--max_new_tokens", type=int, default=100, metavar="N", help="tokens to generate at most (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default 1.0)")
    p.add_argument("--top_k", type=int, metavar="K", help="sample from the K most likely tokens only")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--train_files", metavar="GLOB", help="checkpoint of a compact_vocab run: its train shards, if moved")
    p.add_argument("--val_files", metavar="GLOB", help="checkpoint of a compact_vocab run: its val shards, if moved")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k {args.top_k}: must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from harness.export import load_model
    from harness.sampling import sample_text

    with torch.no_grad():  # not set_grad_enabled(False): main() also runs in-process (tests)
        model, vocab, meta = load_model(args.checkpoint, train_files=args.train_files, val_files=args.val_files)
        text, _ = sample_text(model, vocab, args.prompt, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, seed=args.seed, context=meta.get("seq_len"))
    sys.stdout.write(args.prompt + text + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
