"""Run logs for the log readers' tests: modded-nanogpt's own logs (tests/fixtures) and synthetic
runs written with the real RunLogWriter."""

from __future__ import annotations

import math
from pathlib import Path

from harness.logs.format import RunLogWriter


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "modded_logs"  # modded-nanogpt's own logs, kept in the repo

# what the fixtures say at their end (read off the files)

FIXTURE_FINALS = {
    "fork_lr_schedule_sweep": (1555, 3.2767),
    "track_1_short_2024-10-10_Muon": (6200, 3.2785),
    "track_1_short_2024-11-19_FlexAttention": (1875, 3.2783),
    "track_1_short_2025-07-18_TritonMuon": (1750, 3.2780),
    "track_1_short_2025-11-29_BatchSizeSchedule": (2160, 3.2780),
    "track_1_short_2026-01-30_VeFused": (1575, 3.2767),
    "track_2_medium_2025-04-22_Record8": (5960, 2.919750),
}


def val_curve(step: int, total: int, seed: int, offset: float) -> float:
    """A deterministic loss curve: 10.8 at step 0, ~3.3 + offset at the end, a seed wobble."""
    frac = step / total
    return 3.28 + offset + 7.5 * math.exp(-8 * frac) + 0.004 * math.sin(seed * 1.7 + 3 * frac) * frac


def write_run(
    log_dir: Path,
    run_id: str,
    *,
    tag: str = "",
    seed: int = 0,
    script: str = "train_gpt.py",
    total: int = 40,
    stop_at: int | None = None,
    status: str | None = "finished",
    val_every: int = 10,
    offset: float = 0.0,
    ord_diag: bool = False,
    eff_rank_diag: bool = False,
    extra_config: dict | None = None,
    step_ms: float = 100.0,
    nan_at: int | None = None,
    val_add: dict[int, float] | None = None,
) -> dict:
    """Write a run log with the real writer. Returns what the test should find in it."""
    w = RunLogWriter(Path(log_dir) / f"{run_id}.txt", run_id, echo=False)
    ord_on = ord_diag or script == "train_gpt_muon_new.py"
    config = {"run_id": run_id, "tag": tag, "seed": seed, "script": script, "ord": ord_on,
              "lr_muls": [1.0, 1.52, 1.73, 1.0], "batch_sizes": [4096, 8192, 12288, 12288],
              "num_scheduled_iterations": total,
              "spectral_lr_mul": (0.5 if ord_diag else 1.0) if ord_on else None}  # a standard run records none
    config.update(extra_config or {})
    w.header([("train_gpt.py", "step:1/2 val_loss:1.0 train_time:1ms step_avg:1.00ms\nprint('code')\n")],
             {"python": "3.11.7", "torch": "2.13.0", "world_size": 1}, config)
    end = total if stop_at is None else stop_at
    vals: dict[int, float] = {}
    layers = ["blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"]
    for s in range(0, end + 1):
        stage = min(2, 3 * s // total) if s < total else 3
        sched = dict(lr_mul=[1.0, 1.52, 1.73, 1.0][stage], batch_size=[4096, 8192, 12288, 12288][stage])
        t = s * step_ms
        if s > 0:
            loss = float("nan") if nan_at is not None and s >= nan_at else val_curve(s, total, seed, offset) + 0.05
            w.step(s, total, train_time_ms=t, step_avg_ms=step_ms, train_loss=loss, **sched)
        if s % val_every == 0 or s == total:
            v = val_curve(s, total, seed, offset) + (val_add or {}).get(s, 0.0)  # val_add: a late rise
            vals[s] = round(v, 4)
            w.step(s, total, val_loss=v, train_time_ms=t, step_avg_ms=step_ms if s else 0.0, **sched)
            for i, layer in enumerate(layers):
                if ord_diag:
                    w.diag(s, layer, rho=0.001 * (i + 1) * (1 + s / total), spectral_frac=0.02 * (i + 1) + 0.001 * s,
                           update_norm=1.0, cos_update_w=0.01)
                if eff_rank_diag:
                    w.diag(s, layer, eff_rank=200.0 - 30 * i - 100 * s / total, eff_rank_ns=240.0 - i, top1=0.1)
    if status == "finished":
        w.status("finished", final_val_loss=vals[total], step=total)
    elif status == "diverged":
        w.status("diverged", step=end)
    elif status == "failed":
        w.status("failed", reason="CUDA_OOM")
    elif status is not None:
        w.status(status, step=end)
    w.close()
    return {"path": Path(log_dir) / f"{run_id}.txt", "vals": vals, "end": end, "total": total}
