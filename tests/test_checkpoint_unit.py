"""The checkpoint pieces on their own: RNG round trip through weights_only, atomic writes,
keep_last pruning, the config comparison."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from harness import checkpoint as ck
from harness.config import Config


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()
    state = ck.rng_state(torch.device("cpu"))
    ck.write_atomic({"rng": state}, tmp_path / "r.pt")
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ck.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"], torch.device("cpu"))
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[:4] == want[:4] and torch.equal(got[4], want[4])


def test_write_atomic_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "step_5.pt"
    ck.write_atomic({"a": torch.arange(4)}, target)

    class Unsaveable:
        pass

    with pytest.raises(Exception):
        ck.write_atomic({"a": torch.arange(9), "b": Unsaveable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.arange(4))  # the old one stands
    assert [p.name for p in tmp_path.iterdir()] == ["step_5.pt"]  # no temp file left behind


def test_prune_keeps_the_newest_by_step_number_and_clears_temp_files(tmp_path):
    for s in (5, 10, 15, 100, 20):
        (tmp_path / f"step_{s}.pt").write_bytes(b"x")
    (tmp_path / ".step_25.pt.tmp123").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("kept")
    ck.prune(tmp_path, 2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [20, 100]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_100.pt", "step_20.pt"]


def test_config_comparison_ignores_allowed_fields_and_new_default_fields():
    saved = Config(run_id="a", save_every=5, log_dir="x").to_dict()
    now = Config(run_id="b", save_every=50, log_dir="y", resume="latest", compile="off")
    assert ck.config_mismatches(saved, now) == []
    del saved["diag_topk"], saved["seed"]  # fields a newer version added: fine at their default
    assert ck.config_mismatches(saved, now) == []
    now.seed = 7
    assert ck.config_mismatches(saved, now) == ["seed=0 in the checkpoint, 7 now"]
    saved["gone_field"] = 1
    assert "gone_field=1 in the checkpoint is not a config field of this version" in ck.config_mismatches(saved, now)
