"""harness.normuon.NorMuon on FSDP2 (fully_shard: DTensor Shard(0) parameters, uneven shards) at
2 gloo ranks (real torchrun, CPU) against the same model and optimizer in one process on the
same global batch: the weights agree within float32 rounding, and the steps moved them."""

import os
import subprocess

import pytest
import torch

from train_utils import ROOT, VENV_BIN

CASES = ["plain", "ord_cautious_wd"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("normuon_fsdp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "normuon_fsdp_worker.py"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return out


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_weights_equal_one_process(fsdp_run, case):
    got = torch.load(fsdp_run / f"{case}.pt")
    sharded, single = got["sharded"], got["single"]
    assert set(sharded) == set(single) == {"a.weight", "b", "c.weight"}
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{case} {k}: {m}")
    from normuon_fsdp_worker import Net

    torch.manual_seed(0)
    start = Net().state_dict()
    assert all((single[k] - start[k]).abs().max() > 1e-3 for k in single)  # the steps did move every matrix
