"""Issue 19, the trainer: bad input and faults end with one clear `error:` line, the right exit
code, a log that ends in a status line (once it is open) and nothing written earlier lost.
Every test runs the real train_gpt.py (python or torchrun) at the TINY size of the checkpoint
tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_runs import BIN, ROOT, TINY, descendants, env, kill_job, log_has_line, start, wait_for
from checkpoint_runs import run as run_tiny
from data.shards import open_shard, write_shard
from fault_mounts import fill, read_only_dir, small_tmpfs
from harness.logs.format import read_log
from train_utils import error_lines

pytestmark = pytest.mark.usefixtures("local_corpus")  # runs with the default data/local (tests/conftest.py)

DATA = ROOT / "data" / "local"


def _one_error(proc, code: int, *needles: str) -> str:
    out = proc.stdout + proc.stderr if isinstance(proc.stdout, str) else ""
    lines = error_lines(proc) if isinstance(proc.stderr, str) else [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _status_line(log_path: Path) -> str:
    text = log_path.read_text()
    assert text.endswith("\n"), "the log ends in a half line"
    last = text.splitlines()[-1]
    assert last.startswith("status:"), last
    return last


# ------------------------------------------------------------------------------------------
# Bad values: refused before any work, nothing written


@pytest.mark.parametrize("flag,value,needle", [
    ("--seed", "10000000000", "seed=10000000000"),
    ("--rope_base", "nan", "rope_base=nan"),
    ("--rope_base", "0", "rope_base=0.0"),
    ("--adam_eps", "0", "adam_eps=0.0"),
])
def test_bad_values_are_one_line_before_anything_is_written(tmp_path, flag, value, needle):
    r = run_tiny(tmp_path, "bad", flag, value)
    _one_error(r, 2, needle, "must be")
    assert not (tmp_path / "logs").exists()


def test_world_size_without_torchrun(tmp_path):
    cmd = [str(BIN / "python"), str(ROOT / "train_gpt.py"), *TINY, "--log_dir", str(tmp_path / "logs")]
    r = subprocess.run(cmd, cwd=ROOT, env={**env(), "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=120)
    _one_error(r, 2, "WORLD_SIZE=2", "torchrun --nproc_per_node=2")
    assert not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------------------
# Where the run writes: a file, or a read-only directory, is found before step 0


def test_log_dir_is_a_file(tmp_path):
    (tmp_path / "logs").write_text("mine\n")
    r = run_tiny(tmp_path, "r")
    _one_error(r, 2, "log_dir=", "is a file, not a directory")
    assert (tmp_path / "logs").read_text() == "mine\n"


def test_log_dir_read_only(tmp_path):
    with read_only_dir(tmp_path / "logs"):
        r = run_tiny(tmp_path, "r")
    _one_error(r, 2, "log_dir=", "Read-only file system")
    assert not list((tmp_path / "logs").iterdir())


@pytest.mark.parametrize("kind", ["file", "read_only"])
def test_checkpoint_dir_unwritable_is_refused_before_step_0(tmp_path, kind):
    if kind == "file":
        (tmp_path / "ckpt").write_text("x")
        r = run_tiny(tmp_path, "r", "--save_final")
        _one_error(r, 2, "checkpoint_dir=", "is a file, not a directory")
    else:
        with read_only_dir(tmp_path / "ckpt"):
            r = run_tiny(tmp_path, "r", "--save_every", "5")
        _one_error(r, 2, "checkpoint_dir=", "Read-only file system")
    # refused before the log was opened: the run id is free to be used again
    assert not (tmp_path / "logs" / "r.txt").exists() and not (tmp_path / "logs" / "r.lock").exists()


# ------------------------------------------------------------------------------------------
# Bad shards found during the run: the log ends with status:failed


def _data_dir(tmp_path: Path, train_tokens: np.ndarray) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "x_train_000000.bin", train_tokens)
    write_shard(d / "x_val_000000.bin", np.asarray(open_shard(DATA / "local_val_000000.bin")[:4096]))
    return d


@pytest.mark.parametrize("case", ["id_over_vocab", "empty", "too_small"])
def test_bad_train_shard_ends_the_log_with_failed(tmp_path, case):
    good = np.asarray(open_shard(DATA / "local_train_000000.bin")[:20000]).astype(np.int64)
    tokens = {"id_over_vocab": np.concatenate([good, [60000]]), "empty": good[:0], "too_small": good[:20]}[case]
    d = _data_dir(tmp_path, tokens)
    r = run_tiny(tmp_path, "r", "--train_files", str(d / "x_train_*.bin"), "--val_files", str(d / "x_val_*.bin"))
    line = _one_error(r, 2, "x_train_000000.bin")
    if case == "id_over_vocab":
        assert "token id 60000 >= vocab_size 50304" in line
    status = _status_line(tmp_path / "logs" / "r.txt")
    assert status.startswith("status:failed reason:UserError")


# ------------------------------------------------------------------------------------------
# Disk full: the checkpoint, then the log


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path):
    with small_tmpfs(tmp_path / "ckpt", "64m") as ck:
        proc = start(tmp_path, "r", "--save_every", "5", "--num_scheduled_iterations", "400")
        try:
            wait_for(lambda: (ck / "r" / "step_5.pt").exists() and log_has_line(tmp_path / "logs" / "r.txt", "step:7/"), proc)
            fill(ck)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                kill_job(proc)
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
        assert "cannot write checkpoint" in errors[0] and "step_10.pt" in errors[0]
        assert "the earlier checkpoints are kept" in errors[0]
        saved = torch.load(ck / "r" / "step_5.pt", weights_only=True)  # intact
        assert saved["step"] == 5
        assert sorted(p.name for p in (ck / "r").iterdir()) == ["step_5.pt"]  # no temp file left
    status = _status_line(tmp_path / "logs" / "r.txt")
    assert status.startswith("status:failed") and "step:10" in status


def test_disk_full_under_the_log_ends_it_cleanly(tmp_path):
    with small_tmpfs(tmp_path / "logs", "16m") as logs:
        proc = start(tmp_path, "r", "--num_scheduled_iterations", "3000", "--val_loss_every", "0")
        try:
            wait_for(lambda: log_has_line(logs / "r.txt", "step:3/"), proc)
            before = (logs / "r.txt").read_bytes()
            fill(logs)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                kill_job(proc)
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
        assert "cannot write the run log" in errors[0] and "No space left on device" in errors[0]
        text = (logs / "r.txt").read_bytes()
        assert text.startswith(before)  # nothing written earlier is lost
        status = _status_line(logs / "r.txt")  # whole lines only, and the status line fits
        assert status.startswith("status:failed reason:LogWriteError")
        log = read_log(logs / "r.txt")
        assert log.status == "failed" and log.last_step >= 3 and not log.partial_tail


# ------------------------------------------------------------------------------------------
# Divergence: a loss that stays far above its start


def test_loss_far_above_its_start_ends_as_diverged(tmp_path):
    lrs = [a for name in ("muon_lr", "adam_lr") for a in (f"--{name}", "1e30")]
    r = run_tiny(tmp_path, "r", *lrs, "--val_loss_every", "3", "--num_scheduled_iterations", "30")
    line = _one_error(r, 3, "above 1.2 x the step-0 val loss", "diverged")
    assert "at 2 validations in a row" in line
    log = read_log(tmp_path / "logs" / "r.txt")
    assert log.status == "diverged" and not log.finished
    start_loss = log.val_steps[0].val_loss
    assert all(v.val_loss > 1.2 * start_loss for v in log.val_steps[-2:])
    assert float(log.status_fields["initial_val_loss"]) == pytest.approx(start_loss, abs=1e-3)


def test_a_learning_run_is_not_called_diverged(tmp_path):
    r = run_tiny(tmp_path, "r", "--val_loss_every", "3", "--num_scheduled_iterations", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_log(tmp_path / "logs" / "r.txt").finished


# ------------------------------------------------------------------------------------------
# Data: a directory as --train_files/--val_files, changed shards on resume


def test_directory_as_train_and_val_files_resolves_to_each_split(tmp_path):
    r = run_tiny(tmp_path, "r", "--train_files", str(DATA), "--val_files", str(DATA), "--save_final",
                 "--num_scheduled_iterations", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ckpt" / "r" / "step_2.pt", weights_only=True)
    assert {f["file"] for f in ckpt["data"]["train"]} == {p.name for p in DATA.glob("local_train_*.bin")}
    assert [f["file"] for f in ckpt["data"]["val"]] == ["local_val_000000.bin"]


def test_directory_without_that_split_is_refused(tmp_path):
    d = tmp_path / "valonly"
    d.mkdir()
    (d / "local_val_000000.bin").write_bytes((DATA / "local_val_000000.bin").read_bytes())
    r = run_tiny(tmp_path, "r", "--train_files", str(d))
    _one_error(r, 2, str(d), "has no train shards")
    assert not (tmp_path / "logs").exists()


def _rewrite_same_size(path: Path) -> None:
    """Other tokens, same path and size (a rebuilt shard)."""
    tokens = np.asarray(open_shard(path)).astype(np.int64)
    os.unlink(path)
    write_shard(path, tokens[::-1])


@pytest.mark.parametrize("compact", ["0", "1"])
def test_resume_after_the_shards_changed_names_the_data(tmp_path, compact):
    d = tmp_path / "data"
    d.mkdir()
    good = np.asarray(open_shard(DATA / "local_train_000000.bin")[:30000]).astype(np.int64)
    write_shard(d / "x_train_000000.bin", good)
    write_shard(d / "x_val_000000.bin", np.asarray(open_shard(DATA / "local_val_000000.bin")[:4096]))
    files = ["--train_files", str(d / "x_train_*.bin"), "--val_files", str(d / "x_val_*.bin"), "--compact_vocab", compact]
    r = run_tiny(tmp_path, "r", *files, "--save_every", "5", "--num_scheduled_iterations", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    log_before = (tmp_path / "logs" / "r.txt").read_bytes()
    if compact == "1":  # fewer distinct ids: the compact vocabulary would shrink too
        write_shard(d / "x_train_000000.bin", good % 500)
    else:
        _rewrite_same_size(d / "x_train_000000.bin")
    assert (d / "x_train_000000.bin").stat().st_size == 1024 + 2 * len(good)
    r = run_tiny(tmp_path, "r", *files, "--resume", "latest", "--num_scheduled_iterations", "10")
    line = _one_error(r, 2, "the data changed since this checkpoint", "train shard x_train_000000.bin changed")
    assert "vocab_size" not in line
    assert (tmp_path / "logs" / "r.txt").read_bytes() == log_before


# ------------------------------------------------------------------------------------------
# One run id, one writer; SIGINT like SIGTERM


def test_one_writer_per_run_id(tmp_path):
    logs = tmp_path / "logs"
    settings = ["--save_every", "5", "--num_scheduled_iterations", "3000", "--val_loss_every", "0"]
    proc = start(tmp_path, "r", *settings)
    try:
        wait_for(lambda: (tmp_path / "ckpt" / "r" / "step_5.pt").exists(), proc)
        assert (logs / "r.lock").read_text().split()[0] == str(proc.pid)
        for extra in ([], ["--resume", "latest"]):  # a second fresh run, and a concurrent resume
            r = run_tiny(tmp_path, "r", *settings, *extra)
            _one_error(r, 2, "r.lock", f"being written by pid {proc.pid}", "one run id has one writer")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 0, out[-2000:]
    assert not (logs / "r.lock").exists()  # released on exit
    log = read_log(logs / "r.txt")
    assert log.status == "preempted" and log.resumed_from == []  # nobody else wrote in it


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / "logs").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket
    (tmp_path / "logs" / "r.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    r = run_tiny(tmp_path, "r", "--num_scheduled_iterations", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"stale lock of pid {dead.pid}" in r.stderr
    assert not (tmp_path / "logs" / "r.lock").exists()


def test_sigint_checkpoints_like_sigterm_and_resume_continues(tmp_path):
    logs = tmp_path / "logs"
    settings = ["--num_scheduled_iterations", "150", "--val_loss_every", "0"]
    proc = start(tmp_path, "r", *settings)
    try:
        wait_for(lambda: log_has_line(logs / "r.txt", "step:3/"), proc)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 0 and "Traceback" not in out, out[-2000:]
    log = read_log(logs / "r.txt")
    assert log.status == "preempted"
    step = int(log.status_fields["step"])
    assert step < 150 and (tmp_path / "ckpt" / "r" / f"step_{step}.pt").exists()
    r = run_tiny(tmp_path, "r", "--resume", "latest", *settings)
    assert r.returncode == 0, r.stderr[-2000:]
    log = read_log(logs / "r.txt")
    assert log.finished and log.resumed_from == [step] and log.last_step == 150


# ------------------------------------------------------------------------------------------
# A frozen rank: the process-group timeout names it


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    for pid in descendants(launcher.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


@pytest.mark.multiprocess
def test_frozen_rank_ends_the_run_naming_it(tmp_path):
    logs = tmp_path / "logs"
    proc = start(tmp_path, "r", "--num_scheduled_iterations", "3000", "--val_loss_every", "0",
                 "--dist_timeout_s", "5", nproc=2)
    frozen = None
    try:
        wait_for(lambda: log_has_line(logs / "r.txt", "step:3/"), proc)
        frozen = _rank_pid(proc, 1)
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        t0 = time.monotonic()
        while proc.poll() is None and not log_has_line(logs / "r.txt", "status:") and time.monotonic() - t0 < 120:
            time.sleep(0.2)
    finally:
        if frozen is not None:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(frozen, sig)
                except ProcessLookupError:
                    pass
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            kill_job(proc)
            out = proc.stdout.read() if proc.stdout else ""
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert any("rank 1 did not answer within the process-group timeout of 5s" in ln for ln in errors), out[-4000:]
    status = _status_line(logs / "r.txt")
    assert status.startswith("status:failed reason:rank_1_did_not_answer")
    assert proc.returncode != 0
