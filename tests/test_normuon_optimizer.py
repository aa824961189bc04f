"""harness.normuon.NorMuon (the reusable torch.optim.Optimizer) against the harness's sharded
optimizer on the same matrices and gradients, over several steps with momentum, ORD included."""

import pytest
import torch

from harness import dist as hdist
from harness.config import load_config
from harness.normuon import NorMuon
from harness.optim import MatrixRef, ShardedMuon

WORLD1 = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)
CASES = {
    "plain": ([], {}, dict(weight_decay=0.0)),
    "cautious_wd": (["--muon_wd", "0.5", "--cautious_wd"], {}, dict(weight_decay=0.5, cautious_wd=True)),
    "quintic_no_normuon": (["--normuon", "0", "--ns_method", "quintic"], {},
                           dict(normuon=False, ns_method="quintic")),
    "ord_fork": (["--spectral_lr_mul", "0.1", "--muon_wd", "0.5", "--cautious_wd"], {"ord": True},
                 dict(spectral_lr_mul=0.1, weight_decay=0.5, cautious_wd=True)),
    "ord_projected_before_norm_scaled": (
        ["--spectral_lr_mul", "1.0", "--ord_form", "projected", "--ord_placement", "before_norm", "--ord_units", "mean",
         "--ord_reproject"], {"ord": True},
        dict(spectral_lr_mul=1.0, ord_form="projected", ord_placement="before_norm", ord_reproject=True, grad_scale=4.0)),
}


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 32, generator=g) * 0.1),
            torch.nn.Parameter(torch.randn(32, 96, generator=g) * 0.1),
            torch.nn.Parameter(torch.randn(3, 48, 48, generator=g) * 0.1)]


@pytest.mark.parametrize("case", list(CASES))
def test_same_update_as_the_sharded_optimizer(case):
    flags, overrides, kwargs = CASES[case]
    cfg = load_config(["--muon_lr", "0.03", *flags], env={}, overrides=overrides)
    ours, theirs = _params(), _params()
    refs = []
    for i, p in enumerate(theirs):
        shape = tuple(p.shape[-2:])
        refs += [MatrixRef(f"p{i}.{k}", p, k, "attn_o", shape) for k in range(p.numel() // (shape[0] * shape[1]))]
    sharded = ShardedMuon(refs, cfg, WORLD1)
    opt = NorMuon(ours, lr=0.03, **kwargs)
    unit_scale = 1.0 / kwargs.get("grad_scale", 1.0)
    start = [p.detach().clone() for p in ours]
    for step, mu in enumerate([0.85, 0.9, 0.95, 0.95]):
        g = torch.Generator().manual_seed(100 + step)
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        for group in opt.param_groups:
            group["momentum"] = mu
        opt.step()
        sharded.step(1.0, mu, unit_scale)
    for p, q, s in zip(ours, theirs, start):
        assert not torch.equal(p, s)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_ord_at_zero_is_the_standard_update_and_ord_changes_it():
    runs = {}
    for name, kwargs in {"std": {}, "ord0": dict(spectral_lr_mul=0.0), "ord1": dict(spectral_lr_mul=1.0)}.items():
        ps = _params()
        opt = NorMuon(ps, **kwargs)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[name] = ps
    assert all(torch.equal(a, b) for a, b in zip(runs["std"], runs["ord0"]))
    assert not any(torch.allclose(a, b) for a, b in zip(runs["std"], runs["ord1"]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs Adam"):
        NorMuon([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="ord_form"):
        NorMuon(_params(), ord_form="other")
    with pytest.raises(ValueError, match="lr"):
        NorMuon(_params(), lr=0)
