"""The sharded optimizers at 2 and 3 gloo ranks (real torchrun) against the single-tensor
reference: each rank holds a different gradient, so a mean turned into a sum, a share given
to the wrong rank or a padding matrix that leaks shows in the weights, in the returned gradient
norm or in the gathered optimizer state (tests/optim_reference.py). 3 ranks pad the Muon
groups (8 and 2 matrices) with zero matrices. The weights must also agree across world sizes."""

import json
import math
import os
import subprocess

import pytest
import torch

from harness import dist as hdist
from optim_reference import FLAG_SETS, run_against_reference
from optim_world_worker import run_tied_split
from train_utils import ROOT, VENV_BIN

pytestmark = pytest.mark.multiprocess

WORLD1 = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)
NAMES = ["default", "adam_every_2"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    out = {}
    for n in (2, 3):
        d = tmp_path_factory.mktemp(f"world{n}")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", f"--nproc_per_node={n}",
                               str(ROOT / "tests" / "optim_world_worker.py"), str(d), *NAMES],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out[n] = (proc, d)
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_matches_the_reference_at_n_ranks(worlds, n):
    proc, _ = worlds[n]
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert [line for line in proc.stdout.splitlines() if line.startswith("ok ")] == \
        [f"ok {name} world_size={n}" for name in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_same_weights_at_1_2_3_ranks(worlds, name):
    one = run_against_reference(FLAG_SETS[name], WORLD1).state_dict()
    for n in (2, 3):
        got = torch.load(worlds[n][1] / f"{name}.pt")
        assert set(got) == set(one)
        for k in one:
            torch.testing.assert_close(got[k], one[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n} ranks, {k}: {m}")


@pytest.mark.parametrize("n", [2, 3])
def test_each_rank_holds_only_its_rows_of_the_adam_moments(worlds, n):
    """ZeRO-1: every rank's Adam moments are ceil(rows / n) rows of each parameter, so a rank
    holds about 1/n of the state (plus at most one padded row block per parameter)."""
    _, d = worlds[n]
    together = 0
    for rank in range(n):
        shapes = json.loads((d / f"adam_shapes_{rank}.json").read_text())
        full = sum(2 * math.prod(shape) for shape, _, _ in shapes.values())
        padding = sum(2 * math.prod(shape[1:]) for shape, _, _ in shapes.values())
        held = 0
        for name, (shape, m, v) in shapes.items():
            assert m == v == [math.ceil(shape[0] / n), *shape[1:]], (rank, name)
            held += 2 * math.prod(m)
        assert held <= full / n + padding, (rank, held, full)
        together += held
    assert together >= full  # between them the ranks hold every row


@pytest.mark.parametrize("n", [2, 3])
def test_tied_embedding_and_split_at_n_ranks_as_at_one(worlds, n):
    """The tied head/embedding (one matrix, the head stored transposed) and the split, where the
    embedding takes over the head's moments re-sharded by its own rows: the weights and the
    gathered state at n ranks are those of one rank."""
    one = run_tied_split(WORLD1)
    got = torch.load(worlds[n][1] / "tied_split.pt")
    for name, w in one["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert got["state"]["tied"] is one["state"]["tied"] is False
    for name, s in one["state"]["params"].items():
        assert got["state"]["params"][name]["t"] == s["t"]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["state"]["params"][name][key], s[key], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{name} {key}: {m}")
    # the embedding went on alone after the split
    assert not torch.allclose(one["weights"]["embed"], one["weights"]["lm_head"].T)
