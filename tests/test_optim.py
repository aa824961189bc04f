"""The optimizers at world size 1 against independent references."""

import copy
import math

import pytest
import torch

from harness import dist as hdist
from harness.config import load_config
from harness.optim import MatrixRef, MuonRule, Optimizers, ShardedMuon, muon_update, ord_split
from kernels import orthogonalize
from optim_reference import FLAG_SETS, accumulate, micro_grads, run_against_reference, small_model

WORLD1 = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)


def random_grads(model, seed):
    """Accumulate a random gradient, as backward does (Adam's may be kept from the last step)."""
    accumulate(model, micro_grads(model, seed, [0]))


@pytest.mark.parametrize("flags", list(FLAG_SETS), ids=list(FLAG_SETS))
def test_sharded_optimizer_matches_single_tensor_reference(flags):
    """Weights, the returned gradient norm and the whole optimizer state after each of 4 steps
    (at 2 and 3 gloo ranks: test_optim_world.py)."""
    run_against_reference(FLAG_SETS[flags], WORLD1)


def test_stacks_are_orthogonalized_per_matrix():
    cfg, model = small_model()
    opt = Optimizers(model, cfg, WORLD1)
    names = [r.name for g in opt.muon.groups for r in g.refs]
    assert "blocks.0.attn.qkv.q" in names and "blocks.0.attn.qkv.v" in names
    assert opt.assignment["blocks.0.attn.qkv"] == "muon"
    assert opt.assignment["embed.weight"] == "adam_embed" and opt.assignment["lm_head.weight"] == "adam_lm_head"
    assert opt.assignment["blocks.0.lambdas"] == "adam_scalars"
    # one group per matrix shape: (32, 32) holds q, k, v and proj of both layers
    shapes = {g.shape: len(g.refs) for g in opt.muon.groups}
    assert shapes == {(32, 32): 8, (128, 32): 2, (32, 128): 2}


def test_matches_torch_optim_muon():
    """Quintic coefficients, no NorMuon, no weight decay: the same update as torch.optim.Muon
    (which runs Newton-Schulz in bfloat16 and normalises by ||G|| without our 2% margin)."""
    cfg = load_config(["--ns_method", "quintic", "--normuon", "0", "--muon_wd", "0", "--ns_dtype", "bfloat16",
                       "--muon_lr", "0.02"], env={})
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32, 96)),
            torch.nn.Parameter(torch.randn(48, 48))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    muon = ShardedMuon([MatrixRef(f"m{i}", p, 0, "attn_o", tuple(p.shape)) for i, p in enumerate(ours)], cfg, WORLD1)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True,
                           ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=5)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        muon.step(1.0, 0.95)
        ref.step()
    for p, q, s in zip(ours, theirs, start):
        delta_ours, delta_ref = p.detach() - s, q.detach() - s
        rel = (delta_ours - delta_ref).norm() / delta_ref.norm()
        assert rel < 0.03, rel  # bf16 iterations and the 2% normalisation margin


def _polar(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


@pytest.mark.parametrize("cond", [None, 1e3])
def test_polar_express_beats_quintic(cond):
    torch.manual_seed(1)
    G = torch.randn(128, 256)
    if cond:
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        G = U @ torch.diag(torch.logspace(0, -math.log10(cond), 128)) @ Vh
    results = {}
    for method in ("polar_express", "quintic"):
        O = orthogonalize(G, method=method, steps=5, dtype=torch.float32)
        sv = torch.linalg.svdvals(O.double())
        results[method] = ((sv - 1).abs().max().item(), (O - _polar(G)).norm().item())
    assert results["polar_express"][0] < results["quintic"][0]
    assert results["polar_express"][1] < results["quintic"][1]


# --- ORD -------------------------------------------------------------------------------------


def test_ord_split_matches_float64():
    torch.manual_seed(2)
    G, W = torch.randn(5, 48, 32), torch.randn(5, 48, 32)
    rho, G_par = ord_split(G, W, 1e-12)
    G_perp = G - G_par
    dots = (G_perp.double() * W.double()).sum(dim=(-2, -1))
    assert dots.abs().max() < 1e-4 * (G.norm() * W.norm()).item()
    rho64 = (G.double() * W.double()).sum(dim=(-2, -1)) / (W.double() ** 2).sum(dim=(-2, -1))
    torch.testing.assert_close(rho.flatten().double(), rho64, rtol=1e-5, atol=1e-9)


def _rule(flags):
    cfg = load_config(flags, env={}, overrides={"ord": True})
    return cfg, MuonRule.from_config(cfg, torch.device("cpu"))


def _update(rule, grad, W, s, momentum=0.0, unit_scale=1.0):
    m, n = W.shape[-2:]
    sm = torch.zeros((1, m, 1) if m >= n else (1, 1, n))
    return muon_update(grad[None].clone(), W[None].clone(), torch.zeros(1, m, n), sm, momentum, rule, s, unit_scale)


def test_gradient_along_weight_is_only_radial():
    """G = c W: G_perp = 0, so with the projected form the whole update is s * G_par = s * G.
    W has entries of +-1 and c = 0.5 is a power of two, so every product is exact and G_perp is
    exactly zero (a G_perp of rounding noise would be blown up to unit singular values by the
    polar map's normalisation)."""
    torch.manual_seed(3)
    W = torch.randint(0, 2, (32, 16)).float() * 2 - 1
    for normuon in ("0", "1"):
        _, rule = _rule(["--spectral_lr_mul", "0.5", "--normuon", normuon, "--ord_form", "projected"])
        grad = 0.5 * W
        O = _update(rule, grad, W, 0.5).update
        torch.testing.assert_close(O[0], 0.5 * grad, rtol=1e-5, atol=1e-6)


def test_reprojection_removes_the_radial_part_of_polar():
    torch.manual_seed(4)
    W, grad = torch.randn(32, 16), torch.randn(32, 16)
    _, rule = _rule(["--spectral_lr_mul", "0", "--ord_form", "projected", "--normuon", "0"])
    O_plain = _update(rule, grad, W, 0.0).update
    _, rule = _rule(["--spectral_lr_mul", "0", "--ord_form", "projected", "--ord_reproject", "--normuon", "0"])
    O_re = _update(rule, grad, W, 0.0).update
    cos = lambda a, b: ((a * b).sum() / (a.norm() * b.norm())).item()  # noqa: E731
    assert abs(cos(O_plain[0], W)) > 1e-3  # the polar map does not keep G_perp orthogonal to W
    assert abs(cos(O_re[0], W)) < 1e-6


def test_ord_stats_are_reported():
    torch.manual_seed(5)
    W, grad = torch.randn(32, 16), torch.randn(32, 16)
    cfg, rule = _rule(["--spectral_lr_mul", "1.0"])
    parts = _update(rule, grad, W, 1.0)
    stats = parts.stats(W[None], cfg.spectral_proj_eps)
    O = parts.update
    rho = (grad * W).sum() / (W * W).sum()
    expected = [rho, (rho.abs() * W.norm()) / grad.norm(), O[0].norm(), (O[0] * W).sum() / (O[0].norm() * W.norm())]
    torch.testing.assert_close(stats[0], torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_spectral_muls_and_lr_factors_per_matrix():
    cfg = load_config(["--spectral_lr_mul", "0.1", "--spectral_lr_mul_attn", "0.7"], env={}, overrides={"ord": True})
    ps = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    refs = [MatrixRef("blocks.0.attn.proj.weight", ps[0], 0, "attn_o", (8, 8)),
            MatrixRef("blocks.0.mlp.proj.weight", ps[1], 0, "mlp_proj", (8, 8)),
            MatrixRef("blocks.1.attn.proj.weight", ps[2], 0, "attn_o", (8, 8))]
    muon = ShardedMuon(refs, cfg, WORLD1)
    assert muon.groups[0].spectral_mul.flatten().tolist() == pytest.approx([0.7, 0.1, 0.7])
    assert muon.groups[0].lr_factor.flatten().tolist() == pytest.approx([1.0, 2.0, 1.0])
    # the speedrun's MLP shapes: fc (3072, 768) gets sqrt(4) = 2, the projection (768, 3072) 2 x 2
    from harness.optim import matrix_lr_factor
    assert matrix_lr_factor("mlp_fc", (3072, 768), cfg) == 2.0 and matrix_lr_factor("mlp_proj", (768, 3072), cfg) == 4.0
    assert matrix_lr_factor("attn_q", (768, 768), cfg) == 1.0


@pytest.mark.parametrize("clip", [0.5, 1e3])
def test_clipping_uses_the_global_norm_of_every_gradient(clip):
    """opt.step(clip=c) = torch's clip_grad_norm_(all parameters, c) then an unclipped step, at
    world size 1 (the 2-rank twin is in test_train.py); it returns the norm before clipping."""
    cfg, model = small_model()
    ref, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    opt, ref_opt, plain_opt = (Optimizers(m, cfg, WORLD1) for m in (model, ref, unclipped))
    for step in range(3):
        for m in (model, ref, unclipped):
            random_grads(m, step)
        expected = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip))
        assert opt.step(step, 1.0, 0.9, clip=clip)[0] == pytest.approx(expected, rel=1e-6)
        ref_opt.step(step, 1.0, 0.9)
        plain_opt.step(step, 1.0, 0.9)
        for o in (opt, ref_opt, plain_opt):
            o.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert expected > 0.5  # so clip=0.5 did clip, and changed the run:
    moved = [not torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(model.parameters(), unclipped.parameters())]
    assert any(moved) == (clip < expected)


def test_tied_embedding_follows_the_head_until_the_split_step():
    """tied_embed: the embedding's gradient goes into the head's (stored transposed here, as the
    fork's), the embedding copies the head after each Adam step, and at the split step it takes
    the head's Adam state and goes on alone."""
    from harness.optim import LabelledAdam

    cfg = load_config(["--preset", "speedrun"], env={})
    torch.manual_seed(8)
    head = torch.nn.Parameter(torch.randn(4, 10))  # (dim, vocab)
    embed = torch.nn.Parameter(head.detach().T.clone())  # (vocab, dim)
    adam = LabelledAdam([("lm_head", "lm_head", head), ("embed", "embed", embed)], cfg, split_step=3)
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        head.grad, embed.grad = torch.randn(4, 10, generator=g), torch.randn(10, 4, generator=g)
        expected_head_grad = head.grad + embed.grad.T
        if not adam.due(step):
            continue
        adam.step(step, 1.0)
        if step <= 3:
            assert torch.equal(embed.detach(), head.detach().T)
            if step < 3:  # the head's update saw the sum of both gradients
                assert torch.equal(head.grad, expected_head_grad)
        adam.zero_grad()
        if step == 3:
            assert not adam.tied and adam.embed.t == adam.head.t == 2
            assert torch.equal(adam.embed.exp_avg, adam.head.exp_avg.T)
    assert not torch.allclose(embed.detach(), head.detach().T)  # untied: they moved apart
