"""Issue 19, the sweep launcher and the plotter: a sweep file that is not UTF-8 or is a
directory, --grace -1, Ctrl-C then --resume (the same run id goes on from its checkpoint),
and plot_loss.py given an --out that is a file or read-only, or files that are not logs."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fault_mounts import read_only_dir
from harness.logs.format import log_path, read_log
from runlog_fixtures import write_run
from sweep_utils import LAUNCHER, manifest_doc, running_with_steps, tiny_sets, wait_for

pytestmark = pytest.mark.usefixtures("local_corpus")  # runs with the default data/local (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
PLOT = [sys.executable, str(ROOT / "plot_loss.py")]


def one_error(r, *needles: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCHER, *args, "--log_dir", str(tmp_path / "logs")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_sweep_file_not_utf8(tmp_path):
    f = tmp_path / "s.toml"
    f.write_bytes(b'name = "caf\xe9"\n')
    one_error(launch(tmp_path, str(f)), str(f), "not a UTF-8 text file")
    assert not (tmp_path / "logs").exists()


def test_sweep_file_is_a_directory(tmp_path):
    one_error(launch(tmp_path, str(tmp_path)), str(tmp_path), "is a directory, not a sweep file")
    assert not (tmp_path / "logs").exists()


def test_negative_grace(tmp_path):
    one_error(launch(tmp_path, "--grid", "spectral_lr_mul=0", "--script", "train_gpt_muon_new.py", "--grace", "-1", *tiny_sets(2)), "--grace -1", ">= 0")
    assert not (tmp_path / "logs").exists()


def test_missing_shards_stop_the_sweep_before_any_run(tmp_path):
    """A data directory that is not there: one line naming the run and the path, exit 2, and no
    run started (no run log, no manifest) - not every run failing one after the other."""
    missing = str(tmp_path / "nodata" / "x_train_*.bin")
    r = launch(tmp_path, "--grid", "spectral_lr_mul=0,1", "--script", "train_gpt_muon_new.py", *tiny_sets(2),
               "--set", f"train_files={missing}")
    one_error(r, "spectral_lr_mul_0", "train_files", missing, "before any run starts")
    assert not list((tmp_path / "logs").glob("**/*.txt")) and not list((tmp_path / "logs").glob("sweeps/*.json"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ctrl_c_then_resume_continues_the_same_run_from_its_checkpoint(tmp_path):
    logs = tmp_path / "logs"
    launcher = subprocess.Popen([*LAUNCHER, "--grid", "spectral_lr_mul=0.5", "--script", "train_gpt_muon_new.py",
                                 "--log_dir", str(logs), "--set", f"checkpoint_dir={tmp_path / 'ckpt'}", *tiny_sets(40)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        (run,) = wait_for(lambda: running_with_steps(logs, 1), 120, "the run's first step")
        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, out
    log = read_log(log_path(logs, run["run_id"]))
    assert log.status == "preempted", out
    stopped_at = int(log.status_fields["step"])
    assert (tmp_path / "ckpt" / run["run_id"] / f"step_{stopped_at}.pt").exists()
    r = launch(tmp_path, "--resume", manifest_doc(logs)["sweep_id"])
    assert r.returncode == 0, r.stdout + r.stderr
    (x,) = manifest_doc(logs)["runs"]
    assert x["run_id"] == run["run_id"] and x["command"][-2:] == ["--resume", "latest"] and x["status"] == "finished"
    log = read_log(log_path(logs, run["run_id"]))
    assert log.finished and log.resumed_from == [stopped_at] and log.last_step == 40


def _one_log(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    write_run(d, "a", tag="base", seed=0)
    return d


def test_plot_out_is_a_file(tmp_path):
    logs = _one_log(tmp_path)
    f = tmp_path / "plots"
    f.write_text("mine")
    r = subprocess.run([*PLOT, str(logs), "--out", str(f)], capture_output=True, text=True, timeout=120)
    one_error(r, f"--out {f}", "is a file, not a directory")
    assert f.read_text() == "mine"


def test_plot_out_read_only(tmp_path):
    logs = _one_log(tmp_path)
    with read_only_dir(tmp_path / "plots") as out:
        r = subprocess.run([*PLOT, str(logs), "--out", str(out)], capture_output=True, text=True, timeout=120)
    one_error(r, f"--out {out}", "Read-only file system")


def test_plot_files_that_are_not_logs(tmp_path):
    a = tmp_path / "notes.txt"
    a.write_text("hello\nthis is not a run log\n")
    r = subprocess.run([*PLOT, str(a), "--out", str(tmp_path / "plots")], capture_output=True, text=True, timeout=120)
    one_error(r, str(a), "not a run log")
    d = tmp_path / "d"
    d.mkdir()
    (d / "readme.txt").write_text("nothing here\n")
    r = subprocess.run([*PLOT, str(d), "--out", str(tmp_path / "plots")], capture_output=True, text=True, timeout=120)
    one_error(r, "no run logs to plot", "none a run log")
    assert not (tmp_path / "plots").exists()
