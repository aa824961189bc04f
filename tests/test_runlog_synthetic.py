"""Run logs written by the real RunLogWriter (finished, running, diverged, failed, resumed), plus
hand-made damage (garbage, binary bytes, a half-written last line), parsed back by harness.logs.format;
and the fixtures (modded-nanogpt's own logs). The generator here is also used by the monitor and
plot tests."""

from __future__ import annotations

import os

import pytest

from harness.logs.format import LogFollower, RunLogWriter, read_log, find_logs
from harness.logs.runs import run_status, summarize
from runlog_fixtures import FIXTURE_FINALS, FIXTURES, write_run


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURE_FINALS))
def test_every_fixture_parses_to_its_final_val_loss(name):
    log = read_log(FIXTURES / f"{name}.txt")
    total, final = FIXTURE_FINALS[name]
    assert not log.ours and log.config is None
    assert log.total_steps == total and log.last_step == total
    assert log.final_val_loss == pytest.approx(final, abs=1e-6)
    assert log.finished and log.garbage_lines == 0
    # step 0 validation at ~10.8; the code at the top of the file never counts
    assert log.val_steps[0].step == 0 and 10.7 < log.val_steps[0].val_loss < 11.0
    assert len({r.step for r in log.train_steps}) == total
    s = summarize(log, last_write=0.0, now=1e12)
    assert s.status == "finished" and s.best_val_loss == pytest.approx(final, abs=1e-6)
    assert not s.partial_line  # "peak memory ..." without a newline is not news


def test_fixture_lr_mul_tokens_are_read():
    log = read_log(FIXTURES / "fork_lr_schedule_sweep.txt")
    assert log.train_steps[0].get("lr_mul") == 1.0 and log.train_steps[-1].get("lr_mul") == 0.1


def test_writer_logs_round_trip(tmp_path):
    exp = write_run(tmp_path, "r1", tag="baseline", seed=3, total=30, val_every=10, ord_diag=True)
    log = read_log(exp["path"])
    assert log.ours and log.run_id == "r1" and log.tag == "baseline" and log.config["seed"] == 3
    assert [r.step for r in log.val_steps] == [0, 10, 20, 30]
    assert [r.val_loss for r in log.val_steps] == [exp["vals"][s] for s in (0, 10, 20, 30)]
    assert len(log.train_steps) == 30  # the fake step line inside the source block is skipped
    assert log.status == "finished" and log.final_val_loss == exp["vals"][30]
    assert {d.layer for d in log.diags} == {"blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"}
    assert log.train_steps[-1].get("batch_size") == 12288.0
    assert run_status(log, last_write=0.0, now=1e12) == "finished"


def test_statuses_of_generated_logs(tmp_path):
    write_run(tmp_path, "fin", total=20)
    write_run(tmp_path, "run", total=20, stop_at=12, status=None)
    write_run(tmp_path, "div", total=20, stop_at=8, status="diverged")
    write_run(tmp_path, "fail", total=20, stop_at=5, status="failed")
    write_run(tmp_path, "nan", total=20, stop_at=9, status=None, nan_at=7)
    write_run(tmp_path, "pre", total=20, stop_at=9, status="preempted")
    now = os.path.getmtime(tmp_path / "run.txt")
    got = {p.stem: summarize(read_log(p), os.path.getmtime(p), now + 1) for p in find_logs([tmp_path])}
    assert {k: v.status for k, v in got.items()} == {
        "fin": "finished", "run": "running", "div": "diverged", "fail": "failed", "nan": "diverged", "pre": "preempted"}
    assert got["fail"].notes == ["reason: CUDA_OOM"]
    assert got["run"].step == 12 and got["run"].eta_s == pytest.approx(8 * 0.1)


def test_stale_threshold_follows_step_avg(tmp_path):
    exp = write_run(tmp_path, "slow", total=20, stop_at=5, status=None, step_ms=30_000.0)  # 30 s/step
    log = read_log(exp["path"])
    t = os.path.getmtime(exp["path"])
    assert run_status(log, t, now=t + 200) == "running"  # < 10 x 30 s
    assert run_status(log, t, now=t + 301) == "stale"
    fast = read_log(write_run(tmp_path, "fast", total=20, stop_at=5, status=None)["path"])  # 0.1 s/step
    assert run_status(fast, t, now=t + 59) == "running"  # the 60 s floor
    assert run_status(fast, t, now=t + 61) == "stale"
    assert run_status(fast, t, now=t + 61, stale_min_s=120) == "running"


def test_garbage_binary_and_half_written_line(tmp_path):
    exp = write_run(tmp_path, "bad", total=20, stop_at=10, status=None)
    with open(exp["path"], "ab") as f:
        f.write(b"\x00\x01\xff\xfe binary junk\n")
        f.write(b"step:11/20 train_time:11")  # the writer died mid-line
    log = read_log(exp["path"])
    assert log.garbage_lines == 1 and log.partial_tail and log.last_step == 10
    s = summarize(log, os.path.getmtime(exp["path"]))
    assert s.partial_line and "1 garbage line" in s.notes and "half-written last line" in s.notes
    # a file of pure binary bytes never raises
    blob = tmp_path / "blob.txt"
    blob.write_bytes(bytes(range(256)) * 40)
    s = summarize(read_log(blob), os.path.getmtime(blob))
    assert s.step is None and s.status in ("running", "stale") and (s.garbage_lines or s.partial_line)


def test_follower_reads_only_appended_bytes_and_resets(tmp_path):
    path = tmp_path / "grow.txt"
    w = RunLogWriter(path, "grow", echo=False)
    w.header([], {"python": "3"}, {"run_id": "grow", "tag": "t"})
    w.step(0, 10, val_loss=10.0, train_time_ms=0, step_avg_ms=0)
    fol = LogFollower(path)
    assert fol.refresh() and fol.log.last_step == 0
    size = path.stat().st_size
    assert fol.offset == size and not fol.refresh()  # nothing new: nothing read
    w.step(1, 10, train_time_ms=100, step_avg_ms=100, train_loss=9.0)
    assert fol.refresh() and fol.log.last_step == 1 and fol.offset == path.stat().st_size
    # a multi-byte UTF-8 character split across two refreshes is kept whole
    with open(path, "ab") as f:
        f.write("note: é".encode()[:-1])
    fol.refresh()
    with open(path, "ab") as f:
        f.write("note: é".encode()[-1:] + b"\n")
    fol.refresh()
    assert fol.log.garbage_lines == 0
    # truncated: re-read from the start
    w.close()
    path.write_text("step:0/5 val_loss:5.0000 train_time:0ms step_avg:0.00ms\n")
    assert fol.refresh() and fol.resets == 1 and fol.log.last_step == 0 and fol.log.total_steps == 5
    # replaced by a new file (rotation): re-read from the start
    other = tmp_path / "new.txt"
    other.write_text("step:0/7 val_loss:7.0000 train_time:0ms step_avg:0.00ms\nstep:1/7 train_time:5ms step_avg:5.00ms\n")
    os.replace(other, path)
    assert fol.refresh() and fol.log.total_steps == 7 and fol.log.last_step == 1
    # rewritten in place, longer than before, same inode: the changed bytes give it away
    with open(path, "r+b") as f:
        f.write(b"step:0/9 val_loss:9.0000 train_time:0ms step_avg:0.00ms\nstep:1/9 train_time:5ms step_avg:5.00ms\nstep:2/9 train_time:9ms step_avg:4.50ms\n")
    assert fol.refresh() and fol.log.total_steps == 9 and fol.log.last_step == 2
    assert [r.step for r in fol.log.train_steps] == [1, 2]


def test_resumed_run_drops_redone_steps(tmp_path):
    path = tmp_path / "res.txt"
    w = RunLogWriter(path, "res", echo=False)
    w.header([], {}, {"run_id": "res", "tag": "t"})
    for s in range(1, 8):
        w.step(s, 10, train_time_ms=s * 10, step_avg_ms=10, train_loss=5.0 - 0.1 * s)
    w.status("preempted", step=7)
    w.close()
    w = RunLogWriter(path, "res", append=True, echo=False)
    w.resumed(5)
    w.step(6, 10, train_time_ms=60, step_avg_ms=10, train_loss=1.0)
    w.close()
    log = read_log(path)
    assert [r.step for r in log.train_steps] == [1, 2, 3, 4, 5, 6] and log.train_steps[-1].train_loss == 1.0
    assert log.status is None and summarize(log, path.stat().st_mtime).notes == ["resumed x1"]
