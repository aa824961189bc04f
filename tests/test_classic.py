"""The classic baseline (--preset classic): nanoGPT's GPT-2 and AdamW through our trainer.

The model is checked against a forward pass written out here with torch's primitives (GPT-2's
equations), the optimizer against torch.optim.AdamW stepped by hand on the mean loss's
gradient, the schedule against nanoGPT's get_lr, and the whole preset by real runs (1 and 2
gloo ranks, resume)."""

from __future__ import annotations

import math

import pytest
import torch

from harness import dist as hdist
from harness.adamw import DataParallelAdamW
from harness.classic_model import ClassicGPT, ClassicShape
from harness.config import load_config
from harness.logs.format import RunLog, StepRecord
from harness.schedule import Schedule
from harness.speedrun_stats import time_to_loss
from base import UserError

from train_utils import log_of, losses, run_train

SHAPE = ClassicShape(vocab_size=96, num_layers=2, model_dim=32, num_heads=4, mlp_ratio=4, seq_len=16)
WORLD1 = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)


def gpt2_forward(model: ClassicGPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's logits from the model's weights, written out with explicit causal softmax."""
    p = dict(model.named_parameters())
    B, T = idx.shape
    d, H = SHAPE.model_dim, SHAPE.num_heads

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]

    def lin(x, name):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    x = p["wte.weight"][idx] + p["wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(SHAPE.num_layers):
        q, k, v = lin(ln(x, f"blocks.{i}.ln_1"), f"blocks.{i}.attn.c_attn").split(d, dim=-1)
        q, k, v = (t.view(B, T, H, d // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // H)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, T, d), f"blocks.{i}.attn.c_proj")
        h = lin(ln(x, f"blocks.{i}.ln_2"), f"blocks.{i}.mlp.c_fc")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU (nn.GELU's default)
        x = x + lin(h, f"blocks.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ p["wte.weight"].T


def test_model_is_gpt2_written_out():
    torch.manual_seed(0)
    model = ClassicGPT(SHAPE)
    with torch.no_grad():  # non-trivial norms and biases, so a dropped term shows
        for name, q in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_") or name.endswith(".bias"):
                q.add_(torch.randn_like(q) * 0.1)
    idx = torch.randint(0, SHAPE.vocab_size, (3, SHAPE.seq_len))
    torch.testing.assert_close(model.logits(idx), gpt2_forward(model, idx), rtol=1e-5, atol=1e-5)
    # parameter count: GPT-2's formula with a tied head
    V, T, L, d = SHAPE.vocab_size, SHAPE.seq_len, SHAPE.num_layers, SHAPE.model_dim
    assert sum(q.numel() for q in model.parameters()) == V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d


def test_head_is_the_embedding_and_init_is_gpt2s():
    shape = ClassicShape(vocab_size=512, num_layers=8, model_dim=256, num_heads=4, mlp_ratio=4, seq_len=64)
    torch.manual_seed(0)
    model = ClassicGPT(shape)
    idx = torch.randint(0, 512, (2, 8))
    model(idx, idx).backward()
    # a tied head: the embedding's gradient has rows for every vocabulary entry, not just those in idx
    unused = torch.ones(512, dtype=torch.bool)
    unused[idx.unique()] = False
    assert model.wte.weight.grad[unused].abs().sum() > 0
    assert abs(model.wte.weight.std().item() - 0.02) < 0.001
    assert abs(model.blocks[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert model.blocks[0].attn.c_attn.bias.abs().sum() == 0 and (model.ln_f.weight == 1).all()


def test_adamw_step_is_torch_adamw_on_the_mean_loss_gradient():
    cfg = load_config(["--preset", "classic", "--adam_lr", "0.01"], env={})
    torch.manual_seed(0)
    ours, ref = ClassicGPT(SHAPE), ClassicGPT(SHAPE)
    ref.load_state_dict(ours.state_dict())
    opt = DataParallelAdamW(ours, cfg, WORLD1)
    decay = [q for q in ref.parameters() if q.dim() >= 2]
    no_decay = [q for q in ref.parameters() if q.dim() < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    unit = 8.0  # the trainer's gradient units: unit x the mean loss
    for step, lr_mul in enumerate((0.5, 1.0, 0.25)):
        idx = torch.randint(0, SHAPE.vocab_size, (2, SHAPE.seq_len))
        (ours(idx, idx.roll(1)) * unit).backward()
        ref(idx, idx.roll(1)).backward()
        norm, stats = opt.step(step, lr_mul, 0.0, unit_scale=unit, clip=1.0)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        for g in ref_opt.param_groups:
            g["lr"] = 0.01 * lr_mul
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert stats == {} and norm == pytest.approx(float(ref_norm), rel=1e-5)
        assert norm > 1.0  # clipping was active
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert opt.assignment["blocks.0.ln_1.bias"] == "adamw_no_decay" and opt.assignment["wte.weight"] == "adamw_decay"


def test_schedule_is_nanogpts_get_lr():
    cfg = load_config(["--preset", "classic"], env={})
    sched = Schedule.from_config(cfg)
    W, N, lr, min_lr = cfg.lr_warmup_steps, cfg.num_scheduled_iterations, 1.0, cfg.lr_decay_final

    def get_lr(it):  # nanoGPT train.py, with lr_decay_iters = max_iters
        if it < W:
            return lr * (it + 1) / (W + 1)
        ratio = (it - W) / (N - W)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    assert [sched.lr_mul(s) for s in range(N)] == pytest.approx([get_lr(s) for s in range(N)], rel=1e-12)
    assert sched.lr_mul(0) < sched.lr_mul(W) == 1.0 and sched.lr_mul(N - 1) == pytest.approx(min_lr, rel=1e-3)


def test_time_to_loss_interpolates_between_validations():
    log = RunLog()
    for step, loss, t in ((0, 10.0, 0.0), (10, 5.0, 1000.0), (20, 3.0, 2000.0), (30, 2.0, 3000.0)):
        log.val_steps.append(StepRecord(step, 30, {"val_loss": loss, "train_time": t}))
    assert time_to_loss(log, 4.0) == pytest.approx(1500.0)
    assert time_to_loss(log, 3.0) == pytest.approx(2000.0)
    assert time_to_loss(log, 12.0) == 0.0
    assert time_to_loss(log, 1.0) is None


@pytest.mark.parametrize("flags, needle", [
    (["--optimizer", "muon"], "optimizer='muon' is invalid: adamw with model=classic"),
    (["--lr_decay_shape", "exp"], "lr_decay_shape='exp' is invalid: linear or cosine"),
    (["--diag_every", "2"], "diag_every=2 is invalid: 0 with optimizer=adamw"),
])
def test_classic_refuses_what_it_cannot_do(flags, needle):
    with pytest.raises(UserError, match=needle):
        load_config(["--preset", "classic", *flags], env={})


def test_classic_preset_trains_at_one_and_two_ranks_and_resumes(tmp_path, shards_dir):
    args = ["--preset", "classic", "--sampling", "random", "--lr_warmup_steps", "2", "--save_every", "3", "--keep_last", "3",
            "--checkpoint_dir", str(tmp_path / "ckpt")]
    one = run_train(tmp_path / "one", shards_dir, *args)
    assert one.returncode == 0, one.stderr
    log = log_of(tmp_path / "one")
    assert log.status == "finished" and log.config["model"] == "classic" and log.config["optimizer"] == "adamw"
    first, last = log.val_steps[0].val_loss, log.final_val_loss
    assert last < first - 0.2  # it learns (6 steps at lr 1e-3 from ~ln(50304) = 10.8)
    two = run_train(tmp_path / "two", shards_dir, *args, nproc=2)
    assert two.returncode == 0, two.stderr
    assert losses(log_of(tmp_path / "two")) == pytest.approx(losses(log), rel=2e-4)
    # resume from step 3 (in a fresh log folder): the same losses as the run that went straight through
    resumed = run_train(tmp_path / "three", shards_dir, *args[:-2], "--resume",
                        str(tmp_path / "ckpt" / "run" / "step_3.pt"), "--checkpoint_dir", str(tmp_path / "ckpt2"))
    assert resumed.returncode == 0, resumed.stderr
    again = log_of(tmp_path / "three")
    assert again.resumed_from == [3]
    assert [r.train_loss for r in again.train_steps if r.step > 3] == \
        pytest.approx([r.train_loss for r in log.train_steps if r.step > 3], rel=1e-6)
    assert again.final_val_loss == pytest.approx(last, rel=1e-6)
