"""train_gpt_muon_new.py: ORD with spectral_lr_mul = 0 is the standard run bit for bit; the four
variants differ; the diagnostics are logged."""

import copy

import pytest
import torch

from harness import dist as hdist
from harness.config import load_config
from harness.model import GPT, ModelShape
from harness.optim import Optimizers
from optim_reference import SMALL
from train_utils import log_of, run_train

STEPS = ["--num_scheduled_iterations", "20", "--val_loss_every", "10"]
WORLD1 = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)


def logged_losses(log):
    """The loss values exactly as written (strings), step lines in order."""
    return [(r.step, r.values.get("train_loss"), r.values.get("val_loss")) for r in log.train_steps + log.val_steps]


@pytest.mark.multiprocess
def test_zero_multiplier_is_bit_identical_to_train_gpt(tmp_path, shards_dir):
    std = run_train(tmp_path / "std", shards_dir, *STEPS, nproc=2)
    ord0 = run_train(tmp_path / "ord", shards_dir, *STEPS, "--spectral_lr_mul", "0", nproc=2,
                     script="train_gpt_muon_new.py")
    assert std.returncode == 0 and ord0.returncode == 0, ord0.stderr[-3000:]
    a, b = log_of(tmp_path / "std"), log_of(tmp_path / "ord")
    assert b.config["ord"] is True and b.config["spectral_lr_mul"] == 0.0 and b.config["script"] == "train_gpt_muon_new.py"
    assert a.config["ord"] is False and a.config["spectral_lr_mul"] is None  # the standard run records no s
    assert len(a.train_steps) == 20
    assert logged_losses(a) == logged_losses(b)
    # the ORD script logs its diagnostics at validation steps, gathered from both ranks
    names = {d.layer for d in b.diags if d.step == 10}
    assert "blocks.0.attn.qkv.q" in names and "blocks.1.mlp.proj.weight" in names and len(names) == 12
    for d in b.diags:
        assert {"rho", "spectral_frac", "update_norm", "cos_update_w"} <= set(d.values)
    assert (b.config["ord_placement"], b.config["ord_form"], b.config["ord_units"]) == ("after_norm", "interpolated", "fork")


def test_zero_multiplier_update_is_bitwise_the_standard_one():
    flags = SMALL
    torch.manual_seed(0)
    base = GPT(ModelShape.from_config(load_config(flags, env={})))
    models, opts = [], []
    for ord_flags in ({"ord": False}, {"ord": True, "spectral_lr_mul": 0.0}):
        m = copy.deepcopy(base)
        models.append(m)
        opts.append(Optimizers(m, load_config(flags, env={}, overrides=ord_flags), WORLD1))
    for step in range(4):
        for m, opt in zip(models, opts):
            g = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(step, 1.0, 0.9, unit_scale=16.0, collect_stats=True)
            opt.zero_grad()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(p, q)


def test_four_variants_differ(tmp_path, shards_dir):
    variants = {
        "polar_g": ["--spectral_lr_mul", "0"],
        "polar_gperp": ["--spectral_lr_mul", "0", "--ord_form", "projected"],
        "half": ["--spectral_lr_mul", "0.5"],
        "half_mean_units": ["--spectral_lr_mul", "0.5", "--ord_units", "mean"],
    }
    short = ["--num_scheduled_iterations", "6", "--val_loss_every", "3"]
    seen = {}
    for name, flags in variants.items():
        proc = run_train(tmp_path / name, shards_dir, *short, *flags, script="train_gpt_muon_new.py")
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = log_of(tmp_path / name)
        seen[name] = tuple(r.train_loss for r in log.train_steps[1:])
    assert len(set(seen.values())) == 4, seen


def test_before_norm_placement_is_logged(tmp_path, shards_dir):
    short = ["--num_scheduled_iterations", "2", "--val_loss_every", "0", "--spectral_lr_mul", "1.0"]
    proc = run_train(tmp_path, shards_dir, *short, "--ord_placement", "before_norm",
                     script="train_gpt_muon_new.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log_of(tmp_path).config["ord_placement"] == "before_norm"


def test_placements_give_different_updates():
    """before_norm: G_par goes through NorMuon's normalisation; after_norm: it is added after."""
    from harness.optim import MuonRule, muon_update

    torch.manual_seed(6)
    W, grad = torch.randn(32, 16), torch.randn(32, 16) + 0.5 * torch.randn(32, 16)
    grad = grad + 2.0 * W  # a strong radial component
    outs = {}
    for placement in ("after_norm", "before_norm"):
        cfg = load_config(["--spectral_lr_mul", "1.0", "--ord_placement", placement], env={}, overrides={"ord": True})
        rule = MuonRule.from_config(cfg, torch.device("cpu"))
        outs[placement] = muon_update(grad[None].clone(), W[None].clone(), torch.zeros(1, 32, 16), torch.zeros(1, 32, 1),
                                      0.0, rule, 1.0).update
    rel = (outs["after_norm"] - outs["before_norm"]).norm() / outs["after_norm"].norm()
    assert rel > 1e-2


def test_bad_ord_values(tmp_path, shards_dir):
    for flags, needle in ((["--spectral_lr_mul", "-0.1"], "spectral_lr_mul=-0.1"),
                          (["--spectral_lr_mul", "inf"], "spectral_lr_mul=inf"),
                          (["--ord_placement", "sideways"], "after_norm or before_norm")):
        proc = run_train(tmp_path, shards_dir, *flags, script="train_gpt_muon_new.py")
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0]
