"""The speedrun schedules: batch-size stages, LR multiplier with linear cooldown, Muon momentum
warm-up, and when to validate (docs/REFERENCE.md, "The run").

The scheduled steps S are split into three equal stages (boundaries at round(k/3 * S)), then an
extension stage of E steps. Each stage has its global batch size (tokens per step) and LR
multiplier. Cooldown starts at c = int(S * (1 - cooldown_frac)): for s >= c,
t = min(1, (s - c) / (S - c)) and lr = m * (1 - t) + final * t; the extension runs at final
(also without a cooldown: the fork's get_lr, where the extension's own multiplier is never used).
Muon's momentum warms up linearly over its first steps and cools down over the last ones, as the
fork's get_muon_momentum (warm-up first where the two overlap).

The classic recipe (nanoGPT's get_lr) adds two options: a linear LR warm-up over the first W
steps, lr = m x (s + 1) / (W + 1), after which the cooldown starts at max(c, W); and a cosine
cooldown, lr = final + (m - final) x (1 + cos(pi t)) / 2 with the same t.

`Schedule.steps()` lays all of this out as one frozen StepRecord per training step, which the
training loop walks (harness/trainer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.config import Config


@dataclass(frozen=True)
class StepRecord:
    """Training step `step` as the schedule sets it."""
    step: int
    stage: int  # 0, 1, 2: the scheduled thirds; 3: the extension
    batch_tokens: int  # global batch, tokens
    lr_mul: float
    muon_momentum: float
    validate_before: bool  # a validation comes before this step


@dataclass(frozen=True)
class Schedule:
    batch_sizes: tuple[int, ...]
    lr_muls: tuple[float, ...]
    scheduled: int
    extension: int
    cooldown_frac: float
    lr_final: float
    momentum: float
    momentum_start: float
    momentum_warmup: int
    momentum_cooldown: int
    val_every: int
    val_last_steps: int
    val_every_last: int
    warmup: int = 0
    decay_shape: str = "linear"

    @classmethod
    def from_config(cls, cfg: Config) -> "Schedule":
        return cls(
            batch_sizes=tuple(cfg.batch_sizes),
            lr_muls=tuple(cfg.lr_muls),
            scheduled=cfg.num_scheduled_iterations,
            extension=cfg.num_extension_iterations,
            cooldown_frac=cfg.cooldown_frac,
            lr_final=cfg.lr_decay_final,
            momentum=cfg.muon_momentum,
            momentum_start=cfg.muon_momentum_start,
            momentum_warmup=cfg.muon_momentum_warmup_steps,
            momentum_cooldown=cfg.muon_momentum_cooldown_steps,
            val_every=cfg.val_loss_every,
            val_last_steps=cfg.val_loss_last_steps,
            val_every_last=cfg.val_loss_every_last,
            warmup=cfg.lr_warmup_steps,
            decay_shape=cfg.lr_decay_shape,
        )

    @property
    def total(self) -> int:
        return self.scheduled + self.extension

    def steps(self) -> tuple[StepRecord, ...]:
        """One record per training step, 0 .. total - 1."""
        return tuple(StepRecord(step=s, stage=self.stage(s), batch_tokens=self.batch_size(s), lr_mul=self.lr_mul(s),
                                muon_momentum=self.muon_momentum(s), validate_before=self.validate_at(s))
                     for s in range(self.total))

    def stage(self, step: int) -> int:
        """0, 1, 2 for the scheduled thirds; 3 for the extension."""
        S = self.scheduled
        if step >= S:
            return 3
        if step < round(S / 3):
            return 0
        if step < round(2 * S / 3):
            return 1
        return 2

    def batch_size(self, step: int) -> int:
        return self.batch_sizes[self.stage(step)]

    @property
    def cooldown_start(self) -> int:
        return int(self.scheduled * (1 - self.cooldown_frac))

    def lr_mul(self, step: int) -> float:
        stage = self.stage(step)
        m = self.lr_muls[stage]
        if step < self.warmup:
            return m * (step + 1) / (self.warmup + 1)
        c, S = max(self.cooldown_start, self.warmup), self.scheduled
        if step < c:
            return m
        t = min(1.0, (step - c) / (S - c)) if S > c else 1.0
        if self.decay_shape == "cosine":
            return self.lr_final + (m - self.lr_final) * 0.5 * (1.0 + math.cos(math.pi * t))
        return m * (1 - t) + self.lr_final * t

    def muon_momentum(self, step: int) -> float:
        """Warm up from momentum_start to momentum over the first steps, back down over the last."""
        lo, hi = self.momentum_start, self.momentum
        cooldown_start = self.total - self.momentum_cooldown
        if step < self.momentum_warmup:
            return lo + step / self.momentum_warmup * (hi - lo)
        if self.momentum_cooldown > 0 and step > cooldown_start:
            return hi - (step - cooldown_start) / self.momentum_cooldown * (hi - lo)
        return hi

    def split_step(self, stage: int) -> int:
        """The fork's untie step: the first step of `stage`, made odd so that Adam steps on it."""
        return self.stage_start(stage) | 1

    def stage_start(self, stage: int) -> int:
        S = self.scheduled
        return (0, round(S / 3), round(2 * S / 3), S)[stage]

    def validate_at(self, step: int) -> bool:
        """Validation happens before training step `step` (step 0) and after the last one (total)."""
        if step == 0 or step == self.total:
            return True
        if self.val_every > 0 and step % self.val_every == 0:
            return True
        if self.val_last_steps > 0 and self.val_every_last > 0 and step >= self.total - self.val_last_steps:
            return step % self.val_every_last == 0
        return False
