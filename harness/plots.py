"""Figures and the final-loss table from run logs (ours and modded-nanogpt's): the library
behind `plot_loss.py` (its command line) and `experiments.report`.

load_runs, final_loss_table, format_markdown, write_csv, plot_val_loss, plot_schedules,
plot_ord, plot_eff_rank, plot_final_bars; the figures themselves (matplotlib Figure objects)
from val_loss_figure and final_bars_figure; plot_loss.make_report draws them all at once.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib.figure import Figure  # object API: no pyplot state, no display backend needed

from base import UserError
from base import atomic_write as _atomic_write
from harness.logs.format import RunLog, read_log, find_logs
from harness.logs.runs import default_baseline, group_runs

DPI = 120


# ------------------------------------------------------------------------------------------
# Loading and grouping


def load_runs(paths: Sequence[str | os.PathLike] | None = None) -> list[RunLog]:
    """Parse the logs under files/directories (default: logs/). A file named on the command line
    that is not a run log is an error; a .txt in a directory that is not one is left out with a
    note; no run log at all is an error (nothing would be drawn)."""
    paths = list(paths) if paths else ["logs"]
    runs, not_logs = [], []
    for given in paths:
        for f in find_logs([given]):
            run = read_log(f)
            if is_run_log(run):
                runs.append(run)
            elif Path(given).is_dir():
                not_logs.append(f)
            else:
                raise UserError(f"{f}: not a run log (no step, config or status line of a training log)")
    for f in not_logs:
        print(f"note: {f}: not a run log; left out", file=sys.stderr)
    if not runs:
        where = ", ".join(map(str, paths))
        what = f"{len(not_logs)} .txt file(s) there, none a run log" if not_logs else "no .txt files there"
        raise UserError(f"no run logs to plot in {where} ({what})")
    return runs


def is_run_log(run: RunLog) -> bool:
    return bool(run.ours or run.config is not None or run.val_steps or run.train_steps or run.status)


def check_group_by(runs: Sequence[RunLog], group_by: str) -> None:
    if group_by in ("tag", "script"):
        return
    configs = [r.config for r in runs if r.config is not None]
    if configs and not any(group_by in c for c in configs):
        known = sorted({k for c in configs for k in c})
        raise UserError(f"--group_by {group_by}: no run's config has that field (fields: tag, script, {', '.join(known[:40])})")


def resolve_baseline(runs: Sequence[RunLog], group_by: str, baseline: str | None = "auto") -> str | None:
    """`auto` -> the default baseline group (see harness.logs.runs.default_baseline); `none`/None -> no
    baseline; a name must be one of the groups."""
    groups = group_runs(runs, group_by)
    if baseline is None or baseline == "none":
        return None
    if baseline == "auto":
        return default_baseline(groups)
    if baseline not in groups:
        raise UserError(f"--baseline {baseline}: no such group (groups by {group_by}: {', '.join(sorted(groups))})")
    return baseline


MANY_LINES = 10  # more groups than this: colours from a continuous colour map, not a cycle


def _group_order(names: Iterable[str]) -> list[str]:
    """Group names in order: numerically where all are numbers (a sweep's values), else by name."""
    names = sorted(set(names))
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def group_colors(names: Iterable[str]) -> dict[str, Any]:
    """One stable colour per group, the same in every figure: tab10 for up to 10 groups; more
    groups (a sweep) take evenly spaced colours of a continuous map, in the groups' order
    (numeric where the names are numbers), so no two share a colour."""
    import matplotlib

    names = _group_order(names)
    if len(names) <= MANY_LINES:
        cmap = matplotlib.colormaps["tab10"]
        return {n: cmap(i) for i, n in enumerate(names)}
    cmap = matplotlib.colormaps["viridis"]
    return {n: cmap(0.92 * i / (len(names) - 1)) for i, n in enumerate(names)}  # the top end is too pale


def legend_outside(fig: Figure, ax, fontsize: float = 8) -> Any:
    """A legend to the right of the axes, outside them, so it never covers a curve (kept in the
    saved file by bbox_inches="tight"); several columns when the labels are many."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    ncol = 1 + len(labels) // 25
    return ax.legend(handles, labels, fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     borderaxespad=0.0, ncol=ncol, frameon=False)


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


# ------------------------------------------------------------------------------------------
# Final-loss table


@dataclass
class FinalLossRow:
    group: str
    n: int  # runs with a final val loss
    mean: float
    std: float  # sample std (ddof 1); nan for one run
    best: float
    delta: float | None  # mean - baseline mean
    p_value: float | None  # Welch's t-test against the baseline (both groups >= 2 runs)
    is_baseline: bool = False
    left_out: int = 0  # runs of the group with no final val loss (running, failed, diverged)
    values: list[float] = field(default_factory=list)


def final_loss_table(runs: Sequence[RunLog], group_by: str = "tag", baseline: str | None = "auto") -> list[FinalLossRow]:
    """Per group: n, mean +- std of the final val loss, best, delta and Welch p-value vs the
    baseline group. Sorted best (lowest mean) first. Groups with no finished run are left out."""
    from scipy import stats

    base_name = resolve_baseline(runs, group_by, baseline)
    rows: list[FinalLossRow] = []
    for name, members in group_runs(runs, group_by).items():
        vals = [r.final_val_loss for r in members if r.finished and _finite(r.final_val_loss)]
        if not vals:
            continue
        a = np.asarray(vals, dtype=np.float64)
        rows.append(FinalLossRow(
            group=name, n=len(vals), mean=float(a.mean()), std=float(a.std(ddof=1)) if len(a) > 1 else float("nan"),
            best=float(a.min()), delta=None, p_value=None, is_baseline=name == base_name,
            left_out=len(members) - len(vals), values=vals,
        ))
    base = next((r for r in rows if r.is_baseline), None)
    if base is not None:
        for r in rows:
            r.delta = r.mean - base.mean
            if r is not base and r.n >= 2 and base.n >= 2:
                p = float(stats.ttest_ind(r.values, base.values, equal_var=False).pvalue)
                r.p_value = p if math.isfinite(p) else None
    return sorted(rows, key=lambda r: (r.mean, r.group))


def _f(x: float | None, spec: str = ".4f", none: str = "-") -> str:
    return none if x is None or not math.isfinite(x) else format(x, spec)


def format_markdown(rows: Sequence[FinalLossRow]) -> str:
    lines = [
        "| group | n | final val loss (mean ± std) | best | Δ vs baseline | p (Welch) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"{r.group} (baseline)" if r.is_baseline else r.group
        if r.left_out:
            name += f" [+{r.left_out} unfinished]"
        mean = _f(r.mean) + (f" ± {_f(r.std)}" if math.isfinite(r.std) else "")
        delta = "-" if r.delta is None else f"{r.delta:+.4f}"
        p = "-" if r.p_value is None else f"{r.p_value:.3g}"
        lines.append(f"| {name} | {r.n} | {mean} | {_f(r.best)} | {delta} | {p} |")
    return "\n".join(lines)


def write_csv(rows: Sequence[FinalLossRow], path: str | os.PathLike) -> Path:
    cols = ["group", "n", "mean", "std", "best", "delta", "p_value", "is_baseline", "left_out"]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                d = asdict(r)
                w.writerow({k: ("" if d[k] is None or (isinstance(d[k], float) and math.isnan(d[k])) else d[k]) for k in cols})

    return _atomic_write(Path(path), write)


# ------------------------------------------------------------------------------------------
# Figures


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str, svg: bool = False) -> list[Path]:
    out = []
    for fmt in ("png", "svg") if svg else ("png",):
        out.append(_atomic_write(Path(out_dir) / f"{name}.{fmt}", lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight")))
    return out


def _val_curve(run: RunLog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, train minutes, val loss) of a run's finite validations; a step validated twice
    (modded-nanogpt's final step) keeps its last value."""
    by_step: dict[int, tuple[float, float]] = {}
    for r in run.val_steps:
        if _finite(r.val_loss):
            by_step[r.step] = ((r.train_time_ms or 0.0) / 60000.0, r.val_loss)
    steps = np.array(sorted(by_step), dtype=np.float64)
    t = np.array([by_step[int(s)][0] for s in steps])
    v = np.array([by_step[int(s)][1] for s in steps])
    return steps, t, v


def group_band(members: Sequence[RunLog]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over a group's runs at each validated step (std where >= 2 runs have that
    step): (steps, mean minutes, mean loss, std loss, runs per step)."""
    per_step: dict[int, list[tuple[float, float]]] = {}
    for run in members:
        for s, t, v in zip(*_val_curve(run)):
            per_step.setdefault(int(s), []).append((t, v))
    steps = np.array(sorted(per_step), dtype=np.float64)
    t = np.array([np.mean([p[0] for p in per_step[int(s)]]) for s in steps])
    v = np.array([np.mean([p[1] for p in per_step[int(s)]]) for s in steps])
    sd = np.array([np.std([p[1] for p in per_step[int(s)]], ddof=1) if len(per_step[int(s)]) > 1 else np.nan for s in steps])
    n = np.array([len(per_step[int(s)]) for s in steps])
    return steps, t, v, sd, n


def _plain_log_ticks(ax, values: np.ndarray) -> None:
    """Loss values as plain numbers (3, 3.5, 4, ...) on a log axis, not as 3x10^0."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    lo, hi = float(values.min()), float(values.max())
    nice = np.array([1, 1.5, 2, 2.5, 3, 3.25, 3.5, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50, 100])
    ticks = nice[(nice >= lo * 0.97) & (nice <= hi * 1.03)]
    if ticks.size >= 2:
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot_val_loss(
    runs: Sequence[RunLog],
    group_by: str = "tag",
    out_dir: str | os.PathLike = "reports/plots",
    x: str = "step",
    last: int | None = None,
    svg: bool = False,
    target: float | None = None,
) -> list[Path]:
    """Val loss against step or training time: full run (log y) and a zoom on the final part."""
    fig = val_loss_figure(runs, group_by, x=x, last=last, target=target)
    return [] if fig is None else save_figure(fig, out_dir, f"val_loss_{x}", svg)


def val_loss_figure(
    runs: Sequence[RunLog],
    group_by: str = "tag",
    x: str = "step",
    last: int | None = None,
    target: float | None = None,
) -> Figure | None:
    """The figure of plot_val_loss (None when no run has a validation). The legend sits right of
    the zoomed panel, outside both; `target` draws the target loss as a dashed line."""
    if x not in ("step", "time"):
        raise UserError(f"--x {x}: must be step or time")
    groups = {g: m for g, m in group_runs(runs, group_by).items() if any(_val_curve(r)[0].size for r in m)}
    if not groups:
        return None
    colors = group_colors(groups)
    fig = Figure(figsize=(13, 5.2))
    ax_full, ax_zoom = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    curves = []  # (x, y) of every drawn mean line, for the zoom limits
    ends = []  # last step of each curve
    for name in _group_order(groups):
        members = groups[name]
        steps, t, v, sd, n = group_band(members)
        xs = steps if x == "step" else t
        label = f"{name} (n={len(members)})" if len(members) > 1 else name
        for ax in (ax_full, ax_zoom):
            ax.plot(xs, v, color=colors[name], lw=1.6, label=label, marker="." if len(xs) < 40 else None)
            band = n >= 2
            if band.any():
                ax.fill_between(xs, np.where(band, v - sd, np.nan), np.where(band, v + sd, np.nan), color=colors[name], alpha=0.25, lw=0)
        curves.append((xs, v))
        ends.append(float(steps.max()))
    xlabel = "step" if x == "step" else "training time (min)"
    x_end = max(c[0].max() for c in curves)
    # the zoom starts where the final part of the shortest curve starts, so every run shows
    if last is not None:
        if x == "step":
            x_lo = min(c[0].max() - last for c in curves)
        else:  # the last N steps at each curve's own pace
            x_lo = min(c[0].max() * (1 - min(1.0, last / max(s_end, 1.0))) for c, s_end in zip(curves, ends))
    else:
        x_lo = min(0.75 * c[0].max() for c in curves)
    x_lo = max(0.0, x_lo)
    in_win = np.concatenate([c[1][c[0] >= x_lo] for c in curves])
    ax_full.set_yscale("log")
    _plain_log_ticks(ax_full, np.concatenate([c[1] for c in curves]))
    ax_full.set_title(f"val loss vs {xlabel}")
    if in_win.size:
        lo, hi = float(in_win.min()), float(in_win.max())
        pad = max(0.05 * (hi - lo), 0.002)
        ax_zoom.set_ylim(lo - pad, hi + pad)
    ax_zoom.set_xlim(x_lo, x_end + 0.01 * max(x_end, 1e-9))
    ax_zoom.set_title(f"final part ({'last %d steps' % last if last is not None else 'last quarter of each run'})")
    if target is not None:
        for ax in (ax_full, ax_zoom):
            ax.axhline(target, color="0.3", ls="--", lw=1.0, label=f"target {target:g}" if ax is ax_zoom else None)
        if in_win.size:  # keep the target in view when it sits just outside the final part's range
            lo, hi = ax_zoom.get_ylim()
            if lo - 0.5 * (hi - lo) <= target < lo:
                ax_zoom.set_ylim(target - 0.05 * (hi - target), hi)
    for ax in (ax_full, ax_zoom):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.grid(True, which="both", alpha=0.3)
    legend_outside(fig, ax_zoom)
    fig.suptitle(f"validation loss by {group_by} (band: mean ± std over runs)")
    return fig


def _series(run: RunLog, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts: dict[int, float] = {}
    for r in run.train_steps + run.val_steps:
        v = r.values.get(key)
        if _finite(v):
            pts[r.step] = v
    s = np.array(sorted(pts), dtype=np.float64)
    return s, np.array([pts[int(k)] for k in s])


def plot_schedules(runs: Sequence[RunLog], group_by: str = "tag", out_dir: str | os.PathLike = "reports/plots", svg: bool = False) -> list[Path]:
    """LR multiplier and batch size against step; one line per group (its seeds share a schedule)."""
    keys = [k for k in ("lr_mul", "batch_size") if any(_series(r, k)[0].size for r in runs)]
    if not keys:
        return []
    groups = group_runs(runs, group_by)
    colors = group_colors(groups)
    fig = Figure(figsize=(6.5 * len(keys), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, key in zip(axes, keys):
        # groups that share a schedule (the usual case in a sweep) get one line with all their names
        drawn: list[tuple[np.ndarray, np.ndarray, list[str]]] = []
        for name in sorted(groups):
            run = next((r for r in groups[name] if _series(r, key)[0].size), None)
            if run is None:
                continue
            s, v = _series(run, key)
            same = next((d for d in drawn if d[0].shape == s.shape and np.array_equal(d[0], s) and np.array_equal(d[1], v)), None)
            if same is not None:
                same[2].append(name)
            else:
                drawn.append((s, v, [name]))
        for s, v, names in sorted(drawn, key=lambda d: _group_order(groups).index(d[2][0])):
            label = ", ".join(names) if len(names) <= 4 else f"{names[0]} and {len(names) - 1} more"
            ax.plot(s, v, color=colors[names[0]], lw=1.5, label=label, drawstyle="steps-post")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title({"lr_mul": "LR multiplier", "batch_size": "batch size (tokens)"}[key])
        ax.grid(True, alpha=0.3)
    legend_outside(fig, axes[-1])  # the groups share a legend: one, right of the last panel
    return save_figure(fig, out_dir, "schedules", svg)


def _diag_matrix(run: RunLog, metric: str) -> tuple[list[str], list[int], np.ndarray]:
    """layers (in log order) x steps matrix of one diag metric (nan where missing)."""
    layers: dict[str, int] = {}
    steps: set[int] = set()
    for d in run.diags:
        if _finite(d.values.get(metric)):
            layers.setdefault(d.layer, len(layers))
            steps.add(d.step)
    step_list = sorted(steps)
    col = {s: i for i, s in enumerate(step_list)}
    m = np.full((len(layers), len(step_list)), np.nan)
    for d in run.diags:
        v = d.values.get(metric)
        if _finite(v):
            m[layers[d.layer], col[d.step]] = v
    return list(layers), step_list, m


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def has_diag(run: RunLog, metric: str) -> bool:
    return any(_finite(d.values.get(metric)) for d in run.diags)


def plot_ord(runs: Sequence[RunLog], out_dir: str | os.PathLike = "reports/plots", svg: bool = False) -> list[Path]:
    """Per ORD run: rho and spectral_frac (||G_par|| / ||G||) per layer over training."""
    import matplotlib

    out: list[Path] = []
    for run in runs:
        metrics = [k for k in ("rho", "spectral_frac") if has_diag(run, k)]
        if not metrics:
            continue
        fig = Figure(figsize=(6.5 * len(metrics), 4.6))
        axes = np.atleast_1d(fig.subplots(1, len(metrics)))
        for ax, metric in zip(axes, metrics):
            layers, steps, m = _diag_matrix(run, metric)
            cmap = matplotlib.colormaps["viridis"]
            for i, layer in enumerate(layers):
                ax.plot(steps, m[i], color=cmap(i / max(1, len(layers) - 1)), lw=1.2, marker=".", label=layer)
            ax.set_xlabel("step")
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} per layer")
            ax.grid(True, alpha=0.3)
            if len(layers) <= 16:
                if ax is axes[-1]:  # the layers are the same in both panels: one legend, outside
                    legend_outside(fig, ax, fontsize=6)
            else:
                ax.text(0.99, 0.01, f"{len(layers)} layers, dark = first", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
        fig.suptitle(f"ORD diagnostics: {run.name}")
        out += save_figure(fig, out_dir, f"ord_{_safe_name(run.name)}", svg)
    return out


def plot_eff_rank(runs: Sequence[RunLog], out_dir: str | os.PathLike = "reports/plots", svg: bool = False, metric: str = "eff_rank") -> list[Path]:
    """Per diagnostics run: heatmap of the effective rank, layer x step."""
    out: list[Path] = []
    for run in runs:
        if not has_diag(run, metric):
            continue
        layers, steps, m = _diag_matrix(run, metric)
        fig = Figure(figsize=(max(6.0, 0.35 * len(steps) + 3), max(3.0, 0.28 * len(layers) + 1.5)))
        ax = fig.subplots()
        im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", interpolation="nearest", cmap="magma")
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 12)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
        ax.set_xlabel("step")
        fig.colorbar(im, ax=ax, label=metric)
        ax.set_title(f"{metric}: {run.name}")
        out += save_figure(fig, out_dir, f"{metric}_{_safe_name(run.name)}", svg)
    return out


def bar_baseline(rows: Sequence[FinalLossRow]) -> tuple[float, float]:
    """(bottom, top) of the final-loss bar chart's y axis. Final losses differ in the 3rd decimal,
    so the bars do not start at 0: they start a little below the lowest of (mean - std) and the
    single runs, and the top leaves room above the highest (mean + std) for the labels."""
    errs = [r.std if math.isfinite(r.std) else 0.0 for r in rows]
    lo = min(min(min(r.values), r.mean - e) for r, e in zip(rows, errs))
    hi = max(max(max(r.values), r.mean + e) for r, e in zip(rows, errs))
    pad = max(0.15 * (hi - lo), 0.003)
    return lo - pad, hi + 2 * pad


def final_bars_figure(rows: Sequence[FinalLossRow], target: float | None = None) -> Figure | None:
    """The final-loss table as bars (mean, seed-std error bar, every run as a dot), best first;
    bars rise from bar_baseline(rows), not from 0; `target` draws the target loss."""
    if not rows:
        return None
    colors = group_colors(r.group for r in rows)
    fig = Figure(figsize=(max(5.0, 0.9 * len(rows) + 2), 4.5))
    ax = fig.subplots()
    xs = np.arange(len(rows))
    means = np.array([r.mean for r in rows])
    errs = np.array([r.std if math.isfinite(r.std) else 0.0 for r in rows])
    bottom, top = bar_baseline(rows)
    if target is not None and bottom - 0.5 * (top - bottom) <= target < bottom:
        bottom = target - 0.1 * (top - target)  # the target just below the bars: show it
    bars = ax.bar(xs, means - bottom, bottom=bottom, yerr=errs, capsize=4, color=[colors[r.group] for r in rows],
                  alpha=0.85, error_kw={"elinewidth": 1.2})
    for bar, r in zip(bars, rows):
        bar.set_edgecolor("black" if r.is_baseline else bar.get_facecolor())
        bar.set_linewidth(2.0 if r.is_baseline else 0.0)
    for i, r in enumerate(rows):
        ax.plot(np.full(len(r.values), i), r.values, "k.", ms=4)
        label = f"n={r.n}" + ("" if r.p_value is None else f"\np={r.p_value:.2g}")
        ax.annotate(label, (i, r.mean + errs[i]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    if target is not None and bottom <= target <= top:
        ax.axhline(target, color="0.3", ls="--", lw=1.0)
        ax.annotate(f"target\n{target:g}", (1.0, target), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=7, color="0.3")  # right of the axes
    ax.set_ylim(bottom, top)
    ax.set_xticks(xs, [r.group + (" *" if r.is_baseline else "") for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final val loss")
    ax.set_title("final val loss by group (mean ± seed std; * baseline)")
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def plot_final_bars(rows: Sequence[FinalLossRow], out_dir: str | os.PathLike = "reports/plots", svg: bool = False,
                    target: float | None = None) -> list[Path]:
    fig = final_bars_figure(rows, target)
    return [] if fig is None else save_figure(fig, out_dir, "final_loss", svg)
