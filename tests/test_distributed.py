"""World-size invariance with real torchrun (gloo) runs: 1, 2, 3 and 4 ranks, 20 steps."""

import numpy as np
import pytest

from train_utils import log_of, losses, run_train

STEPS = ["--num_scheduled_iterations", "20", "--val_loss_every", "10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards_dir):
    out = {}
    for n in (1, 2, 3, 4):
        tmp = tmp_path_factory.mktemp(f"world{n}")
        proc = run_train(tmp, shards_dir, *STEPS, nproc=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = log_of(tmp)
    return out


def test_same_losses_on_1_2_3_4_ranks(runs):
    ref = np.array(losses(runs[1]))
    assert len(ref) == 20 + 3
    for n in (2, 3, 4):
        assert runs[n].config["world_size"] == n
        # 3 ranks pad every Muon group (8 and 2 matrices) with zero matrices; 4 pads the 2s.
        # Summation order differs with the world size (gradient means, accumulation), so the
        # trajectories agree to rounding at first and drift apart as training amplifies it.
        # Since the fork's optimizer rules (measured): 2 ranks within 1e-4 over the first 8
        # steps, but 3 ranks drift from the third step (5e-3 by step 4). Not understood yet:
        # the gradient/state comparison of issue 20 is to tell a bug from amplification.
        got = np.array(losses(runs[n]))
        rel = np.abs(got - ref) / np.abs(ref)
        assert rel[:2].max() <= 1e-4, (n, rel[:2])
        assert rel.max() <= 2e-2, (n, rel)


def test_losses_go_down(runs):
    val = [r.val_loss for r in runs[1].val_steps]
    assert val[-1] < val[0] - 1.0
