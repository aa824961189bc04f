"""The run plan (harness/plan.py): everything a run depends on is resolved before the first
step into a frozen plan, and the config the caller validated is left as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from base import UserError
from harness import dist as hdist
from harness.config import load_config
from harness.plan import resolve_plan

INFO = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)


def _cfg(shards_dir, *extra):
    return load_config(["--preset", "micro", "--train_files", str(shards_dir / "local_train_*.bin"),
                        "--val_files", str(shards_dir / "local_val_*.bin"), *extra], env={},
                       overrides={"script": "train_gpt.py"})


def test_plan_resolves_vocab_and_run_id_without_touching_the_config(shards_dir):
    cfg = _cfg(shards_dir, "--compact_vocab", "1")
    before = dataclasses.asdict(cfg)
    plan = resolve_plan(cfg, INFO)
    assert dataclasses.asdict(cfg) == before  # vocab_size and run_id stay as given
    assert cfg.vocab_size == 50304 and cfg.run_id == ""
    used = int(plan.token_map.max()) + 1
    assert plan.cfg.vocab_size % 128 == 0 and used <= plan.cfg.vocab_size < used + 128
    assert plan.cfg.run_id.startswith("train_gpt-")
    assert plan.resume is None and plan.total == len(plan.steps) == cfg.num_scheduled_iterations
    assert [r.batch_tokens for r in plan.steps] == [plan.schedule.batch_size(s) for s in range(plan.total)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.cfg = cfg


def test_plan_refuses_an_invalid_config(shards_dir):
    with pytest.raises(UserError, match="batch_sizes"):
        resolve_plan(_cfg(shards_dir, "--batch_sizes", "100,100,100,100"), INFO)
