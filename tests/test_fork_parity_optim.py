"""Our optimizer and schedules against the fork's own functions (reference/fork/*.py), on CPU.

Each test takes the fork's function from its file (tests/fork_reference.py), gives both the same
inputs and compares the outputs to float tolerance: polar express, NorMuon's variance reduction,
the Adam rule, the whole Muon update with ORD, weight decay and per-matrix LR factors, the LR and
momentum schedules, the gradient units and the speedrun preset's constants. Skipped where the
fork's code is absent (a user's clone).
"""

from __future__ import annotations

import ast
import types

import pytest
import torch

from fork_reference import FORK_MISSING, fake_dist, fork_defs, fork_literal
from harness import dist as hdist
from harness.config import load_config
from harness.optim import (ADAM_TABLE, MatrixRef, MuonRule, ShardedMuon, adam_settings, adam_update_, muon_update,
                           normuon)
from harness.schedule import Schedule
from kernels import orthogonalize

pytestmark = pytest.mark.skipif(FORK_MISSING is not None, reason=FORK_MISSING or "")

WORLD1 = hdist.DistInfo(0, 1, 0, torch.device("cpu"), None)


def _xxt(A, out):  # the fork's Triton X X^T, in torch
    return torch.matmul(A, A.mT, out=out)


def _ba_plus_caa(A, alpha, beta, out):  # the fork's Triton b*A + c*A A^T (A symmetric), in torch
    return out.copy_(beta * A + alpha * (A @ A.mT))


class _Fp32Polar(ast.NodeTransformer):
    """The fork's polar_express casts to bfloat16 first; this variant works in float32, so that
    the arithmetic of the two implementations can be compared tightly."""

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if node.attr == "bfloat16":
            node.attr = "float"
        return node


def fork_polar(fp32: bool = False):
    ns = fork_defs("train_gpt.py", ["polar_express_coeffs", "polar_express"],
                   {"XXT": _xxt, "ba_plus_cAA": _ba_plus_caa}, transform=_Fp32Polar() if fp32 else None)
    return ns["polar_express"]


class _Int32Bits(ast.NodeTransformer):
    """The fork rebuilds float32 weights from bf16 bits + mantissa in uint32, whose shifts CPU torch
    lacks; int32 holds the same bit patterns (the float32 view and the low/high halves agree)."""

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if node.attr == "uint32":
            node.attr = "int32"
        return node


def fork_optimizer(file: str = "train_gpt.py"):
    ns = fork_defs(file, ["ParamConfig", "NorMuonAndAdam", "polar_express_coeffs", "polar_express"],
                   {"dataclass": __import__("dataclasses").dataclass, "dist": fake_dist(), "XXT": _xxt,
                    "ba_plus_cAA": _ba_plus_caa}, transform=_Int32Bits())
    return ns


# --- polar express and NorMuon --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 96, 32), (2, 32, 80)])
def test_polar_express_matches_the_forks(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    ours32 = orthogonalize(G, method="polar_express", steps=5, dtype=torch.float32)
    torch.testing.assert_close(ours32, fork_polar(fp32=True)(G).float(), rtol=2e-4, atol=2e-5)
    # as run on a GPU, in bfloat16 (the fork normalises in bf16, we in fp32 then cast): rounding
    # makes the two differ by a few percent, so each is held to its distance from the fp32 result
    ours16 = orthogonalize(G, method="polar_express", steps=5, dtype=torch.bfloat16).float()
    theirs16 = fork_polar()(G).float()
    err = lambda X: ((X - ours32).norm() / ours32.norm()).item()  # noqa: E731
    assert err(theirs16) < 0.05 and err(ours16) < 1.2 * err(theirs16)


@pytest.mark.parametrize("shape", [(4, 48, 16), (4, 16, 48), (2, 32, 32)])
def test_normuon_variance_reduction_matches_the_forks(shape):
    fork = fork_optimizer()["NorMuonAndAdam"]._apply_normuon_variance_reduction
    m, n = shape[-2:]
    red_dim = -1 if m >= n else -2
    buf_ours = torch.zeros((shape[0], m, 1) if m >= n else (shape[0], 1, n))
    buf_fork = buf_ours.clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        v = orthogonalize(torch.randn(*shape, generator=g), dtype=torch.float32)
        # a few near-dead neurons, whose second moment falls under the 1e-10 floor
        if m >= n:
            v[:, :3] *= 1e-7
        else:
            v[:, :, :3] *= 1e-7
        theirs = fork(v.clone(), buf_fork, 0.95, red_dim)
        ours = normuon(v.clone(), buf_ours, 0.95)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(buf_ours, buf_fork, rtol=1e-6, atol=0)


# --- Adam ------------------------------------------------------------------------------------


def test_adam_table_and_constants_are_the_forks():
    table = fork_literal("train_gpt.py", "TrainingManager", "__init__", "param_table")
    adam_defaults = fork_literal("train_gpt.py", "TrainingManager", "__init__", "adam_defaults")
    muon_defaults = fork_literal("train_gpt.py", "TrainingManager", "__init__", "normuon_defaults")
    cfg = load_config(["--preset", "speedrun"], env={})
    ours = adam_settings(cfg)
    for label, entry in table.items():
        if entry["optim"] != "adam":
            continue
        s = ours[label]
        assert (s.beta1, s.beta2) == tuple(entry["adam_betas"]), label
        assert (s.lr_mul, s.wd_mul) == (entry.get("lr_mul", 1.0), entry.get("wd_mul", 1.0)), label
    assert set(ADAM_TABLE) == {k for k, v in table.items() if v["optim"] == "adam"}
    assert (cfg.adam_lr, cfg.adam_eps, cfg.adam_wd) == (adam_defaults["lr"], adam_defaults["eps"],
                                                         adam_defaults["weight_decay"])
    assert (cfg.muon_lr, cfg.muon_momentum, cfg.normuon_beta2, cfg.muon_wd) == (
        muon_defaults["lr"], muon_defaults["momentum"], muon_defaults["beta2"], muon_defaults["weight_decay"])
    assert cfg.adam_every == 2 and cfg.tied_embed and cfg.cautious_wd


@pytest.mark.parametrize("label", ["lm_head", "value_embed", "scalars", "smear_gate"])
def test_adam_rule_matches_the_forks(label):
    ns = fork_optimizer()
    fork_cls, ParamConfig = ns["NorMuonAndAdam"], ns["ParamConfig"]
    cfg = load_config(["--preset", "speedrun"], env={})
    s = adam_settings(cfg)[label]
    opt = fork_cls.__new__(fork_cls)  # the fork's Adam step without its process-group set-up
    for name in ("_step_size_t", "_eff_wd_t", "_beta1_t", "_beta2_t"):
        setattr(opt, name, torch.tensor(0.0))
    torch.manual_seed(2)
    p_fork = torch.randn(24, 16)
    p_ours = p_fork.clone()
    m, v = torch.zeros_like(p_ours), torch.zeros_like(p_ours)
    opt.param_states = {"p": dict(step=0, exp_avg=torch.zeros_like(p_fork), exp_avg_sq=torch.zeros_like(p_fork))}
    p_cfg = ParamConfig(label=label, optim="adam", comms="none", adam_betas=(s.beta1, s.beta2), lr_mul=s.lr_mul,
                        wd_mul=s.wd_mul, lr=0.0, initial_lr=cfg.adam_lr, weight_decay=cfg.adam_wd, eps=cfg.adam_eps)
    opt.param_states[p_fork] = opt.param_states.pop("p")
    for t, lr_mul in enumerate([1.0, 1.52, 0.7, 0.1], start=1):
        g = torch.randn(24, 16) * 10 ** (-t)
        p_cfg.lr = cfg.adam_lr * lr_mul
        opt._adam_update(p_fork, g.clone(), p_cfg, 0)
        adam_update_(p_ours, g.clone(), m, v, t, cfg.adam_lr * lr_mul * s.lr_mul, s.beta1, s.beta2, cfg.adam_eps,
                     cfg.adam_wd * s.wd_mul)
        # the fork rounds step size and decay to float32 0-D tensors: a last-bit difference at most
        torch.testing.assert_close(p_ours, p_fork, rtol=1e-5, atol=1e-6)


# --- the Muon update with ORD, weight decay and LR factors -----------------------------------


def _bf16_parts(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 tensor as the fork stores it: bfloat16 high bits (the parameter) + a uint16 mantissa."""
    bits = W.contiguous().view(torch.int32)
    hi = (bits >> 16).to(torch.int16).view(torch.bfloat16)
    lo = (bits & 0xFFFF).to(torch.int32).to(torch.uint16)
    return hi, lo


def _from_bf16_parts(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    bits = (hi.view(torch.int16).to(torch.int32) << 16) | lo.to(torch.int32)
    return bits.view(torch.float32)


@pytest.mark.parametrize("script, s", [("train_gpt.py", None), ("train_gpt_muon_new.py", 0.0),
                                       ("train_gpt_muon_new.py", 0.1), ("train_gpt_muon_new.py", 1.0)])
@pytest.mark.parametrize("label", ["attn", "mlp"])
def test_muon_update_matches_the_forks(script, s, label):
    """Several steps with momentum, the fork's weight decay and LR factors, and ORD at s: the fork's
    _normuon_update (its polar_express stood in by ours in float32, tested above) against ours.
    Each step starts both from the same weights of +-1/8 entries: the fork keeps bf16 parameters
    (plus a mantissa) and computes rho's ||W||^2 in bf16, which is exact for these (a power of two)
    and carries ~0.4% rounding for general weights - a precision artefact, not a rule."""
    ns = fork_optimizer(script)
    ns["polar_express"] = lambda G, split_baddbmm=False: orthogonalize(G, dtype=torch.float32)
    fork_cls = ns["NorMuonAndAdam"]
    d, h = 16, 64
    n_layers = 2
    flags = ["--preset", "speedrun"] + ([] if s is None else ["--spectral_lr_mul", str(s)])
    cfg = load_config(flags, env={}, overrides={"ord": s is not None})
    fork_defaults = dict(lr=cfg.muon_lr, momentum=0.95, beta2=cfg.normuon_beta2, weight_decay=cfg.muon_wd)
    if s is not None:
        fork_defaults.update(spectral_lr_mul=s, spectral_proj_eps=cfg.spectral_proj_eps)
    g = torch.Generator().manual_seed(3)

    def signs(shape):
        return (torch.randint(0, 2, shape, generator=g) * 2 - 1).float() / 8

    if label == "attn":  # the fork's bank: (layers, 4 d, d) viewed as (4 layers, d, d): q, k, v, o
        bank = signs((n_layers, 4 * d, d))
        reshape = (4 * n_layers, d, d)
        roles = ["attn_q", "attn_k", "attn_v", "attn_o"] * n_layers
    else:  # (layers, 2, h, d): c_fc (h, d) and c_proj stored (h, d) = our (d, h) transposed
        bank = signs((n_layers, 2, h, d))
        reshape = (2 * n_layers, h, d)
        roles = ["mlp_fc", "mlp_proj"] * n_layers
    param = torch.nn.Parameter(bank.bfloat16())
    param.reshape = reshape
    opt = fork_cls.__new__(fork_cls)
    opt.world_size, opt.normuon_defaults, opt.param_cfgs, opt.param_states = 1, fork_defaults, {}, {}
    opt.param_table = fork_literal(script, "TrainingManager", "__init__", "param_table")
    opt._eff_lr_t, opt._eff_wd_t = torch.tensor(0.0), torch.tensor(0.0)
    opt._build_param_cfg(param, label)
    opt._init_state()
    p_cfg = opt.param_cfgs[param]

    # ours: one Muon parameter per matrix, in our layout (the projection transposed)
    stack = bank.view(reshape)
    ours = [torch.nn.Parameter(stack[i].T.clone() if r == "mlp_proj" else stack[i].clone()) for i, r in enumerate(roles)]
    refs = [MatrixRef(f"m{i}.{r}", p, 0, r, tuple(p.shape)) for i, (p, r) in enumerate(zip(ours, roles))]
    muon = ShardedMuon(refs, cfg, WORLD1)
    for step, (lr_mul, mu) in enumerate([(1.0, 0.85), (1.52, 0.9), (0.5, 0.95)]):
        grads = torch.randn(reshape, generator=g) + 0.5 * stack.view(reshape)  # with a radial part
        p_cfg.lr, p_cfg.momentum = cfg.muon_lr * lr_mul, mu
        opt._normuon_update(param, grads.clone(), p_cfg, 0)
        theirs = _from_bf16_parts(param.data.view(reshape), opt.param_states[param]["mantissa"])
        for i, (p, r) in enumerate(zip(ours, roles)):
            p.grad = grads[i].T.clone() if r == "mlp_proj" else grads[i].clone()
        muon.step(lr_mul, mu)
        mine = torch.stack([p.detach().T if r == "mlp_proj" else p.detach() for p, r in zip(ours, roles)])
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
        # both go on from the same new weights (the momentum and NorMuon states carry on)
        stack = signs(reshape)
        param.data.copy_(stack.view_as(param).bfloat16())
        opt.param_states[param]["mantissa"].zero_()
        for i, (p, r) in enumerate(zip(ours, roles)):
            p.data.copy_(stack[i].T if r == "mlp_proj" else stack[i])
    if label == "mlp":  # the factors the fork's config gave: shape sqrt(4) = 2, c_proj 2x on top
        assert p_cfg.lr_mul == 2.0 and p_cfg.per_matrix_lr_mul == [1.0, 2.0] * n_layers
        assert muon.groups[0].lr_factor.flatten().tolist() + muon.groups[1].lr_factor.flatten().tolist() == [2.0] * 2 + [4.0] * 2


def test_ord_off_is_the_standard_update_bit_for_bit():
    """spectral_lr 0 through the ORD path = the standard path, exactly (the fork's unified path)."""
    torch.manual_seed(5)
    W, grad = torch.randn(4, 32, 16), torch.randn(4, 32, 16)
    std = MuonRule.from_config(load_config([], env={}), torch.device("cpu"))
    ord0 = MuonRule.from_config(load_config(["--spectral_lr_mul", "0"], env={}, overrides={"ord": True}),
                                torch.device("cpu"))
    outs = []
    for rule in (std, ord0):
        buf, sm = torch.zeros_like(W), torch.zeros(4, 32, 1)
        for step in range(3):
            u = muon_update(grad + step, W, buf, sm, 0.9, rule, 0.0, 1000.0).update
        outs.append(u)
    assert torch.equal(outs[0], outs[1])


# --- schedules and gradient units ------------------------------------------------------------


def fork_schedule(S: int, E: int, cooldown: float, batch_sizes, lr_muls):
    ns = fork_defs("train_gpt.py", ["TrainingStage", "TrainingSchedule", "TRAINING_STAGES", "get_muon_momentum"],
                   {"dataclass": __import__("dataclasses").dataclass, "accumulate": __import__("itertools").accumulate,
                    "pairwise": __import__("itertools").pairwise, "device": "cpu"})
    stages = ns["TRAINING_STAGES"]
    for stage, b, m in zip(stages, batch_sizes, lr_muls):
        stage.batch_size, stage.lr_mul = b, m
    sched = ns["TrainingSchedule"](stages, S, E, cooldown_frac=cooldown)
    ns["training_schedule"] = sched
    return sched, ns["get_muon_momentum"]


@pytest.mark.parametrize("flags", [["--preset", "speedrun"],
                                   ["--num_scheduled_iterations", "60", "--num_extension_iterations", "6"],
                                   ["--num_scheduled_iterations", "61", "--cooldown_frac", "0", "--lr_muls", "1,2,3,4"],
                                   ["--num_scheduled_iterations", "400", "--cooldown_frac", "1.0"]])
def test_lr_batch_and_momentum_schedules_match_the_forks(flags):
    cfg = load_config(flags, env={})
    ours = Schedule.from_config(cfg)
    sched, momentum = fork_schedule(cfg.num_scheduled_iterations, cfg.num_extension_iterations, cfg.cooldown_frac,
                                    cfg.batch_sizes, cfg.lr_muls)
    assert sched.total_steps == ours.total
    for step in range(ours.total + 1):
        assert ours.lr_mul(step) == pytest.approx(sched.get_lr(step), abs=1e-12), step
        assert ours.batch_size(step) == sched.lookup(step)[0].batch_size, step
        assert ours.muon_momentum(step) == pytest.approx(momentum(step), abs=1e-12), step
    assert ours.split_step(2) == sched.split_step


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_gradient_units_are_the_forks(world_size):
    """The fork's gradient of one step (its grad_accum_steps / grad_scale lines, executed here):
    per rank, micro-batches of B/8 tokens, loss summed over tokens x grad_scale, then averaged
    over ranks; against our mean-loss gradient x grad_unit(B) = B/4."""
    from harness.trainer import grad_unit

    ns = {"world_size": world_size}
    tree = ast.parse((__import__("fork_reference").FORK / "train_gpt.py").read_text())
    lines = [n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") in
             ("grad_accum_steps", "grad_scale")]
    exec(compile(ast.Module(body=lines, type_ignores=[]), "train_gpt.py", "exec"), ns)
    torch.manual_seed(6)
    B, vocab, dim = 64, 11, 5
    w = torch.randn(vocab, dim, requires_grad=True)
    x, y = torch.randint(0, vocab, (B,)), torch.randint(0, vocab, (B,))

    def loss_of(idx, reduction):
        return torch.nn.functional.cross_entropy(w[x[idx]] @ w.T, y[idx], reduction=reduction)

    per_rank = B // world_size
    fork_grad = torch.zeros_like(w)
    for r in range(world_size):
        for k in range(ns["grad_accum_steps"]):
            micro = torch.arange(r * per_rank + k * B // 8, r * per_rank + (k + 1) * B // 8)
            (g,) = torch.autograd.grad(loss_of(micro, "sum") * ns["grad_scale"], w)
            fork_grad += g / world_size  # ReduceOp.AVG over ranks
    (mean_grad,) = torch.autograd.grad(loss_of(torch.arange(B), "mean"), w)
    torch.testing.assert_close(mean_grad * grad_unit(B), fork_grad, rtol=1e-5, atol=1e-6)
    assert grad_unit(131072) == 32768 and grad_unit(393216) == 98304


def test_the_fork_ord_block_is_what_muon_update_computes():
    """The ORD statistics and the interpolation itself, step by step, for one matrix: rho against
    the fork's dot/norm, and G - s G_par as what is orthogonalized."""
    torch.manual_seed(7)
    W, grad = torch.randn(1, 24, 8), torch.randn(1, 24, 8)
    cfg = load_config(["--spectral_lr_mul", "0.3"], env={}, overrides={"ord": True})
    rule = MuonRule.from_config(cfg, torch.device("cpu"))
    parts = muon_update(grad, W, torch.zeros_like(W), torch.zeros(1, 24, 1), 0.0, rule, 0.3)
    dot = (grad * W).sum(dim=(-2, -1), keepdim=True)
    norm = (W * W).sum(dim=(-2, -1), keepdim=True) + 1e-12
    torch.testing.assert_close(parts.rho, dot / norm)
    torch.testing.assert_close(parts.ns_in, grad - 0.3 * (dot / norm) * W)
    assert isinstance(parts, types.SimpleNamespace) is False
