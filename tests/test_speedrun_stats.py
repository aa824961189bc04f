"""harness/speedrun_stats.py (steps/time to a target loss; the one-sided t-test and the
optimizer track's (target - mean) * sqrt(n) >= 0.004 rule) against scipy and numbers computed
by hand, and how plot_loss.py --target and monitor_runs.py --target show them. Logs are written
here with harness.logs.format's writer; figures are real matplotlib renders."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import plot_loss
from harness.logs.format import RunLogWriter, read_log
from harness.logs.runs import group_runs
from harness.speedrun_stats import (DEFAULT_TARGET, MARGIN_RULE, format_seed_table, group_seed_stats, margin,
                                    run_hits, seed_stats, target_hit, ttest_less)

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(d: Path, run_id: str, vals: dict[int, float], *, tag: str = "g", total: int | None = None,
              step_ms: float = 250.0, status: str | None = "finished", seed: int = 0) -> Path:
    """A run log with the real writer: a validation at each step of `vals` (train_time = step x
    step_ms), a train line between, and a status line with the last validation as final loss."""
    total = total if total is not None else max(vals)
    path = d / f"{run_id}.txt"
    w = RunLogWriter(path, run_id, echo=False)
    w.header([("train_gpt.py", "print('x')\n")], {"python": "3.11.7"},
             {"run_id": run_id, "tag": tag, "seed": seed, "script": "train_gpt.py"})
    for s in sorted(vals):
        if s > 0:
            w.step(s, total, train_time_ms=s * step_ms - 1, step_avg_ms=step_ms, train_loss=vals[s] + 0.01)
        w.step(s, total, val_loss=vals[s], train_time_ms=s * step_ms, step_avg_ms=step_ms if s else 0.0)
    if status == "finished":
        w.status("finished", final_val_loss=vals[max(vals)], step=max(vals))
    elif status is not None:
        w.status(status, step=max(vals))
    w.close()
    return path


# ------------------------------------------------------------------------------------------
# the maths


def test_target_hit_first_validation_at_or_below(tmp_path):
    p = write_log(tmp_path, "r", {0: 10.8, 100: 4.1, 200: 3.2801, 300: 3.2799, 400: 3.27, 500: 3.2790})
    hit = target_hit(read_log(p), 3.28)
    assert (hit.step, hit.train_time_ms) == (300, 300 * 250.0)
    # exactly at the target counts (<=); a target never reached is None
    p2 = write_log(tmp_path, "eq", {0: 10.8, 50: 3.3, 60: 3.28, 70: 3.27})
    assert target_hit(read_log(p2), 3.28).step == 60
    assert target_hit(read_log(p), 3.0) is None
    # a non-finite validation never counts
    p3 = write_log(tmp_path, "nan", {0: 10.8, 10: float("nan"), 20: 3.1}, status=None)
    assert target_hit(read_log(p3), 3.28).step == 20


def test_ttest_and_margin_by_hand():
    # n=3, mean 3.278, sd 0.002: t = (3.278 - 3.28) / (0.002 / sqrt 3) = -sqrt(3); with 2 degrees
    # of freedom the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so p = 1/2 - sqrt(3) / (2 sqrt 5)
    vals = [3.276, 3.278, 3.280]
    t, p = ttest_less(vals, 3.28)
    assert t == pytest.approx(-math.sqrt(3), rel=1e-9)
    assert p == pytest.approx(0.5 - math.sqrt(3) / (2 * math.sqrt(5)), rel=1e-9)
    assert margin(vals, 3.28) == pytest.approx(0.002 * math.sqrt(3), rel=1e-9)  # 0.00346 < 0.004: fails
    s = seed_stats_of(vals)
    assert s.n == 3 and s.mean == pytest.approx(3.278) and s.std == pytest.approx(0.002, rel=1e-9)
    assert not s.passes
    # n=4, mean 3.2765: (3.28 - 3.2765) * 2 = 0.007 >= 0.004 passes
    s = seed_stats_of([3.275, 3.276, 3.277, 3.278])
    assert s.margin == pytest.approx(0.007, rel=1e-9) and s.passes


def test_ttest_matches_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10, 40):
        vals = list(3.279 + 0.0015 * rng.standard_normal(n))
        ref = stats.ttest_1samp(vals, 3.28, alternative="less")
        t, p = ttest_less(vals, 3.28)
        assert t == pytest.approx(float(ref.statistic), rel=1e-12) and p == pytest.approx(float(ref.pvalue), rel=1e-12)
        assert margin(vals, 3.28) == pytest.approx((3.28 - np.mean(vals)) * np.sqrt(n), rel=1e-12)
    assert ttest_less([3.27], 3.28) is None  # one run: no t-test
    assert ttest_less([3.27, 3.27], 3.28) is None  # no spread: undefined


def seed_stats_of(vals):
    from harness.logs.format import RunLog

    runs = [RunLog(path=f"r{i}.txt", status="finished", status_fields={"final_val_loss": v}) for i, v in enumerate(vals)]
    return seed_stats("g", runs, 3.28)


def test_group_stats_from_logs(tmp_path):
    finals_a = [3.2771, 3.2783, 3.2769, 3.2790]
    finals_b = [3.2812, 3.2795]
    for i, f in enumerate(finals_a):
        write_log(tmp_path, f"a{i}", {0: 10.8, 500: 3.4, 900: 3.29 - 0.006 * i, 1000: f}, tag="a", seed=i)
    for i, f in enumerate(finals_b):
        write_log(tmp_path, f"b{i}", {0: 10.8, 500: 3.4, 1000: f}, tag="b", seed=i)
    write_log(tmp_path, "b_running", {0: 10.8, 500: 3.35}, tag="b", total=1000, status=None)
    groups = group_runs([read_log(p) for p in sorted(tmp_path.glob("*.txt"))], "tag")
    rows = {r.group: r for r in group_seed_stats(groups)}
    assert list(rows) == ["a", "b"]  # lowest mean first
    a, b = rows["a"], rows["b"]
    assert a.target == DEFAULT_TARGET == 3.28 and a.n == 4 and a.mean == pytest.approx(np.mean(finals_a), abs=1e-12)
    assert a.std == pytest.approx(np.std(finals_a, ddof=1), abs=1e-12)
    ref = stats.ttest_1samp(finals_a, 3.28, alternative="less")
    assert (a.t, a.p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-9)
    assert a.margin == pytest.approx((3.28 - np.mean(finals_a)) * 2, rel=1e-9) and a.passes is (a.margin >= MARGIN_RULE)
    assert a.reached == 4 and b.reached == 1 and b.left_out == 1 and b.n == 2 and not b.passes
    assert b.p > 0.5  # mean above the target
    table = format_seed_table([a, b])
    assert "| a | 4 | " in table and "| b [+1 unfinished] | 2 |" in table and "| 1/3 |" in table
    hits = {h.run: h for h in run_hits(groups)}
    assert (hits["a2"].step, hits["a2"].train_time_ms) == (900, 900 * 250.0)  # 3.278 at step 900
    assert hits["a1"].step == 1000  # 3.284 at step 900, then its final 3.2783
    assert hits["b0"].step is None and hits["b1"].step == 1000 and hits["b_running"].step is None


# ------------------------------------------------------------------------------------------
# plot_loss.py --target, the bar chart's baseline, colours and legends


@pytest.fixture
def seeds_dir(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    rng = np.random.default_rng(1)
    finals, curves = {}, {}
    for g, base in (("baseline", 3.2795), ("ord", 3.2760)):
        for i in range(3):
            f = base + 0.0008 * float(rng.standard_normal())
            curve = {s: round(f + 7.5 * (math.exp(-8 * s / 200) - math.exp(-8)), 4) for s in range(0, 201, 25)}
            finals.setdefault(g, []).append(curve[200])
            curves[f"{g}_s{i}"] = curve
            write_log(d, f"{g}_s{i}", curve, tag=g, seed=i, step_ms=100.0)
    return d, finals, curves


def test_plot_loss_target_cli(seeds_dir, tmp_path):
    d, finals, curves = seeds_dir
    out = tmp_path / "plots"
    r = subprocess.run([sys.executable, str(ROOT / "plot_loss.py"), str(d), "--out", str(out), "--target", "3.28"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = next(l for l in lines if l.startswith("| group | n | mean"))
    assert head.split(" | ")[4:8] == ["t", "p (H1: mean < 3.28)", "(target - mean)·√n", "≥ 0.004"]
    for g, vals in finals.items():
        row = next(l for l in lines if l.startswith(f"| {g} | 3 | {np.mean(vals):.4f} |"))
        ref = stats.ttest_1samp(vals, 3.28, alternative="less")
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == f"{ref.statistic:.3f}" and cells[5] == f"{ref.pvalue:.3g}"
        m = (3.28 - np.mean(vals)) * math.sqrt(3)
        assert cells[6] == f"{m:+.4f}" and cells[7] == ("pass" if m >= 0.004 else "fail")
    # per run: the first validation at or below 3.28 (train_time = step x 100 ms)
    with open(out / "target_hits.csv") as f:
        hits = {row["run"]: row for row in csv.DictReader(f)}
    assert set(hits) == set(curves)
    for run, curve in curves.items():
        first = next((s for s in sorted(curve) if curve[s] <= 3.28), None)
        h = hits[run]
        row = next(l for l in lines if l.startswith(f"| {run} |"))
        if first is not None:
            assert (int(h["step"]), float(h["train_time_ms"])) == (first, first * 100.0)
            assert row.endswith(f"| {first} | {first / 10:.1f}s |")
        else:
            assert h["step"] == "" and h["train_time_ms"] == "" and row.endswith("| - | never |")
    assert any(h["step"] for h in hits.values()) and not all(h["step"] for h in hits.values())
    with open(out / "speedrun_stats.csv") as f:
        got = {row["group"]: row for row in csv.DictReader(f)}
    assert float(got["ord"]["p"]) == pytest.approx(stats.ttest_1samp(finals["ord"], 3.28, alternative="less").pvalue, rel=1e-9)
    for name in ("val_loss_step", "val_loss_time", "final_loss"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    bad = subprocess.run([sys.executable, str(ROOT / "plot_loss.py"), str(d), "--out", str(out), "--target", "nan"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --target nan: must be a positive, finite val loss (e.g. 3.28)"


def test_final_bars_start_near_the_data(seeds_dir, tmp_path):
    d, finals, _ = seeds_dir
    rows = plot_loss.final_loss_table(plot_loss.load_runs([d]), "tag")
    fig = plot_loss.final_bars_figure(rows)
    ax = fig.axes[0]
    bottom, top = ax.get_ylim()
    lowest = min(r.mean - r.std for r in rows)
    assert 3.0 < bottom < min(lowest, min(min(v) for v in finals.values()))  # not 0; below every bar's error bar
    assert bottom > lowest - 0.02 and top > max(r.mean + r.std for r in rows)
    # the bars rise from that baseline, to the group means; error bars are the seed std
    patches = [p for p in ax.patches]
    assert [p.get_y() for p in patches] == pytest.approx([bottom] * len(rows))
    assert [p.get_y() + p.get_height() for p in patches] == pytest.approx([r.mean for r in rows])
    caps = [c for c in ax.containers if hasattr(c, "errorbar") and c.errorbar is not None][0].errorbar
    seg = caps.lines[2][0].get_segments()
    assert [s[1][1] - s[0][1] for s in seg] == pytest.approx([2 * r.std for r in rows])
    files = plot_loss.plot_final_bars(rows, tmp_path, target=3.28)
    assert files[0].is_file() and files[0].read_bytes()[:8] == PNG_MAGIC


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_many_groups_colour_map_and_legend_outside(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    values = [0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 10.0]
    for i, v in enumerate(values):
        curve = {s: round(3.28 + 0.001 * i + 7.5 * math.exp(-8 * s / 100), 4) for s in range(0, 101, 10)}
        write_log(d, f"r{i}", curve, tag=f"{v}")
    runs = plot_loss.load_runs([d])
    colors = plot_loss.group_colors(str(v) for v in values)
    assert len({tuple(c) for c in colors.values()}) == len(values)  # no colour repeats
    # a continuous map in numeric order: 10.0 is last, not between 1.0 and 2.0
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    assert tuple(colors["0"]) == tuple(cmap(0.0)) and tuple(colors["10.0"]) == tuple(cmap(0.92))
    fig = plot_loss.val_loss_figure(runs, "tag", x="step", target=3.28)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not _overlap(box, ax.get_window_extent(renderer)), "the legend covers an axes"
    labels = [t.get_text() for t in legends[0].get_texts()]
    assert labels[:len(values)] == [str(v) for v in values] and labels[-1] == "target 3.28"
    out = plot_loss.plot_val_loss(runs, "tag", tmp_path / "p", x="step", target=3.28)
    assert out[0].read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------
# monitor_runs.py --format json --target


def test_monitor_json_steps_to_target(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    write_log(d, "fast", {0: 10.8, 100: 3.5, 200: 3.2795, 300: 3.27}, step_ms=50.0)
    write_log(d, "slow", {0: 10.8, 100: 3.6, 200: 3.30, 300: 3.285}, step_ms=50.0)

    def runs(*extra):
        r = subprocess.run([sys.executable, str(ROOT / "monitor_runs.py"), str(d), "--once", "--format", "json", *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return {x["run_id"]: x for x in json.loads(r.stdout)["runs"]}

    got = runs()  # default target 3.28
    assert (got["fast"]["steps_to_target"], got["fast"]["time_to_target_ms"], got["fast"]["target"]) == (200, 10000.0, 3.28)
    assert got["slow"]["steps_to_target"] is None and got["slow"]["time_to_target_ms"] is None
    got = runs("--target", "3.3")
    assert got["fast"]["steps_to_target"] == 200 and got["slow"]["steps_to_target"] == 200
    assert got["slow"]["time_to_target_ms"] == 10000.0
    r = subprocess.run([sys.executable, str(ROOT / "monitor_runs.py"), str(d), "--once", "--format", "csv", "--target", "3.29"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    rows = {row["run_id"]: row for row in csv.DictReader(r.stdout.splitlines())}
    assert rows["fast"]["steps_to_target"] == "200" and rows["slow"]["steps_to_target"] == "300"
    bad = subprocess.run([sys.executable, str(ROOT / "monitor_runs.py"), str(d), "--once", "--target", "-1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --target -1.0: must be a positive, finite val loss (e.g. 3.28)"
