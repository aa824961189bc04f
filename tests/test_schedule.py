"""The speedrun schedule against a table computed independently here."""

import dataclasses

import pytest

from harness.config import load_config
from harness.schedule import Schedule


def expected_speedrun(step: int) -> tuple[float, int]:
    # docs/REFERENCE.md: S = 1560, E = 40, boundaries round(1560/3) = 520 and round(2*1560/3) = 1040,
    # cooldown from c = int(1560 * (1 - 0.55)) down to 0.1 at 1560, then the extension at 0.1.
    # In floating point 1 - 0.55 = 0.44999999999999996, so c = int(701.99999...) = 701, as
    # modded-nanogpt's own code computes it.
    muls = [1.0, 1.52, 1.73]
    sizes = [131072, 262144, 393216, 393216]
    if step >= 1560:
        return 0.1, sizes[3]
    stage = 0 if step < 520 else 1 if step < 1040 else 2
    m = muls[stage]
    if step >= 701:
        t = (step - 701) / (1560 - 701)
        m = m * (1 - t) + 0.1 * t
    return m, sizes[stage]


def test_speedrun_table():
    sched = Schedule.from_config(load_config(["--preset", "speedrun"], env={}))
    assert sched.total == 1600
    for step in range(1600):
        lr, bs = expected_speedrun(step)
        assert sched.lr_mul(step) == pytest.approx(lr, abs=1e-12), step
        assert sched.batch_size(step) == bs, step
    # spot values a reader can check by hand
    assert sched.lr_mul(700) == 1.52 and sched.lr_mul(701) == 1.52
    assert sched.lr_mul(1039) == pytest.approx(1.52 * (1 - 338 / 859) + 0.1 * 338 / 859)
    assert sched.lr_mul(1040) == pytest.approx(1.73 * (1 - 339 / 859) + 0.1 * 339 / 859)


def test_no_cooldown_extension_runs_at_the_final_multiplier():
    # the fork's get_lr: with cooldown_frac 0 the cooldown starts at S with zero length, so the
    # extension runs at lr_decay_final; the extension's own multiplier is never used
    sched = Schedule.from_config(load_config(["--cooldown_frac", "0", "--lr_muls", "1,2,3,4", "--num_scheduled_iterations",
                                              "60", "--num_extension_iterations", "6"], env={}))
    assert [sched.lr_mul(s) for s in (0, 20, 40, 59, 60, 65)] == [1, 2, 3, 3, 0.1, 0.1]


def test_split_step_is_the_odd_start_of_the_stage():
    sched = Schedule.from_config(load_config(["--preset", "speedrun"], env={}))
    assert sched.split_step(2) == 1041 and sched.split_step(1) == 521 and sched.split_step(0) == 1


def test_momentum_warmup_and_cooldown():
    sched = Schedule.from_config(load_config(["--preset", "speedrun"], env={}))
    assert sched.muon_momentum(0) == pytest.approx(0.85)
    assert sched.muon_momentum(150) == pytest.approx(0.90)
    assert sched.muon_momentum(300) == pytest.approx(0.95)
    assert sched.muon_momentum(1550) == pytest.approx(0.95)
    assert sched.muon_momentum(1575) == pytest.approx(0.90)
    # a run shorter than warm-up + cool-down: the warm-up wins where they overlap (the fork's rule)
    short = Schedule.from_config(load_config(["--num_scheduled_iterations", "60"], env={}))
    assert short.muon_momentum(30) == pytest.approx(0.85 + 30 / 300 * 0.1)
    assert short.muon_momentum(65) == pytest.approx(0.85 + 65 / 300 * 0.1)


def test_validation_steps():
    cfg = load_config(["--preset", "speedrun", "--val_loss_last_steps", "100", "--val_loss_every_last", "10"], env={})
    sched = Schedule.from_config(cfg)
    steps = [s for s in range(sched.total + 1) if sched.validate_at(s)]
    assert steps[:3] == [0, 50, 100]
    assert steps[-11:] == [1500, 1510, 1520, 1530, 1540, 1550, 1560, 1570, 1580, 1590, 1600]
    assert 1450 in steps and 1475 not in steps and 1505 not in steps


def test_step_records_are_the_speedrun_table():
    # the training loop walks these records: one per step, the table's batch size and LR
    # multiplier, the momentum schedule, and whether a validation comes first
    cfg = load_config(["--preset", "speedrun"], env={})
    records = Schedule.from_config(cfg).steps()
    assert [r.step for r in records] == list(range(1600))
    for r in records:
        lr, bs = expected_speedrun(r.step)
        assert r.lr_mul == pytest.approx(lr, abs=1e-12) and r.batch_tokens == bs, r
    assert [r.stage for r in records[519:522]] == [0, 1, 1] and records[1560].stage == 3
    assert records[0].muon_momentum == pytest.approx(0.85) and records[300].muon_momentum == pytest.approx(0.95)
    assert [r.step for r in records if r.validate_before][:3] == [0, 50, 100]
    with pytest.raises(dataclasses.FrozenInstanceError):
        records[0].lr_mul = 2.0
