"""The speedrun trainer's warm-up (the fork's "Warmup kernels"): the step runs at every shape the
run will meet, off the clock, and everything it changed is put back, so the timed run is the run
without warm-up bit for bit. In process, at the reduced speedrun size (tests/test_speedrun_train.py)."""

from __future__ import annotations

import pytest
import torch

from base import UserError
from harness import dist as hdist
from harness.config import load_config, validate
from harness.plan import resolve_plan
from harness.speedrun_schedule import ForwardSchedule
from harness.speedrun_train import SpeedrunTrainer, warmup_steps
from train_utils import REDUCED


def _trainer(shards_dir, *extra):
    cfg = load_config([*REDUCED, "--train_files", str(shards_dir / "local_train_*.bin"),
                       "--val_files", str(shards_dir / "local_val_*.bin"), *extra], env={})
    info = hdist.init()
    t = SpeedrunTrainer(resolve_plan(cfg, info), info)
    t.setup()
    return t


def _state(t):
    return ({k: v.clone() for k, v in t.model.state_dict().items()},
            {n: (e.exp_avg.clone(), e.exp_avg_sq.clone(), e.t) for n, e in
             ((e.name, e) for e in t.opt.adam.entries)},
            [(g.momentum.clone(), g.second_moment.clone()) for g in t.opt.muon.groups],
            t.loader.state_dict(), torch.get_rng_state())


def _same(a, b):
    ma, aa, mua, la, ra = a
    mb, ab, mub, lb, rb = b
    assert ma.keys() == mb.keys()
    assert [k for k in ma if not torch.equal(ma[k], mb[k])] == []
    assert aa.keys() == ab.keys()
    for k in aa:
        assert torch.equal(aa[k][0], ab[k][0]) and torch.equal(aa[k][1], ab[k][1]) and aa[k][2] == ab[k][2]
    assert all(torch.equal(x, y) for p, q in zip(mua, mub) for x, y in zip(p, q))
    assert la == lb and torch.equal(ra, rb)


def test_warmup_steps_are_the_forks_sample():
    # the fork: {0, 1, 2} | {s-1, s, s+1 for each stage start after the first}
    s = ForwardSchedule(1560, 40)
    assert warmup_steps(s) == [0, 1, 2, 519, 520, 521, 1039, 1040, 1041, 1559, 1560, 1561]
    assert warmup_steps(ForwardSchedule(3, 1, block=16)) == [0, 1, 2, 3]


@pytest.fixture
def deterministic():
    """CPU embedding backward accumulates in a thread-dependent order: two runs WITHOUT warm-up
    already differ in the last bits by step 3 unless torch's deterministic algorithms are on."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.slow
def test_warmup_restores_everything_and_the_run_is_bit_identical(shards_dir, deterministic):
    warm = _trainer(shards_dir)
    assert warm.cfg.warmup  # on in the speedrun preset
    before = _state(warm)
    calls = []
    fwd = warm.forward
    warm.forward = lambda *a: (calls.append(a[0].shape), fwd(*a))[1]
    assert warm.warmup() == [0, 1, 2, 3]
    warm.forward = fwd
    assert len(calls) == 4 * (1 + warm.grad_accum)  # a validation forward and the micro-batches per step
    _same(_state(warm), before)
    assert warm.opt.adam.tied and warm._fwd_args == (None, None)

    cold = _trainer(shards_dir, "--warmup", "0")
    _same(_state(cold), before)
    for step in range(4):
        lw, lc = warm.train_step(warm.plan.steps[step], False), cold.train_step(cold.plan.steps[step], False)
        assert lw == lc, step  # exactly
    assert warm.validate() == cold.validate()
    _same(_state(warm), _state(cold))


def test_warmup_is_off_in_tiny_and_refused_with_the_gpt_model():
    assert not load_config([], env={}).warmup
    with pytest.raises(UserError, match=r"config: warmup=True is invalid: only with model=speedrun"):
        validate(load_config(["--warmup", "1"], env={}))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_with_and_without_warmup_log_the_same_run(tmp_path, shards_dir):
    """Through torchrun at 2 gloo ranks (the optimizer's state is gathered and re-sharded around
    the warm-up): the same logged losses, and the warm-up line in the log. A checkpoint written
    with warm-up resumes without it (warmup may differ on resume: it does not change the run)."""
    from train_utils import log_of, run_train

    runs = {}
    for warm in ("0", "1"):
        d = tmp_path / f"w{warm}"
        proc = run_train(d, shards_dir, *REDUCED, "--warmup", warm, "--checkpoint_dir", str(d / "ck"),
                         "--save_every", "2", nproc=2, small=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = log_of(d)
        runs[warm] = [(r.step, r.train_loss) for r in log.train_steps] + [(r.step, r.val_loss) for r in log.val_steps]
        text = (d / "logs" / "run.txt").read_text()
        assert ("warmup: steps [0, 1, 2, 3] in " in text) == (warm == "1")
    assert runs["0"] == runs["1"]
    w1 = tmp_path / "w1"
    again = run_train(w1, shards_dir, *REDUCED, "--warmup", "0", "--checkpoint_dir", str(w1 / "ck"),
                      "--resume", str(w1 / "ck" / "run" / "step_2.pt"), nproc=2, small=False)
    assert again.returncode == 0, again.stderr[-3000:]
