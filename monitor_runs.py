"""A live table of training runs from their text logs (ours and modded-nanogpt's).

    python monitor_runs.py                       # the runs in logs/, once
    python monitor_runs.py logs/ --watch 5       # refresh in place every 5 s until all runs end
    python monitor_runs.py --sweep lr1 --watch 10
    python monitor_runs.py --once --format json  # for scripts (also csv)
    python monitor_runs.py --once --format json --target 3.28   # steps/time to a val loss

One row per run: status, progress, last train loss, last and best val loss, step_avg, elapsed
training time, ETA; then the groups (by tag) compared at a common step. json and csv also give,
per run, steps_to_target and time_to_target_ms: the step and train time of its first validation
at or below --target (default 3.28, the short track's), null/empty when it has not got there. Each refresh reads only
what was appended to each log since the last one.

Status: the log's status line (finished, diverged, failed, preempted, interrupted); otherwise a
non-finite loss is diverged, a validation at the last step is finished, and a log not written
for longer than max(--stale_min, --stale_factor x step_avg) (60 s, 10x) is stale.
`--watch` exits by itself once no run is running (stale counts as ended); Ctrl-C exits cleanly.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from typing import Any, Sequence

from base import UserError, run_cli
from base.cli import ArgumentParser
from harness.speedrun_stats import DEFAULT_TARGET
from harness.logs.runs import (
    ENDED,
    STALE_FACTOR,
    STALE_MIN_S,
    ComparisonRow,
    Monitor,
    RunSummary,
)

STATUS_STYLE = {
    "running": "bold green",
    "finished": "blue",
    "failed": "bold red",
    "diverged": "bold magenta",
    "stale": "yellow",
    "preempted": "yellow",
    "interrupted": "yellow",
}

CSV_FIELDS = [
    "run_id", "tag", "status", "step", "total", "progress", "train_loss", "val_loss", "val_step",
    "best_val_loss", "best_val_step", "final_val_loss", "step_avg_ms", "elapsed_s", "eta_s",
    "last_write", "seed", "script", "path", "target", "steps_to_target", "time_to_target_ms", "notes",
]


# ------------------------------------------------------------------------------------------
# Formatting


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}ms"


def all_ended(summaries: Sequence[RunSummary]) -> bool:
    return bool(summaries) and all(s.status in ENDED for s in summaries)


def to_json(summaries: Sequence[RunSummary], comparison: Sequence[ComparisonRow]) -> str:
    return json.dumps(
        {
            "runs": [s.to_dict() for s in summaries],
            "comparison": [vars(c) for c in comparison],
        },
        indent=2,
    )


def to_csv(summaries: Sequence[RunSummary]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for s in summaries:
        d = s.to_dict()
        d["notes"] = "; ".join(s.notes)
        w.writerow(d)
    return buf.getvalue()


def render(summaries: Sequence[RunSummary], comparison: Sequence[ComparisonRow], title: str = ""):
    """A rich renderable: the run table and the comparison by tag."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title or None, expand=False, header_style="bold")
    show_tag = any(s.tag for s in summaries)
    columns = [("run", "left"), ("tag", "left"), ("status", "left"), ("step", "right"), ("progress", "left"),
               ("train", "right"), ("val", "right"), ("best val", "right"), ("step_avg", "right"),
               ("elapsed", "right"), ("ETA", "right"), ("notes", "left")]
    if not show_tag:
        columns.pop(1)
    for name, just in columns:
        # numbers never wrap or shrink; long run ids fold, notes wrap
        table.add_column(name, justify=just, no_wrap=name not in ("run", "notes"),
                         overflow="fold" if name == "run" else "ellipsis",
                         min_width=len(name) if name not in ("run", "notes") else None)
    for s in summaries:
        step = "-" if s.step is None else f"{s.step}/{s.total}"
        if s.progress is not None:
            bar: Any = Table.grid(padding=(0, 1))
            bar.add_row(ProgressBar(total=1.0, completed=s.progress, width=12), f"{100 * s.progress:3.0f}%")
        else:
            bar = Text("-")
        best = fmt_loss(s.best_val_loss) + (f" @{s.best_val_step}" if s.best_val_step is not None else "")
        cells = [
            s.run_id, s.tag or "-", Text(s.status, style=STATUS_STYLE.get(s.status, "")), step, bar,
            fmt_loss(s.train_loss), fmt_loss(s.val_loss), best, fmt_ms(s.step_avg_ms),
            fmt_duration(s.elapsed_s), fmt_duration(s.eta_s),
            Text("; ".join(s.notes), style="red" if s.garbage_lines or s.partial_line else ""),
        ]
        if not show_tag:
            cells.pop(1)
        table.add_row(*cells)
    if not summaries:
        table.add_row("(no runs)", *[""] * (len(columns) - 1))
    parts: list[Any] = [table]
    if comparison:
        comp = Table(title=f"finished and running runs by tag, at step {comparison[0].step}", header_style="bold")
        for name in ("tag", "runs", "val loss", "Δ best"):
            comp.add_column(name, justify="left" if name == "tag" else "right")
        for c in comparison:
            comp.add_row(c.group, str(c.n), f"{c.val_loss:.4f}", "best" if c.delta == 0 else f"+{c.delta:.4f}")
        parts.append(comp)
    return Group(*parts)


# ------------------------------------------------------------------------------------------
# Entry


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=["logs"], help="log files or directories (default: logs/)")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh in place every SECONDS until all runs end")
    p.add_argument("--once", action="store_true", help="print once and exit (the default without --watch)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format (default table)")
    p.add_argument("--filter", metavar="TEXT", help="only runs whose id, tag or file name contains TEXT")
    p.add_argument("--sweep", metavar="ID", help="only the runs of the sweep manifest <log dir>/sweeps/ID.json")
    p.add_argument("--stale_min", type=float, default=STALE_MIN_S, metavar="SECONDS",
                   help=f"a run with no status line is stale after SECONDS without a write (default {STALE_MIN_S:g})")
    p.add_argument("--stale_factor", type=float, default=STALE_FACTOR, metavar="X",
                   help=f"... or after X times its step_avg, whichever is longer (default {STALE_FACTOR:g})")
    p.add_argument("--target", type=float, default=DEFAULT_TARGET, metavar="LOSS",
                   help=f"json/csv: steps_to_target and time_to_target_ms, the first validation at or below LOSS (default {DEFAULT_TARGET:g})")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not (math.isfinite(args.target) and args.target > 0):
        raise UserError(f"--target {args.target}: must be a positive, finite val loss (e.g. 3.28)")
    if args.watch is not None and (args.once or args.format != "table"):
        raise UserError("--watch shows the live table; --once/--format json|csv print once (choose one)")
    if args.watch is not None and not args.watch > 0:
        raise UserError(f"--watch {args.watch}: the refresh interval must be > 0 seconds")
    if args.stale_min < 0 or args.stale_factor < 0:
        raise UserError("--stale_min and --stale_factor must be >= 0")
    return args


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal and not console.is_jupyter:
        # piped or redirected: rich would fold the table to 80 columns
        console = Console(width=max(console.width, 180))
    return console


def print_once(mon: Monitor, fmt: str) -> None:
    summaries, comparison = mon.refresh()
    if fmt == "json":
        sys.stdout.write(to_json(summaries, comparison) + "\n")
    elif fmt == "csv":
        sys.stdout.write(to_csv(summaries))
    else:
        _console().print(render(summaries, comparison))


def watch(mon: Monitor, interval: float) -> None:
    """Refresh in place on a terminal (rich Live); piped or redirected, print the table again
    whenever a run changed. Returns once no run is running."""
    from rich.live import Live

    console = _console()
    summaries, comparison = mon.refresh()
    title = lambda: f"runs in {', '.join(map(str, mon.tracker.paths))} - {time.strftime('%H:%M:%S')} - every {interval:g}s, Ctrl-C to quit"
    if console.is_terminal:
        with Live(render(summaries, comparison, title()), console=console, auto_refresh=False, transient=False) as live:
            while not all_ended(summaries):
                time.sleep(interval)
                summaries, comparison = mon.refresh()
                live.update(render(summaries, comparison, title()), refresh=True)
    else:
        shown = None
        while True:
            state = [(s.run_id, s.status, s.step, s.val_loss, s.notes) for s in summaries]
            if state != shown:
                console.print(render(summaries, comparison, title()))
                console.file.flush()
                shown = state
            if all_ended(summaries):
                break
            time.sleep(interval)
            summaries, comparison = mon.refresh()
    console.print("all runs have ended")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mon = Monitor(args.paths, filter_text=args.filter, sweep=args.sweep,
                  stale_min_s=args.stale_min, stale_factor=args.stale_factor, target=args.target)
    if args.watch is None:
        print_once(mon, args.format)
    else:
        watch(mon, args.watch)
    return 0


if __name__ == "__main__":
    run_cli(main, broken_pipe_ok=True)
