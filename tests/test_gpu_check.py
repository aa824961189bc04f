"""bench/gpu_check.py: its CPU parts end to end (one subprocess: the table's rows and exit code),
the pass/fail rules with wrong numbers, and the fork's reference step times against the log."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from runlog_fixtures import FIXTURES as MODDED_LOGS  # modded-nanogpt's own logs, in the repo

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds scripts, not a package: load the one under test by its path
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gc = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # registered: its dataclasses look it up
_spec.loader.exec_module(gc)
NAN = float("nan")


def test_cpu_parts_print_one_table_and_pass():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--steps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["part", "item", "value", "reference", "check"]
    assert set(lines[1]) <= {"-", " "}
    rows = lines[2:-1]
    assert lines[-1].startswith("device: cpu;") and lines[-1].endswith("all checks ok")
    text = "\n".join(rows)
    for k in (1, 2, 3):  # part a at the reduced size, each stage's own micro-batch
        row = next(r for r in rows if r.startswith("a") and f"stage {k} step" in r)
        assert row.rstrip().endswith("ok") and " ms " in row
    for item in ("peak memory", "speedrun preset step times", "triton NS5 40x768x768", "polar express 768x768"):
        row = next(r for r in rows if item in r)
        assert "not run (no CUDA)" in row
    interp = [r for r in rows if r.startswith("b") and "(interpreter)" in r]
    assert len(interp) == 2 and all(r.rstrip().endswith("ok") for r in interp)  # float32 and bfloat16
    polar = [r for r in rows if r.startswith("c") and "vs SVD" in r]
    assert len(polar) == 2 and all(r.rstrip().endswith("ok") for r in polar)
    tiny = next(r for r in rows if r.startswith("d"))
    assert "tiny run, 30 steps" in tiny and "status finished" in tiny and tiny.rstrip().endswith("ok")
    for item in ("parameters", "gradients", "muon momentum", "normuon v", "adam moments", "step buffers",
                 "activations", "total per rank"):
        assert f"8xH100 est. {item}" in text
    assert "WRONG" not in text
    assert [r.split()[0] for r in rows] == sorted(r.split()[0] for r in rows)  # parts in order


def test_the_rules_fail_wrong_numbers():
    assert gc.kernel_ok(1e-2, 1e-2) and not gc.kernel_ok(0.1, 1e-2) and not gc.kernel_ok(NAN, 1e-2)
    assert gc.polar_ok(0.09, 0.2) and not gc.polar_ok(0.3, 0.2) and not gc.polar_ok(math.inf, 0.2)
    assert not gc.polar_ok(0.6, 0.9)  # better than torch's but not a polar factor
    assert gc.loss_went_down([6.0, 2.0], [5.0])
    assert not gc.loss_went_down([6.0, 6.5], [5.0])  # went up
    assert not gc.loss_went_down([6.0, 2.0], [NAN])  # a non-finite train loss
    assert not gc.loss_went_down([6.0], [5.0])  # nothing to compare
    assert gc.step_time_ok(12.0) and not gc.step_time_ok(NAN) and not gc.step_time_ok(0.0)
    assert gc.fits(62e9, 80e9) and not gc.fits(90e9, 80e9) and not gc.fits(NAN, 80e9)


def test_a_wrong_row_makes_the_exit_code_1_and_the_table_says_so():
    ok = gc.Row("c", "polar", "err 0.09", "", gc.polar_ok(0.09, 0.2))
    bad = gc.Row("c", "polar", "err 0.30", "", gc.polar_ok(0.3, 0.2))
    info = gc.Row("a", "peak memory", gc.NOT_RUN)
    assert gc.exit_code([ok, info]) == 0
    assert gc.exit_code([ok, bad, info]) == 1 and gc.failed([ok, bad, info]) == [bad]
    table = gc.format_table([ok, bad, info]).splitlines()
    assert table[2].endswith("ok") and table[3].endswith("WRONG") and table[4].endswith("-")


def test_reference_stage_times_are_the_logs():
    got = gc.stage_ms_from_log(MODDED_LOGS / gc.REF_SOURCE, 1535, 40)
    assert got == pytest.approx(gc.REF_STAGE_MS, abs=0.006)
