"""Exact resume: a run killed (SIGKILL) after its step-15 checkpoint, or pre-empted (SIGTERM),
and resumed from `latest` logs the same losses, bit for bit, as a run never interrupted, and
ends with the same weights; at 1 rank (python) and 2 ranks (torchrun, gloo)."""

from __future__ import annotations

import shutil
import signal

import pytest
import torch

from checkpoint_runs import TOTAL, kill_job, log_has_line, run, start, wait_for
from harness.checkpoint import list_checkpoints, load
from harness.logs.format import read_log

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("local_corpus"),  # runs on the default data/local
              pytest.mark.multiprocess, pytest.mark.slow]


def _losses(log):
    return ([(r.step, r.train_loss) for r in log.train_steps], [(r.step, r.val_loss) for r in log.val_steps])


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """Uninterrupted runs at 1 and 2 ranks, both started at first use and running beside the
    tests (they only compete for CPU, which changes no number)."""
    procs = {n: (tmp_path_factory.mktemp(f"base{n}"),) for n in (1, 2)}
    procs = {n: (d, start(d, "base", "--save_every", "5", "--save_final", nproc=n)) for n, (d,) in procs.items()}
    done = {}

    def get(nproc: int):
        if nproc not in done:
            tmp, proc = procs[nproc]
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, out[-4000:]
            log = read_log(tmp / "logs" / "base.txt")
            assert log.status == "finished" and len(log.train_steps) == TOTAL
            done[nproc] = (tmp, log)
        return done[nproc]

    yield get
    for _, proc in procs.values():
        if proc.poll() is None:
            kill_job(proc)


def _same_final_state(a, b):
    """Weights and optimizer state of two final checkpoints are equal bit for bit."""
    ca, cb = load(a), load(b)
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for ga, gb in zip(ca["optim"]["muon"]["groups"], cb["optim"]["muon"]["groups"], strict=True):
        assert torch.equal(ga["momentum"], gb["momentum"]) and torch.equal(ga["second_moment"], gb["second_moment"])
    assert ca["optim"]["adam"]["tied"] == cb["optim"]["adam"]["tied"]
    for name, s in ca["optim"]["adam"]["params"].items():
        for key, v in s.items():
            other = cb["optim"]["adam"]["params"][name][key]
            assert torch.equal(v, other) if isinstance(v, torch.Tensor) else v == other, (name, key)
    assert ca["loader"] == cb["loader"]
    assert ca["run_state"]["step"] == cb["run_state"]["step"] == TOTAL


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_then_sigkill_then_resume_latest_is_bit_identical(tmp_path, baselines, nproc):
    """One run, interrupted twice: pre-empted (SIGTERM to the launcher only, as Slurm does;
    torchrun forwards it to the workers), resumed with checkpoints every 5 steps, killed outright
    (SIGKILL to launcher and workers) once its step-15 checkpoint is there, resumed again."""
    log_path, ckpt_dir = tmp_path / "logs" / "job.txt", tmp_path / "ckpt" / "job"

    proc = start(tmp_path, "job", nproc=nproc)  # no --save_every: the pre-emption alone saves
    wait_for(lambda: log_has_line(log_path, "step:3/"), proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    if nproc == 1:
        assert proc.returncode == 0, out[-3000:]
    # (under torchrun the workers exit 0 and torchrun reports the signal it got: exit code 1)
    log = read_log(log_path)
    assert log.status == "preempted", out[-3000:]
    preempted = int(log.status_fields["step"])
    assert 3 <= preempted < 15 and log.last_step == preempted  # at the end of a step
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [preempted]
    assert out.count("received SIGTERM") == nproc  # every worker got it
    assert "--resume latest --run_id job" in out

    save = ["--save_every", "5", "--keep_last", "2", "--resume", "latest"]
    proc = start(tmp_path, "job", *save, nproc=nproc)
    wait_for(lambda: (ckpt_dir / "step_15.pt").exists(), proc)
    kill_job(proc)
    assert read_log(log_path).status is None

    p = run(tmp_path, "job", *save, "--save_final", nproc=nproc)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    log = read_log(log_path)
    assert log.resumed_from[0] == preempted and 15 <= log.resumed_from[1] < TOTAL
    assert log.status == "finished"
    base_dir, base_log = baselines(nproc)
    assert _losses(log) == _losses(base_log)  # every train and val loss, step by step
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [25, 30]  # keep_last 2
    _same_final_state(ckpt_dir / "step_30.pt", base_dir / "ckpt" / "base" / "step_30.pt")


def test_resume_at_another_world_size_reshards_muon_state(tmp_path, baselines):
    """A 1-rank checkpoint continued on 2 ranks: same run, losses to float tolerance. The log
    and checkpoint live elsewhere now (log_dir, checkpoint_dir may differ on resume); with no
    log there, the resumed run starts one with a header and the resumed line."""
    base_dir, base_log = baselines(1)
    src = base_dir / "ckpt" / "base" / "step_25.pt"
    (tmp_path / "moved").mkdir()
    shutil.copy(src, tmp_path / "moved" / "step_25.pt")
    p = run(tmp_path, "base", "--resume", str(tmp_path / "moved" / "step_25.pt"), nproc=2)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "world size 1, resuming at 2" in p.stderr
    log = read_log(tmp_path / "logs" / "base.txt")
    assert log.resumed_from == [25] and log.status == "finished"
    got = {r.step: r.train_loss for r in log.train_steps}
    want = {r.step: r.train_loss for r in base_log.train_steps if r.step > 25}
    assert sorted(got) == sorted(want)
    assert got == pytest.approx(want, abs=2e-3)
    assert log.final_val_loss == pytest.approx(base_log.final_val_loss, abs=2e-3)
