"""Figures and a final-loss table from run logs (ours and modded-nanogpt's), finished or running.

    python plot_loss.py                                # the runs in logs/
    python plot_loss.py logs/ other/run.txt --group_by spectral_lr_mul --out reports/plots --svg
    python plot_loss.py logs/ --x time --last 200 --baseline baseline
    python plot_loss.py logs/ --to_tensorboard runs/tb        # event files instead (tensorboard --logdir runs/tb)

Figures (PNG; SVG too with --svg), each skipped with a note when no run has its data:
- val_loss_step / val_loss_time: val loss of every run, coloured by group, the seeds of a group
  as mean +- std band, with a zoomed panel on the last N steps (--last; default the last quarter);
- schedules: LR multiplier and batch size against step;
- ord_<run>: rho and spectral_frac per layer over training (ORD runs' diag lines);
- eff_rank_<run>: effective rank heatmap, layer x step (diagnostics runs);
- final_loss: the final-loss table as bars (mean +- seed std), rising from a little below the
  lowest mean - std (not from 0).
Up to 10 groups take tab10's colours, more a continuous colour map; legends sit outside the axes.
The final-loss table (markdown on stdout, final_loss.csv in --out): per group n, mean +- std,
best, delta vs the baseline group, and Welch's t-test p-value against it where both groups have
>= 2 runs. Baseline: --baseline GROUP, default the group of the runs tagged `baseline*` or run
by train_gpt.py (`--baseline none` for none).

Group keys (--group_by): tag (an empty tag falls back to the script's stem; modded-nanogpt logs,
which have no config, to their file stem), script, or any config FIELD (modded logs: "modded").

--target LOSS (3.28 on the short track): speedrun statistics as record submissions compute
them (harness/speedrun_stats.py), printed after the final-loss table and written to
speedrun_stats.csv / target_hits.csv: per group n, mean, std of the final val loss, the one-sided
one-sample t-test against LOSS (t, p; H1: mean < LOSS), (LOSS - mean) * sqrt(n) and whether it is
>= 0.004; per run the step and train time of its first validation at or below LOSS.

Every function is importable, from harness.plots (the library; experiments.report uses it) or
here: load_runs, final_loss_table, format_markdown, write_csv,
plot_val_loss, plot_schedules, plot_ord, plot_eff_rank, plot_final_bars, make_report; the figures
themselves (matplotlib Figure objects) from val_loss_figure and final_bars_figure.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from base import UserError, check_out_dir, run_cli
from base.cli import ArgumentParser
from base import atomic_write as _atomic_write
from harness.plots import (  # the library (also experiments.report's); `import plot_loss` keeps every name
    DPI,
    FinalLossRow,
    MANY_LINES,
    bar_baseline,
    check_group_by,
    final_bars_figure,
    final_loss_table,
    format_markdown,
    group_band,
    group_colors,
    has_diag,
    is_run_log,
    legend_outside,
    load_runs,
    plot_eff_rank,
    plot_final_bars,
    plot_ord,
    plot_schedules,
    plot_val_loss,
    resolve_baseline,
    save_figure,
    val_loss_figure,
    write_csv,
)
from harness.logs.format import RunLog
from harness.logs.runs import group_runs
from harness.speedrun_stats import (MARGIN_RULE, RunHit, SeedStats, format_hits_table, format_seed_table,
                                    group_seed_stats, run_hits)

__all__ = ['DPI', 'FinalLossRow', 'MANY_LINES', 'Report', 'bar_baseline', 'check_group_by', 'check_out_dir', 'final_bars_figure', 'final_loss_table', 'format_markdown', 'group_band', 'group_colors', 'has_diag', 'is_run_log', 'legend_outside', 'load_runs', 'main', 'make_report', 'plot_eff_rank', 'plot_final_bars', 'plot_ord', 'plot_schedules', 'plot_val_loss', 'resolve_baseline', 'save_figure', 'val_loss_figure', 'write_csv', 'write_rows_csv']


# ------------------------------------------------------------------------------------------
# Everything at once


@dataclass
class Report:
    files: list[Path]
    skipped: list[str]
    rows: list[FinalLossRow]
    markdown: str
    seed_stats: list[SeedStats] = field(default_factory=list)  # with a target
    hits: list[RunHit] = field(default_factory=list)  # with a target: per run, step/time to it
    target_markdown: str = ""


def make_report(
    runs: Sequence[RunLog],
    group_by: str = "tag",
    out_dir: str | os.PathLike = "reports/plots",
    *,
    x: str | None = None,
    last: int | None = None,
    svg: bool = False,
    baseline: str | None = "auto",
    target: float | None = None,
) -> Report:
    """All figures and the final-loss table; `x` None draws val loss against both step and time.
    With `target` (a val loss): the speedrun statistics per group of seeds and per run
    (harness.speedrun_stats; speedrun_stats.csv and target_hits.csv), and the target drawn."""
    if not runs:
        raise UserError("no run logs to plot")
    check_group_by(runs, group_by)
    baseline = resolve_baseline(runs, group_by, baseline)  # a bad --baseline fails before any drawing
    baseline = baseline or "none"
    files: list[Path] = []
    skipped: list[str] = []
    for axis in ([x] if x else ["step", "time"]):
        got = plot_val_loss(runs, group_by, out_dir, x=axis, last=last, svg=svg, target=target)
        files += got
        if not got:
            skipped.append(f"val loss vs {axis}: no run has a validation yet")
            break
    got = plot_schedules(runs, group_by, out_dir, svg)
    files += got
    if not got:
        skipped.append("schedules: no run logs lr_mul or batch_size")
    got = plot_ord(runs, out_dir, svg)
    files += got
    if not got:
        skipped.append("ORD rho/spectral_frac: no run has rho or spectral_frac diag lines")
    got = plot_eff_rank(runs, out_dir, svg)
    files += got
    if not got:
        skipped.append("effective-rank heatmap: no run has eff_rank diag lines")
    rows = final_loss_table(runs, group_by, baseline)
    if rows:
        files.append(write_csv(rows, Path(out_dir) / "final_loss.csv"))
        files += plot_final_bars(rows, out_dir, svg, target=target)
    else:
        skipped.append("final-loss table and bars: no finished run")
    report = Report(files, skipped, rows, format_markdown(rows) if rows else "")
    if target is not None:
        groups = group_runs(runs, group_by)
        report.seed_stats = group_seed_stats(groups, target)
        report.hits = run_hits(groups, target)
        parts = []
        if report.seed_stats:
            files.append(write_rows_csv(report.seed_stats, Path(out_dir) / "speedrun_stats.csv",
                                        ["group", "target", "n", "mean", "std", "t", "p", "margin", "passes", "reached", "left_out"]))
            parts.append(f"speedrun statistics, target {target:g} (one-sided t-test, H1: mean < target;"
                         f" rule (target - mean)·√n ≥ {MARGIN_RULE:g}):\n\n" + format_seed_table(report.seed_stats))
        else:
            skipped.append("speedrun statistics: no finished run")
        files.append(write_rows_csv(report.hits, Path(out_dir) / "target_hits.csv",
                                    ["run", "group", "final_val_loss", "step", "train_time_ms"]))
        parts.append(f"first validation at or below {target:g}, per run:\n\n" + format_hits_table(report.hits, target))
        report.target_markdown = "\n\n".join(parts)
    return report


def write_rows_csv(rows: Sequence[Any], path: str | os.PathLike, cols: Sequence[str]) -> Path:
    """Dataclass rows as CSV (None and nan as empty cells), written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                d = asdict(r)
                w.writerow({k: ("" if d[k] is None or (isinstance(d[k], float) and math.isnan(d[k])) else d[k]) for k in cols})

    return _atomic_write(Path(path), write)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="log files or directories (default: logs/)")
    p.add_argument("--group_by", default="tag", metavar="tag|script|FIELD", help="group runs by tag (default), script or a config field")
    p.add_argument("--out", default="reports/plots", metavar="DIR", help="where figures and final_loss.csv go (default reports/plots)")
    p.add_argument("--x", choices=("step", "time"), help="x axis of the val loss figure (default: both)")
    p.add_argument("--last", type=int, metavar="N", help="the zoomed panel shows the last N steps (default: the last quarter)")
    p.add_argument("--svg", action="store_true", help="write SVG next to each PNG")
    p.add_argument("--baseline", default="auto", metavar="GROUP", help="baseline group for delta and p-value (default: auto; 'none' for none)")
    p.add_argument("--target", type=float, metavar="LOSS",
                   help="speedrun statistics against this val loss (e.g. 3.28): per group n, mean, std, one-sided"
                        " t-test p (H1: mean < LOSS), (LOSS - mean)*sqrt(n) >= 0.004; per run the step/time to LOSS")
    p.add_argument("--to_tensorboard", metavar="DIR", help="instead of figures: TensorBoard event files of the logs in DIR, one folder per run (needs tensorboard)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.target is not None and not (math.isfinite(args.target) and args.target > 0):
        raise UserError(f"--target {args.target}: must be a positive, finite val loss (e.g. 3.28)")
    if args.last is not None and args.last <= 0:
        raise UserError(f"--last {args.last}: must be a positive number of steps")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.to_tensorboard:
        from harness.trackers import logs_to_tensorboard

        for d in logs_to_tensorboard(args.paths or ["logs"], args.to_tensorboard):
            print(f"wrote {d}")
        return 0
    runs = load_runs(args.paths or ["logs"])
    check_out_dir(args.out)
    report = make_report(runs, args.group_by, args.out, x=args.x, last=args.last, svg=args.svg, baseline=args.baseline,
                         target=args.target)
    print(f"{len(runs)} runs, grouped by {args.group_by}")
    for f in report.files:
        print(f"wrote {f}")
    for s in report.skipped:
        print(f"skipped {s}")
    if report.markdown:
        print()
        print(report.markdown)
    if report.target_markdown:
        print()
        print(report.target_markdown)
    return 0


if __name__ == "__main__":
    run_cli(main)
