"""monitor_runs.py: the table's numbers (json/csv) against values computed here, filters, sweeps,
the incremental refresh, and --watch in a real subprocess (exits by itself; Ctrl-C is clean)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runlog_fixtures import FIXTURES, FIXTURE_FINALS, val_curve, write_run

import monitor_runs
from harness.logs.format import RunLogWriter

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "monitor_runs.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def logs(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    exp = {
        "b0": write_run(d, "b0", tag="baseline", seed=0, total=40),
        "b1": write_run(d, "b1", tag="baseline", seed=1, total=40),
        "o0": write_run(d, "o0", tag="ord", seed=0, total=40, offset=0.01, ord_diag=True, script="train_gpt_muon_new.py"),
        "o1": write_run(d, "o1", tag="ord", seed=1, total=40, stop_at=25, status=None, offset=0.01, script="train_gpt_muon_new.py"),
        "dv": write_run(d, "dv", tag="hot", total=40, stop_at=12, status="diverged"),
        "fl": write_run(d, "fl", tag="hot", total=40, stop_at=3, status="failed"),
    }
    with open(d / "bad.txt", "wb") as f:  # a damaged log: binary bytes and a half-written line
        f.write(b"runlog:1 run_id:bad\nstep:0/40 val_loss:10.0000 train_time:0ms step_avg:0.00ms\n\x00\x9f\xff\nstep:1/40 train_ti")
    return d, exp


def test_once_json_fields_match_the_logs(logs):
    d, exp = logs
    r = run_cli(d, "--once", "--format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    runs = {x["run_id"]: x for x in data["runs"]}
    assert set(runs) == {"b0", "b1", "o0", "o1", "dv", "fl", "bad"}
    assert {k: v["status"] for k, v in runs.items()} == {
        "b0": "finished", "b1": "finished", "o0": "finished", "o1": "running", "dv": "diverged", "fl": "failed", "bad": "running"}
    # values computed independently from the generator's curve
    b0 = runs["b0"]
    assert (b0["step"], b0["total"], b0["progress"]) == (40, 40, 1.0)
    assert b0["val_loss"] == pytest.approx(val_curve(40, 40, 0, 0.0), abs=5e-5)
    assert b0["final_val_loss"] == pytest.approx(val_curve(40, 40, 0, 0.0), abs=5e-5)
    assert b0["train_loss"] == pytest.approx(val_curve(40, 40, 0, 0.0) + 0.05, abs=5e-5)
    assert b0["best_val_step"] == 40 and b0["step_avg_ms"] == 100.0 and b0["elapsed_s"] == pytest.approx(4.0)
    assert b0["eta_s"] is None and b0["tag"] == "baseline" and b0["seed"] == 0 and b0["script"] == "train_gpt.py"
    o1 = runs["o1"]
    assert (o1["step"], o1["val_step"]) == (25, 20)
    assert o1["val_loss"] == pytest.approx(val_curve(20, 40, 1, 0.01), abs=5e-5)
    assert o1["progress"] == pytest.approx(25 / 40) and o1["eta_s"] == pytest.approx(15 * 0.1)
    assert runs["fl"]["notes"] == ["reason: CUDA_OOM"]
    assert runs["bad"]["garbage_lines"] == 1 and runs["bad"]["partial_line"] is True
    assert "half-written last line" in runs["bad"]["notes"]
    # comparison by tag of finished + running runs at the common step (o1 has validated up to 20)
    comp = {c["group"]: c for c in data["comparison"]}
    assert set(comp) == {"baseline", "ord"} and all(c["step"] == 20 for c in comp.values())
    base = (val_curve(20, 40, 0, 0.0) + val_curve(20, 40, 1, 0.0)) / 2
    ordm = (val_curve(20, 40, 0, 0.01) + val_curve(20, 40, 1, 0.01)) / 2
    assert comp["baseline"]["val_loss"] == pytest.approx(base, abs=1e-4) and comp["baseline"]["n"] == 2
    assert comp["ord"]["delta"] == pytest.approx(ordm - base, abs=2e-4) and comp["baseline"]["delta"] == 0.0


def test_best_is_the_lowest_validation_not_the_last(tmp_path):
    """A run whose loss rose at its last two validations (a late LR spike): "best" is the minimum
    over the finite validations, with its step, while "val" stays the last one."""
    d = tmp_path / "logs"
    d.mkdir()
    exp = write_run(d, "up", tag="spike", total=40, val_add={30: 0.30, 40: 0.20})
    vals = exp["vals"]  # {0: 10.78, 10: ..., 20: ..., 30: ..., 40: ...}, rounded as logged
    best_step = min(vals, key=vals.get)
    assert best_step == 20 and vals[40] > vals[20]  # the fixture is what this test is about
    r = run_cli(d, "--once", "--format", "json")
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(r.stdout)["runs"]
    assert run["best_val_step"] == 20 and run["best_val_loss"] == pytest.approx(vals[20], abs=5e-5)
    assert run["val_step"] == 40 and run["val_loss"] == pytest.approx(vals[40], abs=5e-5)
    assert run["final_val_loss"] == pytest.approx(vals[40], abs=5e-5)
    r = run_cli(d, "--once")  # the table shows it too
    assert r.returncode == 0, r.stderr
    assert f"{vals[20]:.4f} @20" in r.stdout
    # a run whose last validation is NaN, with no status line yet (the trainer died writing it):
    # diverged, and its best is still the lowest finite validation
    nv = write_run(d, "nv", total=40, stop_at=30, status=None, val_add={30: float("nan")})
    assert math.isnan(nv["vals"][30])
    r = run_cli(d, "--once", "--format", "json")
    run = {x["run_id"]: x for x in json.loads(r.stdout)["runs"]}["nv"]
    assert run["status"] == "diverged" and run["val_step"] == 30 and run["val_loss"] == "nan"
    assert run["best_val_step"] == 20 and run["best_val_loss"] == pytest.approx(nv["vals"][20], abs=5e-5)


def test_csv_filter_and_table(logs):
    d, _ = logs
    r = run_cli(d, "--format", "csv", "--filter", "BASE")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["run_id"] for x in rows] == ["b0", "b1"] and rows[0]["status"] == "finished"
    r = run_cli(d)  # the rich table, piped
    assert r.returncode == 0, r.stderr
    for text in ("b0", "o1", "running", "diverged", "failed", "half-written last line", "Δ best", "reason: CUDA_OOM"):
        assert text in r.stdout


def test_fixtures_table_json():
    r = run_cli(FIXTURES, "--once", "--format", "json")
    assert r.returncode == 0, r.stderr
    runs = {x["run_id"]: x for x in json.loads(r.stdout)["runs"]}
    assert set(runs) == set(FIXTURE_FINALS)
    for name, (total, final) in FIXTURE_FINALS.items():
        assert runs[name]["status"] == "finished" and runs[name]["step"] == total
        assert runs[name]["final_val_loss"] == pytest.approx(final, abs=1e-6)


def test_sweep_manifest(logs):
    d, _ = logs
    (d / "sweeps").mkdir()
    (d / "sweeps" / "s1.json").write_text(json.dumps({"runs": [
        {"run_id": "o0", "status": "finished"}, {"run_id": "o1", "status": "running"},
        {"run_id": "o2", "status": "queued", "tag": "ord"}]}))
    r = run_cli(d, "--once", "--format", "json", "--sweep", "s1")
    assert r.returncode == 0, r.stderr
    runs = {x["run_id"]: x for x in json.loads(r.stdout)["runs"]}
    assert set(runs) == {"o0", "o1", "o2"} and runs["o2"]["status"] == "queued" and runs["o2"]["notes"] == ["no log yet"]
    r = run_cli(d, "--sweep", "nope")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "nope.json" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_arguments_are_one_line_errors(tmp_path):
    """Each error names what was wrong (the value or path given) and what is allowed."""
    for args, message in (
        ([tmp_path / "missing"], f"error: {tmp_path / 'missing'}: no such log file or directory"),
        ([tmp_path, "--watch", "0"], "error: --watch 0.0: the refresh interval must be > 0 seconds"),
        ([tmp_path, "--watch", "-2"], "error: --watch -2.0: the refresh interval must be > 0 seconds"),
        ([tmp_path, "--watch", "1", "--format", "json"],
         "error: --watch shows the live table; --once/--format json|csv print once (choose one)"),
    ):
        r = run_cli(*args)
        assert r.returncode == 2 and r.stderr.strip() == message, r.stderr


def test_refresh_is_incremental(tmp_path):
    w = RunLogWriter(tmp_path / "live.txt", "live", echo=False)
    w.header([], {}, {"run_id": "live", "tag": "t"})
    w.step(0, 100, val_loss=10.0, train_time_ms=0, step_avg_ms=0)
    mon = monitor_runs.Monitor([str(tmp_path)])
    (s,), _ = mon.refresh()
    assert s.step == 0 and s.status == "running"
    fol = next(iter(mon.tracker.followers.values()))
    before = fol.offset
    w.step(1, 100, train_time_ms=100, step_avg_ms=100, train_loss=9.5)
    (s,), _ = mon.refresh()
    assert s.step == 1 and s.train_loss == 9.5
    assert fol.offset - before == len("step:1/100 train_time:100ms step_avg:100.00ms train_loss:9.5000\n")
    write_run(tmp_path, "late", total=10)  # a new file appears between refreshes
    assert {x.run_id for x in mon.refresh()[0]} == {"live", "late"}
    w.close()


def test_watch_exits_when_all_runs_end(logs, tmp_path):
    d, _ = logs
    ended = tmp_path / "ended"
    ended.mkdir()
    write_run(ended, "a", total=10)
    write_run(ended, "b", total=10, stop_at=4, status="diverged")
    r = run_cli(ended, "--watch", "0.2", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "all runs have ended" in r.stdout and "Traceback" not in r.stderr


def test_watch_follows_a_run_to_its_end(tmp_path):
    path = tmp_path / "live.txt"
    w = RunLogWriter(path, "live", echo=False)
    w.header([], {}, {"run_id": "live", "tag": "t"})
    w.step(0, 3, val_loss=10.0, train_time_ms=0, step_avg_ms=0)
    proc = subprocess.Popen([sys.executable, str(ROOT / "monitor_runs.py"), str(tmp_path), "--watch", "0.2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None  # still watching the running run
        for s in (1, 2, 3):
            w.step(s, 3, train_time_ms=s * 10, step_avg_ms=10, train_loss=5.0)
        w.step(3, 3, val_loss=4.0, train_time_ms=30, step_avg_ms=10)
        w.status("finished", final_val_loss=4.0, step=3)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        w.close()
    assert proc.returncode == 0, err
    assert "finished" in out and "all runs have ended" in out


def _live_log(tmp_path):
    w = RunLogWriter(tmp_path / "live.txt", "live", echo=False)
    w.header([], {}, {"run_id": "live", "tag": "t"})
    w.step(0, 100, val_loss=10.0, train_time_ms=0, step_avg_ms=0)
    return w


def test_watch_ctrl_c_is_clean_on_a_terminal(tmp_path):
    """The rich Live path: stdout is a pseudo-terminal; SIGINT once the table is up."""
    import pty
    import select

    w = _live_log(tmp_path)
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="160", LINES="40", TERM="xterm")
    proc = subprocess.Popen([sys.executable, str(ROOT / "monitor_runs.py"), str(tmp_path), "--watch", "0.2"],
                            cwd=ROOT, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    seen = b""
    try:
        deadline = time.time() + 30
        while b"running" not in seen and time.time() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        assert b"running" in seen and b"live" in seen
        time.sleep(0.5)  # a few refreshes in
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:  # drain the pty so the child never blocks
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # EIO once the child's side is gone: keep polling its exit
                    time.sleep(0.05)
        # stderr only once it has exited: a child still writing to the undrained pty would block
        # its exit and this read forever
        assert proc.poll() is not None, f"monitor still running 60 s after SIGINT; its screen ended {seen[-300:]!r}"
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        w.close()
    assert proc.returncode in (0, 130)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_watch_ctrl_c_is_clean_when_piped(tmp_path):
    w = _live_log(tmp_path)
    proc = subprocess.Popen([sys.executable, str(ROOT / "monitor_runs.py"), str(tmp_path), "--watch", "0.2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        first = ""
        while "running" not in first and time.time() < deadline:
            first += proc.stdout.readline()
        assert "live" in first and "running" in first  # piped: the table is printed, not drawn
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        w.close()
    assert proc.returncode in (0, 130)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
