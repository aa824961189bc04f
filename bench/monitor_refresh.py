"""Monitor refresh: incremental (only the appended bytes) against a full re-parse.

    python bench/monitor_refresh.py [--logs 200] [--lines 5000] [--repeats 3]

Writes N logs of M step lines with the real RunLogWriter, follows them with the monitor's
Monitor, appends one step line to each, and times `Monitor.refresh()` (stat + read of the new
bytes + summaries + comparison) against parsing every log from scratch and summarizing it.
Goal: incremental <= 0.1x the full re-parse.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from base.cli import ArgumentParser
from harness.logs.format import RunLogWriter, find_logs, read_log
from harness.logs.runs import Monitor, compare_at_common_step, summarize


def write_logs(d: Path, n: int, lines: int) -> list[RunLogWriter]:
    writers = []
    for i in range(n):
        w = RunLogWriter(d / f"run{i:04d}.txt", f"run{i:04d}", echo=False)
        w.header([("train_gpt.py", "print('hello')\n" * 50)], {"python": "3.11"}, {"run_id": f"run{i:04d}", "tag": f"t{i % 4}", "seed": i})
        for s in range(lines):
            if s % 50 == 0:
                w.step(s, 2 * lines, val_loss=4 - s / lines, train_time_ms=s * 100.0, step_avg_ms=100.0, lr_mul=1.0, batch_size=262144)
            else:
                w.step(s, 2 * lines, train_time_ms=s * 100.0, step_avg_ms=100.0, train_loss=4.1 - s / lines, lr_mul=1.0, batch_size=262144)
        writers.append(w)
    return writers


def full_reparse(d: Path) -> None:
    logs = [read_log(p) for p in find_logs([d])]
    now = time.time()
    [summarize(l, None, now) for l in logs]
    compare_at_common_step(logs)


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logs", type=int, default=200, metavar="N", help="run logs written and followed (default 200)")
    ap.add_argument("--lines", type=int, default=5000, metavar="M", help="step lines per log (default 5000)")
    ap.add_argument("--repeats", type=int, default=3, metavar="N", help="timed repeats (default 3)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        writers = write_logs(d, args.logs, args.lines)
        print(f"wrote {args.logs} logs x {args.lines} step lines in {time.perf_counter() - t0:.1f}s")
        mon = Monitor([str(d)])
        t0 = time.perf_counter()
        mon.refresh()
        first = time.perf_counter() - t0
        inc, full = [], []
        step = args.lines
        for _ in range(args.repeats):
            for w in writers:  # one new line per log
                w.step(step, 2 * args.lines, train_time_ms=step * 100.0, step_avg_ms=100.0, train_loss=3.0, lr_mul=1.0, batch_size=262144)
            step += 1
            t0 = time.perf_counter()
            summaries, _ = mon.refresh()
            inc.append(time.perf_counter() - t0)
            assert all(s.step == step - 1 for s in summaries), "refresh missed the appended line"
            t0 = time.perf_counter()
            full_reparse(d)
            full.append(time.perf_counter() - t0)
        for w in writers:
            w.close()
    best_inc, best_full = min(inc), min(full)
    print(f"first read (monitor start): {first * 1000:.0f} ms")
    print(f"incremental refresh, 1 new line per log: {best_inc * 1000:.1f} ms (best of {args.repeats})")
    print(f"full re-parse of every log:             {best_full * 1000:.1f} ms (best of {args.repeats})")
    print(f"ratio incremental / full: {best_inc / best_full:.4f}x (goal <= 0.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
