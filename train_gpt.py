"""The standard run: NorMuon on the hidden matrices, Adam on the rest.

    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset speedrun
    python train_gpt.py --preset tiny            (CPU, one process)

Every knob is a field of harness.config.Config: `--field value` or the env var FIELD=value.
"""

from harness.trainer import main

if __name__ == "__main__":
    raise SystemExit(main(__file__))
