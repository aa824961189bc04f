"""The speedrun preset's forward schedule (against the fork's TrainingSchedule where ../shared is
present) and an end-to-end CPU run of `train_gpt.py --preset speedrun` at a reduced size."""

from __future__ import annotations

import math

import pytest
import torch

import fork_model_reference as fr
from base import UserError
from harness.config import load_config
from harness.speedrun_model import SpeedrunGPT
from harness.speedrun_schedule import FORK_STAGES, ForwardSchedule, ForwardState
from train_utils import REDUCED, error_lines, log_of, run_train

def test_speedrun_preset_is_the_forks_model():
    cfg = load_config(["--preset", "speedrun"], env={})
    assert (cfg.model, cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.head_dim) == ("speedrun", 11, 768, 6, 128)
    assert (cfg.bigram_vocab_size, cfg.micro_batches, cfg.val_batch_size, cfg.window_block) == (
        50304 * 5, 8, 4 * 64 * 1024 * 8, 128)
    assert load_config([], env={}).model == "gpt"  # tiny keeps the current model
    with pytest.raises(UserError, match=r"config: model='llama' is invalid: gpt, classic or speedrun"):
        load_config(["--model", "llama"], env={})


@pytest.mark.skipif(not fr.FORK_TRAIN.exists(), reason=fr.SKIP_REASON)
@pytest.mark.parametrize("S,E", [(1560, 40), (9, 2), (3, 0)])
def test_forward_schedule_matches_the_forks(S, E):
    import itertools

    fork = fr.load(("TrainingStage", "TrainingSchedule", "TRAINING_STAGES"),
                   extra=dict(accumulate=itertools.accumulate, pairwise=itertools.pairwise))
    theirs = fork.TrainingSchedule(fork.TRAINING_STAGES, S, E)
    ours = ForwardSchedule(S, E, block=128)
    assert ours.boundaries == theirs.boundaries and ours.split_step == theirs.split_step
    for step in range(S + E + 1):
        stage, t = theirs.lookup(step)
        assert ours.mtp_weights(step) == pytest.approx(theirs.mtp_weights[step].tolist())
        short, long = ours.windows(step)
        want_long = 20 if step == S + E else stage.window_sizes[1]  # apply_final_ws_ext at the last val
        assert (short, long) == (stage.window_sizes[0] * 128, want_long * 128)


def test_yarn_replays_every_window_change_in_order():
    kw = dict(vocab_size=128, model_dim=48, num_heads=4, head_dim=12, bigram_vocab_size=97, max_seq_len=64)
    sched = ForwardSchedule(9, 2, block=4)
    walked, jumped = SpeedrunGPT(**kw), SpeedrunGPT(**kw)
    a, b = ForwardState(sched, walked, "cpu"), ForwardState(sched, jumped, "cpu")
    for step in range(10):
        a.advance(step)
    b.advance(9)  # a resumed run: straight into the extension
    longs = [s.windows[1] for s in FORK_STAGES]
    scale = 0.1
    for old, new in zip(longs, longs[1:]):
        scale *= 0.2 * math.log(new / old) + 1
    for m in (walked, jumped):
        assert m.yarn.attn_scale == pytest.approx(scale) and m.yarn_paired.attn_scale == pytest.approx(scale)
    assert torch.equal(walked.yarn.factor1, jumped.yarn.factor1)
    assert torch.equal(walked.yarn_paired.factor2, jumped.yarn_paired.factor2)


def test_reduced_speedrun_runs_end_to_end_on_cpu(tmp_path, shards_dir):
    proc = run_train(tmp_path, shards_dir, *REDUCED, small=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = log_of(tmp_path)
    assert log.status == "finished"
    vals = [r.val_loss for r in log.val_steps]
    trains = [r.train_loss for r in log.train_steps]
    assert len(trains) == 4 and len(vals) == 2 and all(math.isfinite(v) for v in vals + trains)
    assert [int(r.get("batch_size")) for r in log.train_steps] == [256, 512, 512, 512]
    assert vals[-1] < vals[0]  # it learns, even in four steps


def test_speedrun_bad_setting_is_one_clear_line(tmp_path, shards_dir):
    proc = run_train(tmp_path, shards_dir, *REDUCED, "--micro_batches", "3", small=False)
    assert proc.returncode == 2
    assert error_lines(proc) == ["error: config: val_batch_size=512 is invalid: must be a positive multiple of "
                                 "micro_batches=3"]


def test_resume_mid_run_gives_the_same_losses(tmp_path, shards_dir):
    """The packed loader's position, and YaRN replayed over the stages, come back on resume."""
    ck = ["--checkpoint_dir", str(tmp_path / "ck")]
    full = run_train(tmp_path, shards_dir, *REDUCED, *ck, "--save_every", "2", small=False)
    assert full.returncode == 0, full.stderr[-3000:]
    before = [(r.step, r.train_loss) for r in log_of(tmp_path).train_steps]
    final = log_of(tmp_path).val_steps[-1].val_loss
    step2 = tmp_path / "ck" / "run" / "step_2.pt"
    again = run_train(tmp_path, shards_dir, *REDUCED, *ck, "--resume", str(step2), small=False)
    assert again.returncode == 0, again.stderr[-3000:]
    log = log_of(tmp_path)
    assert [(r.step, r.train_loss) for r in log.train_steps] == before  # steps 3, 4 redone identically
    assert log.val_steps[-1].val_loss == final
