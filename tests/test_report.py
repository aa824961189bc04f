"""experiments.report --quick end to end: every section, figure and number, from real runs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.runlog import find_logs, read_log

ROOT = Path(__file__).resolve().parents[1]
STUDIES = "gradient_rank,digits,rank_manipulation,gradient_snr"


def _report(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.report", "--quick", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    proc = _report(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_section_and_summary_row(quick_report):
    text = (quick_report / "REPORT.md").read_text(encoding="utf-8")
    heads = re.findall(r"^## (.+)$", text, flags=re.M)
    assert heads[0] == "Summary" and heads[-1] == "Reproducing"
    for i, start in enumerate(["Gradient effective rank", "The small classification study", "Rank manipulation",
                               "Gradient signal-to-noise", "Update/weight alignment", "The ORD sweep"], 1):
        assert heads[i].startswith(f"{i}. {start}"), heads
    summary = text.split("## Summary", 1)[1].split("**Against REFERENCE.md**", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| (") or line.startswith("| ORD")]
    assert [r.split("|")[1].strip()[:9] for r in rows] == ["(1) Does ", "(2) Do Ad", "(3) Does ", "(4) Which",
                                                           "ORD: does", "ORD: is P"]
    answers = [r.split("|")[2].strip() for r in rows]
    for a in answers[:3] + answers[5:]:
        assert a in ("yes", "no", "inconclusive", "better", "worse"), answers
    assert answers[3] == "inconclusive" or "spectrum" in answers[3] or "rank" in answers[3]
    assert answers[4] in ("no", "inconclusive", "only against Polar(G_perp) alone, not against the standard run") \
        or answers[4].startswith("yes, at m = ")
    assert text.count("**Answer.**") == 6
    assert "Quick mode" in text


def test_every_figure_exists_and_is_not_blank(quick_report):
    from matplotlib import image

    text = (quick_report / "REPORT.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    folders = {Path(p).parts[0] for p in links}
    assert folders == {"gradient_rank", "digits", "rank_manipulation", "gradient_snr", "weight_dynamics",
                       "ord_sweep", "ord_four_way", "ord_rho"}
    assert len(links) >= 16
    for rel in links:
        img = image.imread(quick_report / rel)
        assert img.ndim == 3 and img.shape[0] > 100 and float(np.std(img[..., :3])) > 0.02, rel


def test_sweep_numbers_come_from_the_run_logs(quick_report):
    """The final-loss table's means are the logs' final val losses; runs.json has every run's
    resolved config, seed and commit."""
    results = json.loads((quick_report / "results.json").read_text())
    runs = json.loads((quick_report / "runs.json").read_text())
    logs = [read_log(p) for p in find_logs([quick_report / "runs"])]
    assert len(logs) == len(runs["runs"]) == 16  # 8 groups x 2 seeds
    groups = results["ord_sweep"]["groups"]
    assert set(groups) == {"baseline_std", "polar_gperp", "projected_mean_1", "spectral_lr_0", "spectral_lr_0.01",
                           "spectral_lr_0.1", "spectral_lr_0.5", "spectral_lr_1"}
    for tag, g in groups.items():
        vals = sorted(l.final_val_loss for l in logs if l.tag == tag)
        assert g["n"] == 2 and sorted(g["values"]) == vals
        assert math.isclose(g["mean"], float(np.mean(vals)), rel_tol=1e-12)
        assert (g["p"] is None) == (tag == "baseline_std")
    for r in runs["runs"]:
        cfg = r["config"]
        assert r["status"] == "finished" and r["seed"] in (0, 1) and cfg["seed"] == r["seed"]
        assert cfg["compact_vocab"] is True and cfg["num_layers"] == 2
        assert r["git_commit"] == runs["commit"]
        if r["tag"] == "polar_gperp":  # Polar(G_perp): the projected form, nothing added back
            assert cfg["ord"] and cfg["ord_form"] == "projected" and cfg["spectral_lr_mul"] == 0
        if r["tag"].startswith("spectral_lr_"):  # the fork's ORD
            assert (cfg["ord_form"], cfg["ord_units"]) == ("interpolated", "fork")
            assert cfg["spectral_lr_mul"] == float(r["tag"].rsplit("_", 1)[1])
        if r["tag"] == "projected_mean_1":  # the harness's ORD before the fork's code was read
            assert (cfg["ord_form"], cfg["ord_units"], cfg["spectral_lr_mul"]) == ("projected", "mean", 1.0)
        if r["tag"] == "baseline_std":
            assert not cfg["ord"] and cfg["script"] == "train_gpt.py" and cfg["spectral_lr_mul"] is None
    # rho was logged by the ORD runs only, and the standard runs' diagnostics fed section 5
    assert "baseline_std" not in results["ord_sweep"]["rho"] and "spectral_lr_1" in results["ord_sweep"]["rho"]
    assert results["weight_dynamics"]["by_block"]


def test_same_numbers_on_a_second_run(quick_report, tmp_path):
    proc = _report(tmp_path / "again", "--only", STUDIES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((quick_report / "results.json").read_text())
    second = json.loads((tmp_path / "again" / "results.json").read_text())
    assert set(second) == set(STUDIES.split(","))
    for name in second:
        assert second[name] == first[name], name


@pytest.mark.parametrize("args, needle", [
    (["--only", "gradient_rank,bogus"], "--only 'gradient_rank,bogus': allowed sections:"),
    (["--only", ","], "allowed sections"),
])
def test_bad_sections_are_one_line(tmp_path, args, needle):
    proc = _report(tmp_path / "r", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and needle in proc.stderr
    assert not (tmp_path / "r").exists()


def test_an_existing_report_is_not_overwritten(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "REPORT.md").write_text("precious\n")
    proc = _report(out)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert (out / "REPORT.md").read_text() == "precious\n"
