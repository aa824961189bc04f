"""plot_loss.py: every figure rendered (Agg) to a valid, non-blank PNG; the final-loss table
against numbers computed here (mean, std, Welch p-value); fixtures and partial logs."""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import stats

from runlog_fixtures import FIXTURES, FIXTURE_FINALS, val_curve, write_run

from base import UserError
import plot_loss
from harness.logs.runs import group_key

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png_drawn(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, path
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].var()) > 1e-3, f"{path} is blank"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("logs")
    for seed in range(3):
        write_run(d, f"base_s{seed}", tag="baseline", seed=seed, total=40)
    for seed in range(2):
        write_run(d, f"ord05_s{seed}", tag="ord0.5", seed=seed, total=40, offset=0.002, ord_diag=True,
                  script="train_gpt_muon_new.py", extra_config={"spectral_lr_mul": 0.5})
    write_run(d, "ord1_s0", tag="ord1.0", seed=0, total=40, offset=0.13, script="train_gpt_muon_new.py",
              eff_rank_diag=True, extra_config={"spectral_lr_mul": 1.0})
    write_run(d, "ord1_s1", tag="ord1.0", seed=1, total=40, stop_at=22, status=None, offset=0.13,
              script="train_gpt_muon_new.py", extra_config={"spectral_lr_mul": 1.0})  # still running
    write_run(d, "hot", tag="hot", total=40, stop_at=9, status="diverged", nan_at=8)
    with open(d / "cut.txt", "wb") as f:  # truncated mid-line, with a binary line
        f.write(b"runlog:1 run_id:cut\nconfig: {\"run_id\":\"cut\",\"tag\":\"cut\"}\n"
                b"step:0/40 val_loss:10.8000 train_time:0ms step_avg:0.00ms\n\xff\xfe\x00\nstep:10/40 val_loss:5.1")
    return d


def expected_finals(tag_seeds, offset):
    return [round(val_curve(40, 40, s, offset), 4) for s in tag_seeds]


def test_final_loss_table_numbers(runs_dir):
    runs = plot_loss.load_runs([runs_dir])
    rows = plot_loss.final_loss_table(runs, "tag")
    by = {r.group: r for r in rows}
    assert list(by) == ["baseline", "ord0.5", "ord1.0"]  # best first; hot and cut have no final loss
    base, half = expected_finals(range(3), 0.0), expected_finals(range(2), 0.002)
    one = expected_finals([0], 0.13)
    assert by["baseline"].is_baseline and by["baseline"].n == 3
    assert by["baseline"].mean == pytest.approx(statistics.mean(base), abs=1e-9)
    assert by["baseline"].std == pytest.approx(statistics.stdev(base), abs=1e-9)
    assert by["baseline"].best == min(base) and by["baseline"].delta == 0.0 and by["baseline"].p_value is None
    assert by["ord0.5"].delta == pytest.approx(statistics.mean(half) - statistics.mean(base), abs=1e-9)
    assert by["ord0.5"].p_value == pytest.approx(stats.ttest_ind(half, base, equal_var=False).pvalue, rel=1e-9)
    # one finished seed (the other still running): no std, no p-value, one left out
    assert by["ord1.0"].n == 1 and np.isnan(by["ord1.0"].std) and by["ord1.0"].p_value is None
    assert by["ord1.0"].left_out == 1 and by["ord1.0"].delta == pytest.approx(one[0] - statistics.mean(base), abs=1e-9)
    md = plot_loss.format_markdown(rows)
    assert md.splitlines()[2].startswith("| baseline (baseline) | 3 |") and "[+1 unfinished]" in md


def test_group_by_field_and_baselines(runs_dir):
    runs = plot_loss.load_runs([runs_dir])
    rows = plot_loss.final_loss_table(runs, "spectral_lr_mul")
    by = {r.group: r for r in rows}
    # the standard runs record no spectral_lr_mul: grouped by it they are the baseline, apart
    # from the ORD script's runs at 1.0 (ord1_s0 finished) and 0.5
    assert by["baseline"].n == 3 and by["baseline"].is_baseline and by["1.0"].n == 1 and by["0.5"].n == 2
    # older logs recorded the field's default (1.0) for standard runs: still the baseline
    old = runs[0].config | {"ord": False, "spectral_lr_mul": 1.0}
    assert group_key(type(runs[0])(**{**runs[0].__dict__, "config": old}), "spectral_lr_mul") == "baseline"
    assert {r.group for r in plot_loss.final_loss_table(runs, "script")} == {"train_gpt.py", "train_gpt_muon_new.py"}
    assert plot_loss.resolve_baseline(runs, "script") == "train_gpt.py"
    assert all(r.delta is None for r in plot_loss.final_loss_table(runs, "tag", baseline="none"))
    with pytest.raises(UserError, match="no such group"):
        plot_loss.final_loss_table(runs, "tag", baseline="nope")
    with pytest.raises(UserError, match="no run's config has that field"):
        plot_loss.check_group_by(runs, "no_such_field")


def test_every_figure_renders(runs_dir, tmp_path):
    runs = plot_loss.load_runs([runs_dir])
    out = tmp_path / "plots"
    rep = plot_loss.make_report(runs, "tag", out, svg=True)
    names = {p.name for p in rep.files}
    for stem in ("val_loss_step", "val_loss_time", "schedules", "ord_ord05_s0", "ord_ord05_s1", "eff_rank_ord1_s0", "final_loss"):
        assert f"{stem}.png" in names and f"{stem}.svg" in names, stem
        assert_png_drawn(out / f"{stem}.png")
        assert (out / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    assert rep.skipped == []
    with open(out / "final_loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["group"] for r in rows] == ["baseline", "ord0.5", "ord1.0"]
    assert float(rows[0]["mean"]) == pytest.approx(statistics.mean(expected_finals(range(3), 0.0)))
    assert not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_group_band_is_mean_and_std(runs_dir):
    runs = [r for r in plot_loss.load_runs([runs_dir]) if r.tag == "baseline"]
    steps, t, v, sd, n = plot_loss.group_band(runs)
    i = list(steps).index(20)
    vals = [round(val_curve(20, 40, s, 0.0), 4) for s in range(3)]
    assert v[i] == pytest.approx(np.mean(vals)) and sd[i] == pytest.approx(np.std(vals, ddof=1)) and n[i] == 3
    assert t[i] == pytest.approx(20 * 100 / 60000)


def test_fixtures_cli(tmp_path):
    out = tmp_path / "fx"
    r = subprocess.run([sys.executable, str(ROOT / "plot_loss.py"), str(FIXTURES), "--out", str(out), "--x", "time", "--last", "300"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped ORD rho/spectral_frac" in r.stdout and "skipped effective-rank heatmap" in r.stdout
    for name in ("val_loss_time", "schedules", "final_loss"):  # the fork's lr_mul gives a schedule
        assert_png_drawn(out / f"{name}.png")
    assert not (out / "val_loss_step.png").exists()
    table = [l for l in r.stdout.splitlines() if l.startswith("| track") or l.startswith("| fork")]
    assert len(table) == len(FIXTURE_FINALS) and table[0].startswith("| track_2_medium_2025-04-22_Record8 | 1 | 2.9198")
    with open(out / "final_loss.csv") as f:
        got = {row["group"]: float(row["mean"]) for row in csv.DictReader(f)}
    assert got == pytest.approx({k: v[1] for k, v in FIXTURE_FINALS.items()})


def test_partial_logs_only(tmp_path):
    d = tmp_path / "logs"
    write_run(d, "r0", tag="a", total=40, stop_at=17, status=None)
    write_run(d, "r1", tag="a", seed=1, total=40, stop_at=12, status=None)
    runs = plot_loss.load_runs([d])
    rep = plot_loss.make_report(runs, "tag", tmp_path / "out", x="step")
    assert_png_drawn(tmp_path / "out" / "val_loss_step.png")
    assert rep.rows == [] and any("no finished run" in s for s in rep.skipped)


def test_cli_errors(tmp_path):
    """One line each, naming the value or path given and what is allowed."""
    groups = sorted(p.stem for p in FIXTURES.glob("*.txt"))  # modded logs group by file name
    for args, message in (
        ([str(tmp_path / "none")], f"error: {tmp_path / 'none'}: no such log file or directory"),
        ([str(FIXTURES), "--last", "0"], "error: --last 0: must be a positive number of steps"),
        ([str(FIXTURES), "--baseline", "zzz"],
         f"error: --baseline zzz: no such group (groups by tag: {', '.join(groups)})"),
    ):
        r = subprocess.run([sys.executable, str(ROOT / "plot_loss.py"), *args, "--out", str(tmp_path / "o")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip() == message, r.stderr
