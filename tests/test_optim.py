"""The optimizers at world size 1 against independent references."""

import copy
import math

import pytest
import torch

from harness import dist as hdist
from harness.config import load_config
from harness.model import GPT, ModelShape
from harness.optim import MatrixRef, Optimizers, ShardedMuon, ord_decompose
from kernels import orthogonalize

WORLD1 = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)
SMALL = ["--num_layers", "2", "--model_dim", "32", "--num_heads", "2", "--seq_len", "32", "--vocab_size", "128",
         "--batch_sizes", "64,64,64,64", "--device_batch_tokens", "64"]


def small_model(*flags):
    cfg = load_config(SMALL + list(flags), env={})
    torch.manual_seed(0)
    model = GPT(ModelShape.from_config(cfg))
    # zero-initialised projections would make the first Muon steps trivial: start from noise
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, model


def random_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 0.1


def reference_muon_matrix(W, g, state, *, lr, momentum, cfg, ns_dtype=torch.float32):
    """A plain single-matrix implementation of the documented update (REFERENCE.md)."""
    buf = state.setdefault("buf", torch.zeros_like(W))
    buf.mul_(momentum).add_(g, alpha=1 - momentum)
    G = g * (1 - momentum) + buf * momentum
    O = orthogonalize(G, method=cfg.ns_method, steps=cfg.ns_steps, dtype=ns_dtype).float()
    m, n = W.shape
    if cfg.normuon:
        v = (O**2).mean(dim=1, keepdim=True) if m >= n else (O**2).mean(dim=0, keepdim=True)
        sm = state.setdefault("sm", torch.zeros_like(v))
        sm.add_((v - sm) * (1 - cfg.normuon_beta2))
        O2 = O / (sm.sqrt() + 1e-10)
        O = O2 * (O.norm() / O2.norm())
    lr_eff = lr * math.sqrt(max(1.0, m / n))
    ties = torch.zeros_like(W, dtype=torch.bool)
    if cfg.muon_wd:
        mask = (O * W >= 0).float() if cfg.cautious_wd else 1.0
        if cfg.cautious_wd:
            # where O*W is within rounding of 0 the cautious mask may flip between implementations
            ties = (O * W).abs() < 1e-5 * (O * W).abs().max()
        W -= lr_eff * cfg.muon_wd * W * mask
    W -= lr_eff * O
    return ties


@pytest.mark.parametrize("flags", [[], ["--muon_wd", "0.5", "--cautious_wd"], ["--normuon", "0", "--ns_method", "quintic"]])
def test_sharded_optimizer_matches_single_tensor_reference(flags):
    cfg, model = small_model(*flags)
    ref_model = copy.deepcopy(model)
    opt = Optimizers(model, cfg, WORLD1)
    roles = ref_model.param_roles()
    groups = {"embed": [], "head": [], "scalar": []}
    for name, p in ref_model.named_parameters():
        if roles[name] != "muon":
            groups[roles[name]].append(p)
    lrs = {"embed": cfg.adam_lr_embed, "head": cfg.adam_lr_head, "scalar": cfg.adam_lr_scalar}
    ref_adam = torch.optim.AdamW([{"params": ps, "lr": lrs[k]} for k, ps in groups.items() if ps],
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.adam_wd)
    states = {}
    ties = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in ref_model.named_parameters()}
    for step, (lr_mul, mu) in enumerate([(1.0, 0.85), (0.7, 0.9), (0.3, 0.95)]):
        random_grads(model, step)
        random_grads(ref_model, step)
        opt.step(lr_mul, mu)
        with torch.no_grad():
            for name, p in ref_model.named_parameters():
                if roles[name] != "muon":
                    continue
                mats = [p] if p.ndim == 2 else list(p)
                gs = [p.grad] if p.ndim == 2 else list(p.grad)
                for i, (W, g) in enumerate(zip(mats, gs)):
                    tie = reference_muon_matrix(W, g, states.setdefault((name, i), {}), lr=cfg.muon_lr * lr_mul,
                                                momentum=mu, cfg=cfg)
                    if p.ndim == 2:
                        ties[name] |= tie
                    else:
                        ties[name][i] |= tie
            for grp, k in zip(ref_adam.param_groups, [k for k, ps in groups.items() if ps]):
                grp["lr"] = lrs[k] * lr_mul
            ref_adam.step()
        for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert ties[name].float().mean() < 0.002  # a handful of elements at most
            with torch.no_grad():
                q[ties[name]] = p[ties[name]]  # once flipped, an element's history differs: align it
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {name}: {m}")


def test_stacks_are_orthogonalized_per_matrix():
    cfg, model = small_model()
    opt = Optimizers(model, cfg, WORLD1)
    names = [r.name for g in opt.muon.groups for r in g.refs]
    assert "blocks.0.attn.qkv.q" in names and "blocks.0.attn.qkv.v" in names
    assert opt.assignment["blocks.0.attn.qkv"] == "muon"
    assert opt.assignment["embed.weight"] == "adam_embed" and opt.assignment["lm_head.weight"] == "adam_head"
    assert opt.assignment["blocks.0.lambdas"] == "adam_scalar"
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
    muon = ShardedMuon([MatrixRef(f"m{i}", p, None) for i, p in enumerate(ours)], cfg, WORLD1)
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


def test_ord_decomposition_matches_float64():
    torch.manual_seed(2)
    G, W = torch.randn(5, 48, 32), torch.randn(5, 48, 32)
    rho, G_par, G_perp = ord_decompose(G, W, 1e-12)
    torch.testing.assert_close(G_par + G_perp, G)
    dots = (G_perp.double() * W.double()).sum(dim=(-2, -1))
    assert dots.abs().max() < 1e-4 * (G.norm() * W.norm()).item()
    rho64 = (G.double() * W.double()).sum(dim=(-2, -1)) / (W.double() ** 2).sum(dim=(-2, -1))
    torch.testing.assert_close(rho.flatten().double(), rho64, rtol=1e-5, atol=1e-9)


def _one_matrix_muon(W, flags):
    cfg = load_config(["--muon_lr", "1.0", "--muon_wd", "0"] + flags, env={}, overrides={"ord": True})
    p = torch.nn.Parameter(W.clone())
    return ShardedMuon([MatrixRef("blocks.0.mlp.fc.weight", p, None)], cfg, WORLD1), p


def test_gradient_along_weight_is_only_radial():
    """G = c W: G_perp = 0, so the whole update is spectral_lr_mul * G. W has entries of +-1 and
    c = 0.5 is a power of two, so every product is exact and G_perp is exactly zero (a G_perp of rounding
    noise would be blown up to unit singular values by the polar map's normalisation)."""
    torch.manual_seed(3)
    W = torch.randint(0, 2, (32, 16)).float() * 2 - 1
    for normuon in ("0", "1"):
        muon, p = _one_matrix_muon(W, ["--spectral_lr_mul", "0.5", "--normuon", normuon])
        grad = 0.5 * W
        O, _ = muon._update(muon.groups[0], grad[None].clone(), W[None].clone(), momentum=0.0, collect=False)
        torch.testing.assert_close(O[0], 0.5 * grad, rtol=1e-5, atol=1e-6)


def test_reprojection_removes_the_radial_part_of_polar():
    torch.manual_seed(4)
    W, grad = torch.randn(32, 16), torch.randn(32, 16)
    muon, _ = _one_matrix_muon(W, ["--spectral_lr_mul", "0", "--ord_project", "--normuon", "0"])
    O_plain, _ = muon._update(muon.groups[0], grad[None].clone(), W[None].clone(), momentum=0.0, collect=False)
    muon, _ = _one_matrix_muon(W, ["--spectral_lr_mul", "0", "--ord_project", "--ord_reproject", "--normuon", "0"])
    O_re, _ = muon._update(muon.groups[0], grad[None].clone(), W[None].clone(), momentum=0.0, collect=False)
    cos = lambda a, b: ((a * b).sum() / (a.norm() * b.norm())).item()  # noqa: E731
    assert abs(cos(O_plain[0], W)) > 1e-3  # the polar map does not keep G_perp orthogonal to W
    assert abs(cos(O_re[0], W)) < 1e-6


def test_ord_stats_are_reported():
    torch.manual_seed(5)
    W, grad = torch.randn(32, 16), torch.randn(32, 16)
    muon, _ = _one_matrix_muon(W, ["--spectral_lr_mul", "1.0"])
    O, stats = muon._update(muon.groups[0], grad[None].clone(), W[None].clone(), momentum=0.0, collect=True)
    rho = (grad * W).sum() / (W * W).sum()
    expected = [rho, (rho.abs() * W.norm()) / grad.norm(), O[0].norm(), (O[0] * W).sum() / (O[0].norm() * W.norm())]
    torch.testing.assert_close(stats[0], torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_spectral_muls_per_group():
    cfg = load_config(["--spectral_lr_mul", "0.1", "--spectral_lr_mul_attn", "0.7"], env={}, overrides={"ord": True})
    ps = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)]
    refs = [MatrixRef("blocks.0.attn.proj.weight", ps[0], None), MatrixRef("blocks.0.mlp.proj.weight", ps[1], None),
            MatrixRef("blocks.1.attn.proj.weight", ps[2], None)]
    muon = ShardedMuon(refs, cfg, WORLD1)
    assert muon.spectral_muls(muon.groups[0]).flatten().tolist() == pytest.approx([0.7, 0.1, 0.7])


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
        assert opt.step(1.0, 0.9, clip=clip) == pytest.approx(expected, rel=1e-6)
        ref_opt.step(1.0, 0.9)
        plain_opt.step(1.0, 0.9)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert expected > 0.5  # so clip=0.5 did clip, and changed the run:
    moved = [not torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(model.parameters(), unclipped.parameters())]
    assert any(moved) == (clip < expected)
