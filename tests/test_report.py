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

from harness.logs.format import find_logs, read_log

pytestmark = [pytest.mark.usefixtures("local_corpus"), pytest.mark.slow]  # runs with the default data/local (tests/conftest.py)

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
    summary = text.split("## Summary", 1)[1].split("**Against docs/REFERENCE.md**", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| (") or line.startswith("| ORD")]
    assert [r.split("|")[1].strip()[:9] for r in rows] == ["(1) Does ", "(2) Do Ad", "(3) Does ", "(4) Which",
                                                           "ORD: does", "ORD: is P"]
    answers = [r.split("|")[2].strip() for r in rows]
    # each verdict is the one its numbers give (results.json), by the rules the report states
    results = json.loads((quick_report / "results.json").read_text())
    assert answers == expected_answers(results)
    assert text.count("**Answer.**") == 6
    assert "Quick mode" in text


def summary_answers(text: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith("| (") or line.startswith("| ORD")]
    return [r.split("|")[2].strip() for r in rows]


def expected_answers(res: dict) -> list[str]:
    """The summary's six verdicts derived here from the raw numbers of results.json, by the rules
    the report states: (1) a rank moved by more than 10%; (2) the end ranks of Adam and Muon differ
    by more than 10%, or Muon's NS output by more than 50%; (3)/(4) a mode is clear when its mean
    is more than twice the largest seed spread from full's; ORD: Welch p < 0.05 and the sign of
    the difference decide better/worse."""
    rel = lambda a, b: (b - a) / abs(a)  # noqa: E731
    gr, rm, od = res["gradient_rank"], res["rank_manipulation"], res["ord_sweep"]
    out = ["yes" if abs(rel(gr["adam_start"], gr["adam_end"])) > 0.1 or abs(rel(gr["muon_start"], gr["muon_end"])) > 0.1
           else "no",
           "yes" if abs(rel(gr["adam_end"], gr["muon_end"])) > 0.1 or abs(rel(gr["adam_end"], gr["ns_end"])) > 0.5
           else "no"]
    vals = rm["final_val_loss"]
    mean = {m: float(np.mean(v)) for m, v in vals.items()}
    spread = max(max(v) - min(v) for v in vals.values())
    clear = {m: abs(mean[m] - mean["full"]) > 2 * spread for m in vals if m != "full"}
    out.append("yes" if any(clear.values()) else "inconclusive")
    effect = lambda m: "helps" if mean[m] < mean["full"] else "hurts"  # noqa: E731
    parts = []
    if clear["equalized"] or clear["orthonormal"]:
        parts.append(f"equalizing the spectrum ({effect('equalized' if clear['equalized'] else 'orthonormal')} under Adam)")
    if clear["low_rank"]:
        parts.append(f"cutting the rank ({effect('low_rank')})")
    out.append(" and ".join(parts) or "inconclusive")
    sig = lambda g, sign: g["p"] is not None and g["p"] < 0.05 and g["delta"] * sign > 0  # noqa: E731
    groups, vs_perp = od["groups"], od["vs_perp"]
    adds = [t for t in groups if t.startswith("spectral_lr_") and t != "spectral_lr_0"]
    helped = [t for t in adds if sig(groups[t], -1)]
    hurt = [t for t in adds if sig(groups[t], +1)]
    helped_perp = [t for t in adds if t in vs_perp and sig(vs_perp[t], -1)]
    if helped:
        out.append("yes, at m = " + ", ".join(t.rsplit("_", 1)[1] for t in sorted(helped, key=lambda t: groups[t]["mean"])))
    elif helped_perp:
        out.append("only against Polar(G_perp) alone, not against the standard run")
    elif hurt and len(hurt) == len(adds):
        out.append("no")
    else:
        out.append("inconclusive")
    perp = groups["polar_gperp"]  # Polar(G_perp) alone
    out.append("worse" if sig(perp, +1) else "better" if sig(perp, -1) else "inconclusive")
    return out


def _scenario(rank: tuple, manip: dict, ord_groups: dict, vs_perp: dict):
    """Sections with hand-picked numbers, derived the way the studies derive them."""
    from experiments.report import Section

    a0, a1, m0, m1, ns1 = rank
    gr = dict(width=64, layers=6, adam_start=a0, adam_end=a1, muon_start=m0, muon_end=m1, ns_start=ns1, ns_end=ns1,
              adam_layers_down=0, muon_layers_down=0, adam_val=3.0, muon_val=2.9, size={})
    mean = {m: float(np.mean(v)) for m, v in manip.items()}
    spread = max(max(v) - min(v) for v in manip.values())
    clear = {m: abs(mean[m] - mean["full"]) > 2 * spread for m in manip if m != "full"}
    rm = dict(final_val_loss=manip, mean=mean, spread=spread, clear=clear, best=min(mean, key=mean.get))
    groups = {g: dict(n=2, mean=mu, std=0.01, delta=None if g == "baseline_std" else mu - ord_groups["baseline_std"][0],
                      p=p, values=[mu, mu]) for g, (mu, p) in ord_groups.items()}
    sig = lambda d, sign: [t for t, g in d.items() if g["p"] is not None and g["p"] < 0.05 and g["delta"] * sign > 0]  # noqa: E731
    by_mean = sorted(groups, key=lambda g: groups[g]["mean"])
    od = dict(groups=groups, rho={}, vs_perp=vs_perp, best=by_mean[0],
              better=[g for g in by_mean if g in sig(groups, -1)], worse=[g for g in by_mean if g in sig(groups, +1)],
              better_than_perp=[g for g in by_mean if g in sig(vs_perp, -1)],
              worse_than_perp=[g for g in by_mean if g in sig(vs_perp, +1)])
    return {"gradient_rank": Section("gr", "", gr), "rank_manipulation": Section("rm", "", rm),
            "ord_sweep": Section("ord", "", od)}


MANIP_CLEAR = {"full": [3.0, 3.02], "low_rank": [3.3, 3.31], "orthonormal": [2.9, 2.91], "equalized": [2.95, 2.96]}
MANIP_NOISE = {"full": [3.0, 3.1], "low_rank": [3.05, 3.08], "orthonormal": [2.98, 3.02], "equalized": [3.01, 3.03]}


@pytest.mark.parametrize("scenario, want", [
    (_scenario((100, 80, 100, 98, 120), MANIP_CLEAR,
               {"baseline_std": (3.0, None), "polar_gperp": (3.1, 0.01), "spectral_lr_0.5": (2.9, 0.02), "spectral_lr_1": (3.05, 0.3)},
               {"spectral_lr_0.5": dict(delta=-0.2, p=0.01), "spectral_lr_1": dict(delta=-0.05, p=0.2)}),
     ["yes", "yes", "yes", "equalizing the spectrum (helps under Adam) and cutting the rank (hurts)", "yes, at m = 0.5",
      "worse"]),
    (_scenario((100, 95, 100, 100, 120), MANIP_NOISE,
               {"baseline_std": (3.0, None), "polar_gperp": (3.0, 0.9), "spectral_lr_0.5": (3.01, 0.4), "spectral_lr_1": (3.2, 0.01)},
               {"spectral_lr_0.5": dict(delta=0.01, p=0.6), "spectral_lr_1": dict(delta=0.2, p=0.01)}),
     ["no", "no", "inconclusive", "inconclusive", "inconclusive", "inconclusive"]),
    (_scenario((100, 89, 100, 100, 200), MANIP_NOISE,
               {"baseline_std": (3.0, None), "polar_gperp": (3.3, 0.01), "spectral_lr_0.5": (3.1, 0.3), "spectral_lr_1": (3.2, 0.2)},
               {"spectral_lr_0.5": dict(delta=-0.2, p=0.01), "spectral_lr_1": dict(delta=-0.1, p=0.3)}),
     ["yes", "yes", "inconclusive", "inconclusive", "only against Polar(G_perp) alone, not against the standard run",
      "worse"]),
    (_scenario((100, 100, 100, 100, 100), {**MANIP_CLEAR, "low_rank": [3.0, 3.01], "equalized": [3.2, 3.21],
                                            "orthonormal": [3.0, 3.02]},
               {"baseline_std": (3.0, None), "polar_gperp": (2.8, 0.01), "spectral_lr_0.5": (3.1, 0.01), "spectral_lr_1": (3.2, 0.01)},
               {"spectral_lr_0.5": dict(delta=0.3, p=0.01), "spectral_lr_1": dict(delta=0.4, p=0.01)}),
     ["no", "no", "yes", "equalizing the spectrum (hurts under Adam)", "no", "better"]),
], ids=["effects", "noise", "perp-only", "all-worse"])
def test_summary_verdicts_follow_the_numbers(scenario, want):
    """The summary table's verdicts for hand-picked numbers: each answer is the one the numbers
    give (and the derivation above agrees), not merely one of the allowed words."""
    from experiments.report import summary

    got = summary_answers(summary(scenario))
    assert got == want
    assert expected_answers({k: s.numbers for k, s in scenario.items()}) == want


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
    assert len(logs) == len(runs["runs"]) == 14  # 7 groups x 2 seeds (s = 0 is baseline_std bit for bit: not run)
    groups = results["ord_sweep"]["groups"]
    assert set(groups) == {"baseline_std", "polar_gperp", "projected_mean_1", "spectral_lr_0.01",
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
    for name in ("runs.json", "results.json"):  # the shards under the repository: relative, no machine path
        assert str(ROOT) not in (quick_report / name).read_text(), name


def test_same_numbers_on_a_second_run_one_study_at_a_time(quick_report, tmp_path):
    """The first report ran its studies two at a time in worker processes; this one runs them one
    after another in one process: the numbers do not depend on --jobs."""
    proc = _report(tmp_path / "again", "--only", STUDIES, "--jobs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = [json.loads((d / "runs.json").read_text()) for d in (quick_report, tmp_path / "again")]
    assert [m["jobs"] for m in meta] == [2, 1] and meta[0]["threads"] == meta[1]["threads"] == 1
    assert set(meta[0]["section_seconds"]) == {*STUDIES.split(","), "ord_sweep"}
    first = json.loads((quick_report / "results.json").read_text())
    second = json.loads((tmp_path / "again" / "results.json").read_text())
    assert set(second) == set(STUDIES.split(","))
    for name in second:
        assert second[name] == first[name], name


@pytest.mark.parametrize("args, needle", [
    (["--only", "gradient_rank,bogus"], "--only 'gradient_rank,bogus': allowed sections:"),
    (["--only", ","], "allowed sections"),
    (["--jobs", "0"], "--jobs 0: allowed: an integer >= 1"),
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
