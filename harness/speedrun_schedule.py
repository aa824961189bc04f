"""The fork's per-step forward schedule (its TrainingSchedule / TrainingManager): attention windows,
multi-token-prediction weights, YaRN on window change, the embed/head split step, and the long
window of the final validation. Learning rate, batch size and momentum stay in harness/schedule.py
(same stage boundaries: round(k/3 * S), then the extension).

Stages (windows in blocks of `block` tokens, 128 in the fork; MTP weights interpolated linearly
from start to end over the stage):
  1: windows (1, 3),  MTP [1, 0.5, 0.25] -> [1, 0.5, 0]
  2: windows (3, 7),  MTP [1, 0.5] -> [1, 0]
  3: windows (5, 11), MTP [1]
  extension: windows (6, 13), MTP [1]
The final validation (step == total) uses a long window of 20 blocks, with no YaRN step (the
fork sets the window only). The split step is the first odd step of stage 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, pairwise

import torch


@dataclass(frozen=True)
class ForwardStage:
    windows: tuple[int, int]  # (short, long) in blocks
    mtp_start: tuple[float, ...]
    mtp_end: tuple[float, ...]


FORK_STAGES = (
    ForwardStage((1, 3), (1.0, 0.5, 0.25), (1.0, 0.5, 0.0)),
    ForwardStage((3, 7), (1.0, 0.5), (1.0, 0.0)),
    ForwardStage((5, 11), (1.0,), (1.0,)),
    ForwardStage((6, 13), (1.0,), (1.0,)),  # extension
)
FINAL_LONG_WINDOW = 20  # blocks, at the final validation only
SPLIT_STAGE = 2  # embed and head are untied from the first odd step of this stage


class ForwardSchedule:
    def __init__(self, scheduled: int, extension: int, block: int = 128,
                 stages: tuple[ForwardStage, ...] = FORK_STAGES):
        if scheduled < 3 or extension < 0 or block < 1:
            raise ValueError(f"forward schedule: scheduled={scheduled} (>= 3), extension={extension} (>= 0), "
                             f"block={block} (>= 1)")
        self.stages, self.block = stages, block
        self.scheduled, self.total = scheduled, scheduled + extension
        thirds = [round(c * scheduled) for c in accumulate([1 / 3] * (len(stages) - 2))]
        ends = [0] + thirds + [scheduled, self.total]
        self.boundaries = list(pairwise(ends))
        self.split_step = self.boundaries[SPLIT_STAGE][0] | 1

    def lookup(self, step: int) -> tuple[ForwardStage, float]:
        """The stage of `step` and how far into it (0..1)."""
        for stage, (start, end) in zip(self.stages, self.boundaries):
            if step < end:
                return stage, (step - start) / (end - start)
        return self.stages[-1], 1.0

    def mtp_weights(self, step: int) -> list[float]:
        stage, t = self.lookup(step)
        return [a + (b - a) * t for a, b in zip(stage.mtp_start, stage.mtp_end)]

    def windows(self, step: int) -> tuple[int, int]:
        """(short, long) in tokens; the final validation's long window at step == total."""
        short, long = self.lookup(step)[0].windows
        if step >= self.total:
            long = FINAL_LONG_WINDOW
        return short * self.block, long * self.block


class ForwardState:
    """Follows the schedule step by step on one model (the fork's advance_schedule): YaRN is
    applied to the model's RoPE whenever the long window of the stage changes."""

    def __init__(self, schedule: ForwardSchedule, model, device):
        self.schedule, self.model, self.device = schedule, model, device
        self.reset()

    def reset(self) -> None:
        self.model.reset_rope()
        self.ws_long_blocks = self.schedule.stages[0].windows[1]
        self.stage_idx = 0

    def advance(self, step: int):
        """The ForwardArgs for `step`, after YaRN for every long-window change up to its stage
        (one at a time, in order, as a run from step 0 would: a resumed run gets the same RoPE)."""
        from harness.speedrun_model import ForwardArgs

        sched = self.schedule
        stage = sched.lookup(step)[0]
        k = sched.stages.index(stage)
        for j in range(self.stage_idx + 1, k + 1):
            new_long = sched.stages[j].windows[1]
            if new_long != self.ws_long_blocks:
                self.model.apply_window_change(self.ws_long_blocks * sched.block, new_long * sched.block)
                self.ws_long_blocks = new_long
        self.stage_idx = max(self.stage_idx, k)
        ws_short, ws_long = sched.windows(step)
        mtp = torch.tensor(sched.mtp_weights(step), dtype=torch.float32, device=self.device)
        return ForwardArgs(mtp, ws_short, ws_long)
