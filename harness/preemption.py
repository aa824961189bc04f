"""SIGTERM as a request to stop at the end of the current step.

Slurm sends SIGTERM before it pre-empts or times out a job, and torchrun, on SIGTERM, sends
SIGTERM to its workers and gives them 30 s before SIGKILL. The handler only records the signal;
the trainer polls it once per step and all ranks agree (an all-reduce) on stopping at the same
step, where they save a checkpoint, log `status:preempted step:N` and exit 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

from harness import dist as hdist


class StopRequest:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopRequest":
        # signal handlers can only be set from the main thread (an in-process caller may not be)
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            print(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint",
                  file=sys.stderr, flush=True)
        self.signum = signum

    def agreed(self, info: hdist.DistInfo) -> bool:
        """True on every rank when any rank was asked to stop (a collective when distributed)."""
        if not info.distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=info.device)
        return bool(hdist.all_reduce_mean_(flag).item() > 0)


# A test hook, off by default: HARNESS_TEST_HOLD="N:PATH" makes the run wait after logging
# training step N until PATH exists or a stop is requested (SIGTERM), so signal tests can act
# on a run that is provably mid-run instead of racing a short one (tests/test_sweep_local.py).
# A run left holding by a failed test gives up after HOLD_MAX_S and goes on.
HOLD_VAR = "HARNESS_TEST_HOLD"
HOLD_MAX_S = 600.0


def hold_for_test(step: int, stop: StopRequest, poll_s: float = 0.02) -> None:
    spec = os.environ.get(HOLD_VAR)
    if not spec:
        return
    at, _, path = spec.partition(":")
    if step != int(at):
        return
    end = time.monotonic() + HOLD_MAX_S
    while not stop.requested and not os.path.exists(path) and time.monotonic() < end:
        time.sleep(poll_s)
