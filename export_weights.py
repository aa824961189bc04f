"""Export a checkpoint's model weights: DIR/model.safetensors + DIR/config.json.

    python export_weights.py --checkpoint checkpoints/r1/step_1600.pt --out exports/r1

config.json holds the model's shape and vocabulary (GPT-2's tokenizer; with compact_vocab the
GPT-2 id of every model id, rebuilt from the run's shards); harness.export.load_model(DIR)
rebuilds the model, and sample.py --checkpoint DIR generates text with it. See harness/export.py.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from base import run_cli
from base.cli import ArgumentParser
from harness.export import export_checkpoint


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a step_<N>.pt file written by the trainer")
    p.add_argument("--out", required=True, metavar="DIR", help="where model.safetensors and config.json go (created)")
    p.add_argument("--train_files", metavar="GLOB", help="compact_vocab runs: the train shards, if not where the run's config says")
    p.add_argument("--val_files", metavar="GLOB", help="compact_vocab runs: the val shards, if not where the run's config says")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for f in export_checkpoint(args.checkpoint, args.out, train_files=args.train_files, val_files=args.val_files):
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
