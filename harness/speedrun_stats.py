"""Speedrun statistics that record submitters otherwise compute by hand.

Per run: the first validation whose loss is <= the target (3.28 on the short track): its step
and train_time (`target_hit`); None when the run never got there.

Per group of seeds (`seed_stats`): n, mean and sample std (ddof 1) of the final val losses, the
one-sample t-test of those losses against the target with H1: mean < target (as record
submissions compute it, `scipy.stats.ttest_1samp(losses, target, alternative="less")`), and
the optimizer track's rule `(target - mean) * sqrt(n) >= 0.004` (its value and pass/fail).

Only the parsed `RunLog` is read here (harness.logs.format does the parsing); grouping is the
caller's (harness.logs.runs.group_runs), so the monitor and the plotter group runs the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from harness.logs.format import RunLog

DEFAULT_TARGET = 3.28  # the short track's val loss target
MARGIN_RULE = 0.004  # optimizer track: (target - mean) * sqrt(n) must be at least this


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


@dataclass(frozen=True)
class TargetHit:
    step: int
    train_time_ms: float | None  # None where the log's line has no train_time


def target_hit(run: RunLog, target: float = DEFAULT_TARGET) -> TargetHit | None:
    """The first validation (in step order) with val loss <= target, or None if none reached it."""
    for rec in sorted(run.val_steps, key=lambda r: r.step):  # stable: a step validated twice keeps log order
        if _finite(rec.val_loss) and rec.val_loss <= target:
            return TargetHit(rec.step, rec.train_time_ms)
    return None


def time_to_loss(run: RunLog, target: float) -> float | None:
    """Training time in ms at which the validation curve first reaches `target`, interpolated
    linearly (in train_time) between the last validation above it and the first at or below it;
    the first validation's time when that one is already there; None if none reaches it."""
    prev = None
    for rec in sorted(run.val_steps, key=lambda r: r.step):
        loss, t = rec.val_loss, rec.train_time_ms
        if not (_finite(loss) and isinstance(t, float)):
            continue
        if loss <= target:
            if prev is None:
                return t
            (t0, l0) = prev
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
        prev = (t, loss)
    return None


def ttest_less(values: Sequence[float], target: float) -> tuple[float, float] | None:
    """(t, p) of the one-sample t-test of `values` against `target`, H1: mean < target; None
    with fewer than 2 values or no spread (the statistic is undefined)."""
    from scipy import stats

    if len(values) < 2 or max(values) == min(values):
        return None
    res = stats.ttest_1samp(list(values), target, alternative="less")
    t, p = float(res.statistic), float(res.pvalue)
    if not (math.isfinite(t) and math.isfinite(p)):
        return None
    return t, p


def margin(values: Sequence[float], target: float) -> float:
    """The optimizer track's figure: (target - mean) * sqrt(n)."""
    n = len(values)
    if n == 0:
        raise ValueError("margin of no values")
    return (target - sum(values) / n) * math.sqrt(n)


@dataclass
class SeedStats:
    group: str
    target: float
    n: int  # finished runs with a finite final val loss
    mean: float
    std: float  # sample std (ddof 1); nan for one run
    t: float | None  # one-sample t statistic against the target (None below 2 runs)
    p: float | None  # one-sided p-value, H1: mean < target
    margin: float  # (target - mean) * sqrt(n)
    passes: bool  # margin >= MARGIN_RULE
    reached: int  # runs of the group whose val loss reached the target at some validation
    left_out: int = 0  # runs of the group without a final val loss (running, failed, diverged)
    values: list[float] = field(default_factory=list)


def seed_stats(group: str, runs: Iterable[RunLog], target: float = DEFAULT_TARGET) -> SeedStats | None:
    """The statistics of one group of seeds; None when no run of it has finished."""
    runs = list(runs)
    vals = [r.final_val_loss for r in runs if r.finished and _finite(r.final_val_loss)]
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else float("nan")
    tp = ttest_less(vals, target)
    m = margin(vals, target)
    return SeedStats(
        group=group, target=target, n=n, mean=mean, std=std,
        t=None if tp is None else tp[0], p=None if tp is None else tp[1],
        margin=m, passes=m >= MARGIN_RULE,
        reached=sum(1 for r in runs if target_hit(r, target) is not None),
        left_out=len(runs) - n, values=vals,
    )


def group_seed_stats(groups: Mapping[str, Sequence[RunLog]], target: float = DEFAULT_TARGET) -> list[SeedStats]:
    """seed_stats of every group with a finished run, lowest mean first."""
    out = [s for s in (seed_stats(g, m, target) for g, m in groups.items()) if s is not None]
    return sorted(out, key=lambda s: (s.mean, s.group))


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def format_seed_table(rows: Sequence[SeedStats]) -> str:
    """Markdown: one row per group of seeds."""
    target = rows[0].target if rows else DEFAULT_TARGET
    lines = [
        f"| group | n | mean | std | t | p (H1: mean < {target:g}) | (target - mean)·√n | ≥ {MARGIN_RULE:g} | reached |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|---:|",
    ]
    for r in rows:
        name = r.group + (f" [+{r.left_out} unfinished]" if r.left_out else "")
        lines.append(
            f"| {name} | {r.n} | {r.mean:.4f} | {_f(r.std, '.4f')} | {_f(r.t, '.3f')} | {_f(r.p, '.3g')} "
            f"| {r.margin:+.4f} | {'pass' if r.passes else 'fail'} | {r.reached}/{r.n + r.left_out} |"
        )
    return "\n".join(lines)


@dataclass
class RunHit:
    run: str
    group: str
    final_val_loss: float | None
    step: int | None  # first step whose val loss <= target; None if never
    train_time_ms: float | None


def run_hits(groups: Mapping[str, Sequence[RunLog]], target: float = DEFAULT_TARGET) -> list[RunHit]:
    """Per run: the step and train time at which it first reached the target (by group, run)."""
    out = []
    for g in sorted(groups):
        for r in sorted(groups[g], key=lambda r: r.name):
            hit = target_hit(r, target)
            out.append(RunHit(r.name, g, r.final_val_loss, hit.step if hit else None, hit.train_time_ms if hit else None))
    return out


def format_hits_table(hits: Sequence[RunHit], target: float = DEFAULT_TARGET) -> str:
    lines = [
        f"| run | group | final val loss | step to {target:g} | time to {target:g} |",
        "|---|---|---:|---:|---:|",
    ]
    for h in hits:
        time = "-" if h.train_time_ms is None else (f"{h.train_time_ms / 1000:.1f}s" if h.train_time_ms < 600_000
                                                     else f"{h.train_time_ms / 60000:.2f}min")
        if h.step is None:
            time = "never"
        lines.append(f"| {h.run} | {h.group} | {_f(h.final_val_loss, '.4f')} | {'-' if h.step is None else h.step} | {time} |")
    return "\n".join(lines)
