"""The optimizers at world size 1 against independent references."""

import copy
import math

import pytest
import torch

from harness import dist as hdist
from harness.config import load_config
from harness.model import GPT, ModelShape
from harness.optim import MatrixRef, MuonRule, Optimizers, ShardedMuon, adam_settings, muon_update, ord_split
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
    """Accumulate a random gradient, as backward does (Adam's may be kept from the last step)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        new = torch.randn(p.shape, generator=g) * 0.1
        p.grad = new if p.grad is None else p.grad + new


def reference_muon_matrix(W, g, state, *, lr, momentum, cfg, role, ns_dtype=torch.float32):
    """A plain single-matrix implementation of the documented update (REFERENCE.md, the fork's rules)."""
    buf = state.setdefault("buf", torch.zeros_like(W))
    buf.mul_(momentum).add_(g, alpha=1 - momentum)
    G = g * (1 - momentum) + buf * momentum
    O = orthogonalize(G, method=cfg.ns_method, steps=cfg.ns_steps, dtype=ns_dtype).float()
    m, n = W.shape
    if cfg.normuon:
        v = (O**2).mean(dim=1, keepdim=True) if m >= n else (O**2).mean(dim=0, keepdim=True)
        sm = state.setdefault("sm", torch.zeros_like(v))
        sm.add_((v - sm) * (1 - cfg.normuon_beta2))
        O2 = O / sm.clamp_min(1e-10).sqrt()
        O = O2 * (O.norm() / O2.norm())
    # the fork's factor on its stored layout: MLP matrices tall, the output projection 2x more
    shape_factor = math.sqrt(max(m, n) / min(m, n)) if role.startswith("mlp") else 1.0
    lr_eff = lr * shape_factor * (cfg.muon_lr_mul_mlp_proj if role == "mlp_proj" else 1.0)
    ties = torch.zeros_like(W, dtype=torch.bool)
    if cfg.muon_wd:
        mask = (O * W >= 0).float() if cfg.cautious_wd else 1.0
        if cfg.cautious_wd:
            # where O*W is within rounding of 0 the cautious mask may flip between implementations
            ties = (O * W).abs() < 1e-5 * (O * W).abs().max()
        W -= lr_eff * (cfg.muon_wd * lr) * W * mask  # decay proportional to the LR squared
    W -= lr_eff * O
    return ties


def reference_adam(p, g, state, *, lr, beta1, beta2, eps, wd):
    """The fork's Adam, written out: eps on sqrt(v) before the bias correction, cautious lr^2 decay."""
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = state.get("m", torch.zeros_like(p)) * beta1 + (1 - beta1) * g
    v = state["v"] = state.get("v", torch.zeros_like(p)) * beta2 + (1 - beta2) * g * g
    u = m / (v.sqrt() + eps) * (lr * math.sqrt(1 - beta2**t) / (1 - beta1**t))
    u = u + p * ((u * p) > 0) * (lr * lr * wd)
    p -= u


def matrix_role(name: str, i: int | None) -> str:
    if ".mlp." in name:
        return "mlp_fc" if ".fc." in name else "mlp_proj"
    return "attn_o" if i is None else "attn_" + "qkv"[i]


@pytest.mark.parametrize("flags", [[], ["--muon_wd", "0.5", "--cautious_wd"], ["--normuon", "0", "--ns_method", "quintic"],
                                   ["--adam_every", "2", "--adam_wd", "0.3", "--adam_overrides", ""]])
def test_sharded_optimizer_matches_single_tensor_reference(flags):
    cfg, model = small_model(*flags)
    ref_model = copy.deepcopy(model)
    opt = Optimizers(model, cfg, WORLD1)
    labels = {s.name: s.label for s in ref_model.param_specs()}
    settings = adam_settings(cfg)
    states = {}
    pending = {}
    for step, (lr_mul, mu) in enumerate([(1.0, 0.85), (0.7, 0.9), (0.3, 0.95), (0.5, 0.95)]):
        ties = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in ref_model.named_parameters()}
        random_grads(model, step)
        random_grads(ref_model, step)
        opt.step(step, lr_mul, mu)
        opt.zero_grad()
        adam_due = cfg.adam_every == 1 or step % 2 == 1
        with torch.no_grad():
            for name, p in ref_model.named_parameters():
                if labels[name] not in ("attn", "mlp"):
                    # Adam: gradients of the steps since its last update, summed
                    pending[name] = p.grad.clone()  # the sum so far, as backward accumulated it
                    if adam_due:
                        p.grad = None
                        st = settings[labels[name]]
                        reference_adam(p, pending.pop(name), states.setdefault(name, {}), lr=cfg.adam_lr * lr_mul * st.lr_mul,
                                       beta1=st.beta1, beta2=st.beta2, eps=cfg.adam_eps, wd=cfg.adam_wd * st.wd_mul)
                    continue
                mats = [p] if p.ndim == 2 else list(p)
                gs = [p.grad] if p.ndim == 2 else list(p.grad)
                for i, (W, g) in enumerate(zip(mats, gs)):
                    tie = reference_muon_matrix(W, g, states.setdefault((name, i), {}), lr=cfg.muon_lr * lr_mul,
                                                momentum=mu, cfg=cfg, role=matrix_role(name, None if p.ndim == 2 else i))
                    if p.ndim == 2:
                        ties[name] |= tie
                    else:
                        ties[name][i] |= tie
                p.grad = None
        for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert ties[name].float().mean() < 0.002  # a handful of elements at most this step
            with torch.no_grad():
                q[ties[name]] = p[ties[name]]  # once flipped, an element's history differs: align it
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {name}: {m}")
        if cfg.adam_every == 2 and step == 0:
            # Adam waited: its parameters have not moved, and their gradients were kept
            assert torch.equal(model.embed.weight, ref_model.embed.weight) and model.embed.weight.grad is not None


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
