"""Experiment trackers (harness/trackers.py): TensorBoard, trackio and wandb (offline), each
with its real library writing under tmp_path, read back and compared with the text log, which
stays the source of truth. Each test skips when its package is not installed
(requirements-trackers.txt)."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from base import UserError
from harness.logs.format import RunLogWriter, read_log
from train_utils import ROOT, VENV_BIN, error_lines, log_of, run_train

INSTALLED = [n for n in ("tensorboard", "trackio", "wandb") if importlib.util.find_spec(n) is not None]


def _f32(x: float) -> float:
    return float(np.float32(x))


def _log_scalars(log, key: str) -> dict[int, float]:
    recs = log.val_steps if key == "val_loss" else log.train_steps
    return {r.step: r.values[key] for r in recs if isinstance(r.values.get(key), float)}


def _tb_scalars(directory: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


# ------------------------------------------------------------------------------------------
# One small training run feeding every installed tracker


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, shards_dir):
    if not INSTALLED:
        pytest.skip("no tracker package installed (pip install -r requirements-trackers.txt)")
    tmp = tmp_path_factory.mktemp("tracked")
    proc = run_train(tmp, shards_dir, "--trackers", ",".join(INSTALLED), "--tracker_dir", str(tmp / "trk"),
                     "--diag_every", "3", "--tag", "trk", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = log_of(tmp)
    assert log.status == "finished" and log.val_steps and log.train_steps and log.diags
    return tmp, log, proc


def test_tensorboard_scalars_are_the_text_logs(tracked_run):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (requirements-trackers.txt)")
    tmp, log, proc = tracked_run
    tb = _tb_scalars(tmp / "trk" / "tensorboard" / "run")
    for key in ("train_loss", "val_loss"):
        want = _log_scalars(log, key)
        assert want and tb[key] == {s: _f32(v) for s, v in want.items()}, key
    assert tb["lr_mul"][6] == _f32(0.4) and tb["batch_size"][1] == 384.0
    # diag lines: diag/<layer>/<metric> at the diag's step
    checked = 0
    for d in log.diags:
        for metric, value in d.values.items():
            if isinstance(value, float) and np.isfinite(value):
                assert tb[f"diag/{d.layer}/{metric}"][d.step] == _f32(value), (d.layer, metric)
                checked += 1
    assert checked > 10
    assert "warning: tracker" not in proc.stderr


def test_trackio_store_has_the_text_logs_values(tracked_run):
    pytest.importorskip("trackio", reason="trackio not installed (requirements-trackers.txt)")
    tmp, log, _ = tracked_run
    db = tmp / "trk" / "trackio" / "muon-harness.db"  # TRACKIO_DIR/<project>.db, local only
    assert db.is_file()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select run_name, step, metrics from metrics").fetchall()
        config_rows = conn.execute("select run_name, config from configs").fetchall()
    got: dict[str, dict[int, float]] = {}
    for run_name, step, metrics in rows:
        assert run_name == "run"
        metrics = json.loads(metrics)
        for key in ("train_loss", "val_loss"):
            if key in metrics:
                got.setdefault(key, {})[step] = metrics[key]
    for key in ("train_loss", "val_loss"):
        assert got[key] == _log_scalars(log, key), key
    assert any(json.loads(c).get("seed") == 0 for _, c in config_rows)


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file (LevelDB log format: a 7-byte header, then 32 KiB
    blocks of chunks, each crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            yield rec


def test_wandb_offline_run_has_the_text_logs_history(tracked_run):
    pytest.importorskip("wandb", reason="wandb not installed (requirements-trackers.txt)")
    tmp, log, _ = tracked_run
    runs = list((tmp / "trk" / "wandb").glob("offline-run-*"))  # offline: written here, nothing sent
    assert len(runs) == 1, runs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    got: dict[str, dict[int, float]] = {}
    names = []
    for rec in _wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            names.append(rec.run.display_name)
        if kind != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
        for key in ("train_loss", "val_loss"):
            if key in items:
                got.setdefault(key, {})[int(items["step"])] = items[key]
    assert "run" in names
    for key in ("train_loss", "val_loss"):
        assert got[key] == _log_scalars(log, key), key


# ------------------------------------------------------------------------------------------
# Missing package, bad values, a tracker failing mid-run


def test_missing_package_is_one_error_line_before_training(tmp_path, shards_dir):
    # the package hidden from the import system: what a machine without it sees
    code = ("import sys, runpy; sys.modules['tensorboard'] = None; sys.argv = sys.argv[1:];"
            " runpy.run_path(sys.argv[0], run_name='__main__')")
    args = [str(VENV_BIN / "python"), "-c", code, str(ROOT / "train_gpt.py"), "--trackers", "tensorboard",
            "--log_dir", str(tmp_path / "logs"), "--train_files", str(shards_dir / "local_train_*.bin"),
            "--val_files", str(shards_dir / "local_val_*.bin"), "--run_id", "r"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc) == ["error: --trackers tensorboard needs the tensorboard package: pip install"
                                 " tensorboard (or pip install -r requirements-trackers.txt)"]
    assert not proc.stdout.strip() and not (tmp_path / "logs" / "r.txt").exists()  # nothing started


def test_check_available_names_the_package(monkeypatch):
    from harness import trackers

    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    for name in trackers.TRACKERS:
        with pytest.raises(UserError, match=rf"^--trackers {name} needs the {name} package: pip install {name}"):
            trackers.check_available([name])


def test_config_fields():
    from harness.config import load_config

    assert load_config([], env={}).trackers == []
    assert load_config(["--trackers", ""], env={}).trackers == []
    assert load_config([], env={"TRACKERS": "wandb,tensorboard"}).trackers == ["wandb", "tensorboard"]
    with pytest.raises(UserError, match=r"trackers='mlflow' is invalid: each one of tensorboard, trackio, wandb"):
        load_config(["--trackers", "mlflow"], env={})
    with pytest.raises(UserError, match="each tracker once"):
        load_config(["--trackers", "wandb,wandb"], env={})
    with pytest.raises(UserError, match="tracker_project"):
        load_config(["--tracker_project", "a/b"], env={})


class _Recorder:
    name = "recorder"

    def __init__(self, fail_at=None):
        self.seen, self.fail_at, self.closed = [], fail_at, 0

    def record(self, rec):
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.seen.append(rec)

    def close(self):
        self.closed += 1


def _write_synthetic(path: Path, listeners=()):
    w = RunLogWriter(path, "syn", echo=False)
    w.listeners.extend(listeners)
    w.header([("x.py", "step:1/2 not a record\n")], {"python": "3.11"}, {"run_id": "syn", "tag": "t"})
    w.step(0, 4, val_loss=10.5, train_time_ms=0, step_avg_ms=0, lr_mul=1.0, batch_size=64)
    for s in range(1, 5):
        w.step(s, 4, train_loss=10.0 - s * 0.51234, train_time_ms=s * 10, step_avg_ms=10.0, lr_mul=1.0, batch_size=64)
        w.diag(s, "blocks.0.attn.qkv", eff_rank=3.0 + s, rho=1e-4 * s)
    w.step(4, 4, val_loss=8.25, train_time_ms=40, step_avg_ms=10.0, lr_mul=0.5, batch_size=64)
    w.status("finished", final_val_loss=8.25, step=4)
    w.close()


def test_a_failing_tracker_is_dropped_and_the_log_goes_on(tmp_path):
    from harness.trackers import TrackerSet

    warnings: list[str] = []
    good, bad = _Recorder(), _Recorder(fail_at=3)
    bad.name = "flaky"
    trackers = TrackerSet([bad, good], warn=warnings.append)
    _write_synthetic(tmp_path / "syn.txt", [trackers])
    assert len(warnings) == 1 and warnings[0].startswith("warning: tracker flaky failed (OSError:")
    assert "the run and its text log go on" in warnings[0]
    assert len(bad.seen) == 3 and bad.closed == 1  # dropped at its fourth record, closed once, never again
    log = read_log(tmp_path / "syn.txt")
    assert log.status == "finished" and len(log.train_steps) == 4 and len(log.diags) == 4
    # the good one got every record, as the log has them (the source block's text is no record)
    assert len(good.seen) == 2 + 4 + 4 + 1 and good.closed == 1
    assert [r.values["train_loss"] for r in good.seen if "train_loss" in getattr(r, "values", {})] == \
        [r.train_loss for r in log.train_steps]


def test_logs_to_tensorboard_from_a_text_log(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (requirements-trackers.txt)")
    from harness.trackers import logs_to_tensorboard

    logs = tmp_path / "logs"
    _write_synthetic(logs / "syn.txt")
    (logs / "empty.txt").write_text("nothing here\n")
    written = logs_to_tensorboard([logs], tmp_path / "tb")
    assert written == [tmp_path / "tb" / "syn"]
    log = read_log(logs / "syn.txt")
    tb = _tb_scalars(written[0])
    assert tb["train_loss"] == {r.step: _f32(r.train_loss) for r in log.train_steps}
    assert tb["val_loss"] == {0: 10.5, 4: 8.25}
    assert tb["diag/blocks.0.attn.qkv/eff_rank"] == {s: 3.0 + s for s in range(1, 5)}


def test_plot_loss_to_tensorboard_cli(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (requirements-trackers.txt)")
    _write_synthetic(tmp_path / "logs" / "syn.txt")
    proc = subprocess.run([sys.executable, str(ROOT / "plot_loss.py"), str(tmp_path / "logs"), "--to_tensorboard",
                           str(tmp_path / "tb")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {tmp_path / 'tb' / 'syn'}"
    assert _tb_scalars(tmp_path / "tb" / "syn")["val_loss"] == {0: 10.5, 4: 8.25}


def test_tracker_failing_mid_run_leaves_the_run_whole(tmp_path, shards_dir, monkeypatch, capsys):
    # the real TensorBoard sink, in a real (in-process) run, failing from step 3 on
    pytest.importorskip("tensorboard", reason="tensorboard not installed (requirements-trackers.txt)")
    from harness import trackers, trainer
    from train_utils import SMALL

    real_step = trackers.TensorBoardSink.step

    def flaky(self, rec):
        if rec.step >= 3:
            raise OSError(5, "Input/output error")
        real_step(self, rec)

    monkeypatch.setattr(trackers.TensorBoardSink, "step", flaky)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    code = trainer.main("train_gpt.py", [*SMALL, "--log_dir", str(tmp_path / "logs"), "--run_id", "run",
                                         "--train_files", str(shards_dir / "local_train_*.bin"),
                                         "--val_files", str(shards_dir / "local_val_*.bin"),
                                         "--trackers", "tensorboard"])
    err = capsys.readouterr().err
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: tracker")]
    assert warned == ["warning: tracker tensorboard failed (OSError: [Errno 5] Input/output error); it is dropped,"
                      " the run and its text log go on"]
    log = log_of(tmp_path)
    assert log.status == "finished" and [r.step for r in log.train_steps] == [1, 2, 3, 4, 5, 6]
    # what reached TensorBoard before the failure is the log's
    tb = _tb_scalars(tmp_path / "logs" / "trackers" / "tensorboard" / "run")
    assert tb["train_loss"] == {r.step: _f32(r.train_loss) for r in log.train_steps if r.step < 3}
