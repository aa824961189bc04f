"""What a config builds for the trainer: the model (`model`: gpt | classic) and its optimizers
(`optimizer`: muon = NorMuon on the hidden matrices + Adam on the rest | adamw = AdamW on all).
The speedrun model has its own trainer (harness/speedrun_train.py)."""

from __future__ import annotations

import torch.nn as nn

from harness import dist as hdist
from harness.adamw import DataParallelAdamW
from harness.classic_model import ClassicGPT, ClassicShape
from harness.config import Config
from harness.model import GPT, ModelShape
from harness.optim import Optimizers


def build_model(cfg: Config) -> nn.Module:
    if cfg.model == "classic":
        return ClassicGPT(ClassicShape.from_config(cfg))
    if cfg.model == "gpt":
        return GPT(ModelShape.from_config(cfg))
    raise ValueError(f"build_model: model={cfg.model!r} is built by its own trainer")


def build_optimizers(model: nn.Module, cfg: Config, info: hdist.DistInfo,
                     split_step: int | None = None) -> Optimizers | DataParallelAdamW:
    if cfg.optimizer == "adamw":
        return DataParallelAdamW(model, cfg, info)
    return Optimizers(model, cfg, info, split_step=split_step)
