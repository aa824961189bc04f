"""Figures and a final-loss table from run logs (ours and modded-nanogpt's), finished or running.

    python plot_loss.py                                # the runs in logs/
    python plot_loss.py logs/ other/run.txt --group-by spectral_lr_mul --out reports/plots --svg
    python plot_loss.py logs/ --x time --last 200 --baseline baseline

Figures (PNG; SVG too with --svg), each skipped with a note when no run has its data:
- val_loss_step / val_loss_time: val loss of every run, coloured by group, the seeds of a group
  as mean +- std band, with a zoomed panel on the last N steps (--last; default the last quarter);
- schedules: LR multiplier and batch size against step;
- ord_<run>: rho and spectral_frac per layer over training (ORD runs' diag lines);
- eff_rank_<run>: effective rank heatmap, layer x step (diagnostics runs);
- final_loss: the final-loss table as bars (mean +- std).
The final-loss table (markdown on stdout, final_loss.csv in --out): per group n, mean +- std,
best, delta vs the baseline group, and Welch's t-test p-value against it where both groups have
>= 2 runs. Baseline: --baseline GROUP, default the group of the runs tagged `baseline*` or run
by train_gpt.py (`--baseline none` for none).

Group keys (--group-by): tag (an empty tag falls back to the script's stem; modded-nanogpt logs,
which have no config, to their file stem), script, or any config FIELD (modded logs: "modded").

Every function is importable, from harness.plots (the library; experiments.report uses it) or here:
load_runs, final_loss_table, format_markdown, write_csv, plot_val_loss, plot_schedules, plot_ord,
plot_eff_rank, plot_final_bars, and make_report (all at once).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from base import UserError, run_cli
from harness.plots import (  # the library (also experiments.report's); `import plot_loss` keeps every name
    DPI,
    FinalLossRow,
    check_group_by,
    check_out_dir,
    final_loss_table,
    format_markdown,
    group_band,
    group_colors,
    has_diag,
    is_run_log,
    load_runs,
    plot_eff_rank,
    plot_final_bars,
    plot_ord,
    plot_schedules,
    plot_val_loss,
    resolve_baseline,
    save_figure,
    write_csv,
)
from harness.runlog import RunLog

__all__ = [
    "DPI", "FinalLossRow", "Report", "check_group_by", "check_out_dir", "final_loss_table", "format_markdown",
    "group_band", "group_colors", "has_diag", "is_run_log", "load_runs", "main", "make_report", "plot_eff_rank",
    "plot_final_bars", "plot_ord", "plot_schedules", "plot_val_loss", "resolve_baseline", "save_figure", "write_csv",
]


# ------------------------------------------------------------------------------------------
# Everything at once


@dataclass
class Report:
    files: list[Path]
    skipped: list[str]
    rows: list[FinalLossRow]
    markdown: str


def make_report(
    runs: Sequence[RunLog],
    group_by: str = "tag",
    out_dir: str | os.PathLike = "reports/plots",
    *,
    x: str | None = None,
    last: int | None = None,
    svg: bool = False,
    baseline: str | None = "auto",
) -> Report:
    """All figures and the final-loss table; `x` None draws val loss against both step and time."""
    if not runs:
        raise UserError("no run logs to plot")
    check_group_by(runs, group_by)
    baseline = resolve_baseline(runs, group_by, baseline)  # a bad --baseline fails before any drawing
    baseline = baseline or "none"
    files: list[Path] = []
    skipped: list[str] = []
    for axis in ([x] if x else ["step", "time"]):
        got = plot_val_loss(runs, group_by, out_dir, x=axis, last=last, svg=svg)
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
        files += plot_final_bars(rows, out_dir, svg)
    else:
        skipped.append("final-loss table and bars: no finished run")
    return Report(files, skipped, rows, format_markdown(rows) if rows else "")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="log files or directories (default: logs/)")
    p.add_argument("--group-by", default="tag", metavar="tag|script|FIELD", help="group runs by tag (default), script or a config field")
    p.add_argument("--out", default="reports/plots", metavar="DIR", help="where figures and final_loss.csv go (default reports/plots)")
    p.add_argument("--x", choices=("step", "time"), help="x axis of the val loss figure (default: both)")
    p.add_argument("--last", type=int, metavar="N", help="the zoomed panel shows the last N steps (default: the last quarter)")
    p.add_argument("--svg", action="store_true", help="write SVG next to each PNG")
    p.add_argument("--baseline", default="auto", metavar="GROUP", help="baseline group for delta and p-value (default: auto; 'none' for none)")
    args = p.parse_args(argv)
    if args.last is not None and args.last <= 0:
        raise UserError(f"--last {args.last}: must be a positive number of steps")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = load_runs(args.paths or ["logs"])
    check_out_dir(args.out)
    report = make_report(runs, args.group_by, args.out, x=args.x, last=args.last, svg=args.svg, baseline=args.baseline)
    print(f"{len(runs)} runs, grouped by {args.group_by}")
    for f in report.files:
        print(f"wrote {f}")
    for s in report.skipped:
        print(f"skipped {s}")
    if report.markdown:
        print()
        print(report.markdown)
    return 0


if __name__ == "__main__":
    run_cli(main)
