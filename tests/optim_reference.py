"""A plain, single-tensor reference of the optimizers (the fork's rules written out matrix by
matrix) and the loop that steps the sharded Optimizers beside it: used in-process at world size
1 (tests/test_optim.py) and under torchrun at 2 and 3 gloo ranks (tests/optim_world_worker.py).

Every rank holds a different gradient (the mean of its slice of MICRO fixed random gradients),
so the loop checks the averaging too: the reference steps on the mean over all MICRO, which is
the same at every world size that divides MICRO."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from harness import dist as hdist
from harness.config import load_config
from harness.model import GPT, ModelShape
from harness.optim import Optimizers, adam_settings
from kernels import orthogonalize

SMALL = ["--num_layers", "2", "--model_dim", "32", "--num_heads", "2", "--seq_len", "32", "--vocab_size", "128",
         "--batch_sizes", "64,64,64,64", "--device_batch_tokens", "64"]
MICRO = 6  # gradients per step, split over the ranks (world sizes 1, 2, 3 and 6)
SCHEDULE = [(1.0, 0.85), (0.7, 0.9), (0.3, 0.95), (0.5, 0.95)]  # (lr_mul, momentum) per step
UNIT_SCALE = 3.0  # the mean-loss -> fork-units factor the trainer passes (matters for ord_units mean)
ORD = "ORD"  # first item of a flag set: the run is train_gpt_muon_new.py's (ORD on)
FLAG_SETS = {
    "default": [],
    "cautious_wd": ["--muon_wd", "0.5", "--cautious_wd"],
    "quintic": ["--normuon", "0", "--ns_method", "quintic"],
    "adam_every_2": ["--adam_every", "2", "--adam_wd", "0.3", "--adam_overrides", ""],
    # ORD, every variant, with momentum over the whole schedule
    "ord_fork": [ORD, "--spectral_lr_mul", "0.5", "--spectral_lr_mul_attn", "0.1", "--muon_wd", "0.5", "--cautious_wd"],
    "ord_projected_mean_before_norm": [ORD, "--spectral_lr_mul", "1.0", "--ord_form", "projected", "--ord_units",
                                       "mean", "--ord_placement", "before_norm"],
    "ord_reproject_no_normuon": [ORD, "--spectral_lr_mul", "0.3", "--spectral_lr_mul_mlp", "0.8", "--ord_reproject",
                                 "--normuon", "0"],
}


def small_model(*flags):
    ord_on = bool(flags) and flags[0] == ORD
    flags = flags[1:] if ord_on else flags
    cfg = load_config(SMALL + list(flags), env={}, overrides={"ord": True} if ord_on else None)
    torch.manual_seed(0)
    model = GPT(ModelShape.from_config(cfg))
    # zero-initialised projections would make the first Muon steps trivial: start from noise
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, model


def micro_grads(model, step: int, ks) -> dict[str, torch.Tensor]:
    """The mean of micro-gradients ks of this step (each a fixed random draw per parameter)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = torch.zeros_like(p)
    for k in ks:
        g = torch.Generator().manual_seed(1000 * step + k)
        for name, p in model.named_parameters():
            out[name] += torch.randn(p.shape, generator=g) * 0.1
    return {name: t / len(ks) for name, t in out.items()}


def accumulate(model, grads: dict[str, torch.Tensor]) -> None:
    """Add to p.grad as backward does (Adam's may be kept from the last step)."""
    for name, p in model.named_parameters():
        p.grad = grads[name].clone() if p.grad is None else p.grad + grads[name]


def reference_spectral_mul(cfg, role: str) -> float:
    kind = role.split("_")[0]
    per_kind = {"attn": cfg.spectral_lr_mul_attn, "mlp": cfg.spectral_lr_mul_mlp}[kind]
    return per_kind if per_kind is not None else cfg.spectral_lr_mul


def reference_muon_matrix(W, g, state, *, lr, momentum, cfg, role, ns_dtype=torch.float32, unit_scale=1.0):
    """A plain single-matrix implementation of the documented update (docs/REFERENCE.md, the fork's
    rules), with ORD when cfg.ord: rho = <G,W>/||W||^2 on the momentum gradient G, Polar of
    G - s G_par (interpolated) or G - G_par (projected), optionally re-projected, s G_par added
    back before or after NorMuon (divided by unit_scale in mean units)."""
    buf = state.setdefault("buf", torch.zeros_like(W))
    buf.mul_(momentum).add_(g, alpha=1 - momentum)
    G = g * (1 - momentum) + buf * momentum
    ns_in = G
    if cfg.ord:
        s = reference_spectral_mul(cfg, role)
        G_par = (G * W).sum() / ((W * W).sum() + cfg.spectral_proj_eps) * W
        ns_in = G - G_par if cfg.ord_form == "projected" else G - s * G_par
        add_back = s * G_par / (unit_scale if cfg.ord_units == "mean" else 1.0)
    O = orthogonalize(ns_in, method=cfg.ns_method, steps=cfg.ns_steps, dtype=ns_dtype).float()
    if cfg.ord and cfg.ord_reproject:
        O = O - (O * W).sum() / ((W * W).sum() + cfg.spectral_proj_eps) * W
    if cfg.ord and cfg.ord_placement == "before_norm":
        O = O + add_back
    m, n = W.shape
    if cfg.normuon:
        v = (O**2).mean(dim=1, keepdim=True) if m >= n else (O**2).mean(dim=0, keepdim=True)
        sm = state.setdefault("sm", torch.zeros_like(v))
        sm.add_((v - sm) * (1 - cfg.normuon_beta2))
        O2 = O / sm.clamp_min(1e-10).sqrt()
        O = O2 * (O.norm() / O2.norm())
    if cfg.ord and cfg.ord_placement == "after_norm":
        O = O + add_back
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


def run_against_reference(flags, info: hdist.DistInfo) -> GPT:
    """Step Optimizers (sharded over info's ranks, this rank holding its slice of the MICRO
    gradients) and the single-tensor reference (on the mean of all MICRO) side by side for the
    SCHEDULE; after each step assert that the weights, the gradient norm step() returns (clip
    set high enough never to clip) and the whole optimizer state (gathered) agree. Returns the
    stepped model (the same on every rank)."""
    assert MICRO % info.world_size == 0
    per = MICRO // info.world_size
    mine = range(info.rank * per, (info.rank + 1) * per)
    cfg, model = small_model(*flags)
    ref_model = copy.deepcopy(model)
    opt = Optimizers(model, cfg, info)
    labels = {s.name: s.label for s in ref_model.param_specs()}
    settings = adam_settings(cfg)
    states: dict = {}
    pending: dict[str, torch.Tensor] = {}
    for step, (lr_mul, mu) in enumerate(SCHEDULE):
        ties = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in ref_model.named_parameters()}
        accumulate(model, micro_grads(model, step, mine))
        mean = micro_grads(ref_model, step, range(MICRO))
        norm, _ = opt.step(step, lr_mul, mu, unit_scale=UNIT_SCALE, clip=1e30)
        opt.zero_grad()
        adam_due = cfg.adam_every == 1 or step % 2 == 1
        sq = 0.0
        with torch.no_grad():
            for name, p in ref_model.named_parameters():
                g = mean[name]
                if labels[name] not in ("attn", "mlp"):
                    # Adam: gradients of the steps since its last update, summed
                    pending[name] = pending[name] + g if name in pending else g.clone()
                    if adam_due:
                        st = settings[labels[name]]
                        total = pending.pop(name)
                        sq += total.double().square().sum().item()
                        reference_adam(p, total, states.setdefault(name, {}), lr=cfg.adam_lr * lr_mul * st.lr_mul,
                                       beta1=st.beta1, beta2=st.beta2, eps=cfg.adam_eps, wd=cfg.adam_wd * st.wd_mul)
                    continue
                sq += g.double().square().sum().item()
                mats = [p] if p.ndim == 2 else list(p)
                gs = [g] if p.ndim == 2 else list(g)
                for i, (W, gi) in enumerate(zip(mats, gs)):
                    tie = reference_muon_matrix(W, gi, states.setdefault((name, i), {}), lr=cfg.muon_lr * lr_mul,
                                                momentum=mu, cfg=cfg, role=matrix_role(name, None if p.ndim == 2 else i),
                                                unit_scale=UNIT_SCALE)
                    if p.ndim == 2:
                        ties[name] |= tie
                    else:
                        ties[name][i] |= tie
        # the norm of the averaged gradient (Adam's part only on steps it updates)
        assert norm == pytest.approx(math.sqrt(sq), rel=1e-6), (step, norm, math.sqrt(sq))
        for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert ties[name].float().mean() < 0.002  # a handful of elements at most this step
            with torch.no_grad():
                q[ties[name]] = p[ties[name]]  # once flipped, an element's history differs: align it
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {name}: {m}")
        check_state(opt, model, states, step)
        if cfg.adam_every == 2 and step == 0:
            # Adam waited: its parameters have not moved, and their gradients were kept
            assert torch.equal(model.embed.weight, ref_model.embed.weight) and model.embed.weight.grad is not None
    return model


def check_state(opt: Optimizers, model, states: dict, step: int) -> None:
    """The gathered optimizer state against the reference's: Muon momentum and NorMuon second
    moment per matrix, Adam moments and step count per parameter."""
    state = opt.state_dict()  # a collective: every rank gathers the whole state
    names = {id(p): n for n, p in model.named_parameters()}
    close = dict(rtol=1e-5, atol=1e-7)
    for g, saved in zip(opt.muon.groups, state["muon"]["groups"]):
        for j, r in enumerate(g.refs):
            pname = names[id(r.param)]
            ref = states[(pname, r.index)]
            torch.testing.assert_close(saved["momentum"][j], ref["buf"], **close,
                                       msg=lambda m: f"step {step}: momentum of {r.name}: {m}")
            if "sm" in ref:
                torch.testing.assert_close(saved["second_moment"][j], ref["sm"], **close,
                                           msg=lambda m: f"step {step}: second moment of {r.name}: {m}")
    for name, s in state["adam"]["params"].items():
        ref = states.get(name, {})
        assert s["t"] == ref.get("t", 0), (step, name)
        if s["t"]:
            torch.testing.assert_close(s["exp_avg"], ref["m"], **close, msg=lambda m: f"step {step}: {name} m: {m}")
            torch.testing.assert_close(s["exp_avg_sq"], ref["v"], **close, msg=lambda m: f"step {step}: {name} v: {m}")
