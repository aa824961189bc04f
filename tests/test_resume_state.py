"""The whole run state survives a checkpoint round trip, in process at world size 1 (cheap):
a trainer restored from a step-2 checkpoint holds exactly the saved RunState (train_time_ms
included: a resumed run's clock must not restart), loader position, optimizer state and weights;
and a run resumed there ends in the state of the run never interrupted (timing aside, which only
has to keep counting from the saved value)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from harness import checkpoint as ck
from harness import dist as hdist
from harness.config import load_config
from harness.logs.format import read_log
from harness.plan import resolve_plan
from harness.trainer import Trainer, main

TINY = ["--preset", "micro", "--num_scheduled_iterations", "4", "--val_loss_every", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def argv(d, shards_dir, *extra):
    return [*TINY, "--log_dir", str(d / "logs"), "--checkpoint_dir", str(d / "ckpt"), "--run_id", "r",
            "--train_files", str(shards_dir / "local_train_*.bin"), "--val_files", str(shards_dir / "local_val_*.bin"),
            *extra]


def _tensors_equal(a, b, where=""):
    """Nested dicts/lists of tensors and plain values, equal exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_restore_gives_back_the_whole_run_state_and_resume_matches_an_uninterrupted_run(tmp_path, shards_dir,
                                                                                         monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RUN_ID", "RESUME"):
        monkeypatch.delenv(k, raising=False)
    full = tmp_path / "full"
    assert main("train_gpt.py", argv(full, shards_dir, "--save_every", "2", "--save_final")) == 0
    path2 = full / "ckpt" / "r" / "step_2.pt"
    saved = ck.load(path2)
    rs = saved["run_state"]
    # a state worth checking: validated at step 2, some time on the clock, the loader moved on
    assert rs["step"] == 2 and rs["val_step"] == 2 and rs["train_time_ms"] > 0 and rs["last_val_loss"] > 0

    # restore into a fresh trainer: every part of the state is the saved one
    cfg = load_config(argv(full, shards_dir), overrides={"script": "train_gpt.py"}, prog="train_gpt.py")
    info = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)
    t = Trainer(resolve_plan(cfg, info), info)
    t.setup()
    fresh_loader = t.loader.state_dict()
    t.restore(saved, path2)
    assert dataclasses.asdict(t.state) == rs  # step, train_time_ms, last_val_loss, val_step
    assert t.resumed_step == 2
    assert t.loader.state_dict() == saved["loader"] != fresh_loader
    _tensors_equal(t.opt.state_dict(), saved["optim"], "optim")
    _tensors_equal(t.model.state_dict(), saved["model"], "model")

    # resume elsewhere from that checkpoint and run to the end
    part = tmp_path / "part"
    (part / "ckpt" / "r").mkdir(parents=True)
    shutil.copy(path2, part / "ckpt" / "r" / "step_2.pt")
    assert main("train_gpt.py", argv(part, shards_dir, "--save_final", "--resume", "latest")) == 0
    a, b = ck.load(full / "ckpt" / "r" / "step_4.pt"), ck.load(part / "ckpt" / "r" / "step_4.pt")
    ra, rb = dict(a["run_state"]), dict(b["run_state"])
    # the clock kept counting from the saved value (and the log shows it, step by step)
    assert rb.pop("train_time_ms") > rs["train_time_ms"] and ra.pop("train_time_ms") > rs["train_time_ms"]
    log = read_log(part / "logs" / "r.txt")
    assert log.resumed_from == [2] and [r.step for r in log.train_steps] == [3, 4]
    assert all(r.train_time_ms >= rs["train_time_ms"] - 1 for r in log.train_steps)  # logged in whole ms
    assert ra == rb and ra["step"] == 4 and ra["val_step"] == 4
    assert a["loader"] == b["loader"]
    _tensors_equal(a["optim"], b["optim"], "optim")
    _tensors_equal(a["model"], b["model"], "model")
