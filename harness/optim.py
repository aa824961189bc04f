"""The optimizers, with the fork's rules (docs/REFERENCE.md "Optimizer"; the fork's train_gpt.py):
sharded NorMuon (with ORD) for the hidden matrices, per-label Adam for the rest.

Gradient units. The trainer hands over gradients in the fork's units: the fork sums the loss
over the tokens of a micro-batch and scales it by grad_scale = 2 / grad_accum_steps (with
grad_accum_steps = 8 / world_size), then averages over ranks: (B / 4) x the gradient of the mean
loss for a global batch of B tokens, at any world size. Polar, NorMuon and Adam (up to its eps)
do not care about the scale; ORD's added-back G_par and the clip norm do.

Muon. `muon_update` is the whole update of a batch of matrices as one function (momentum, ORD,
orthogonalization, NorMuon); `ShardedMuon` runs it on this rank's share. Matrices of one shape
form a group; the group's gradients are stacked, padded with zero matrices to a multiple of the
world size and reduce-scattered (mean), each rank updates its share, and the new weights are
all-gathered: per-rank orthogonalization work falls as 1/world size. With backward hooks, a
group's reduce-scatter starts as soon as its last gradient is accumulated. Per matrix:
lr_eff = muon_lr x lr_mul(step) x shape factor x role factor, where the shape factor is the
fork's max(1, rows/cols)^0.5 on the fork's stored layout (every MLP matrix stored tall, hidden x
dim: sqrt(hidden/dim) for both), and the MLP output projection gets muon_lr_mul_mlp_proj (2x) on
top. Weight decay W -= W x mask x wd x (muon_lr x lr_mul) x lr_eff, the mask being update x W >= 0
(cautious), computed with the final update.

ORD (train_gpt_muon_new.py), per matrix, G after momentum and W the weight:
rho = <G,W> / (||W||^2 + eps), G_par = rho W; Polar(G - s G_par) (ord_form interpolated, the
fork) or Polar(G - G_par) (projected); NorMuon; + s G_par (after NorMuon, or before it with
ord_placement before_norm; in mean-loss units with ord_units mean). With s = 0 the interpolated
form is the standard update bit for bit.

Adam (embeddings, head, scalars, gates): the fork's per-label table of betas and LR / weight
decay multipliers, its update (eps outside the bias correction, cautious decay by lr^2 x wd),
stepped every adam_every-th step (2: odd steps, with the gradients of two steps summed). With
tied_embed, the head and the embedding are one matrix until the split step: the embedding's
gradient is added to the head's, the head is updated, and the embedding copies it; at the split
the embedding takes over the head's Adam state. Sharded like the fork's DistAdam (on Adam steps
only): every parameter's rows are split over the ranks, its gradient reduce-scattered (mean), each
rank updates its rows with its rows of the moments, and the rows are all-gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn

from harness import dist as hdist
from harness.config import Config
from harness.params import ParamSpec
from kernels import orthogonalize

# per-matrix statistics the ORD script logs at validation steps (columns of the stats tensor)
ORD_STATS = ("rho", "spectral_frac", "update_norm", "cos_update_w")


# ------------------------------------------------------------------------------------------
# Muon: the update of a batch of matrices


@dataclass(frozen=True)
class OrdMode:
    form: str  # interpolated | projected
    units: str  # fork | mean
    placement: str  # after_norm | before_norm
    reproject: bool
    eps: float

    @classmethod
    def from_config(cls, cfg: Config) -> "OrdMode | None":
        if not cfg.ord:
            return None
        return cls(cfg.ord_form, cfg.ord_units, cfg.ord_placement, cfg.ord_reproject, cfg.spectral_proj_eps)


@dataclass(frozen=True)
class MuonRule:
    """Everything about Muon's update that is fixed for a run, resolved once from the config."""

    ns_method: str
    ns_steps: int
    ns_dtype: torch.dtype
    normuon: bool
    beta2: float
    ord: OrdMode | None

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device) -> "MuonRule":
        return cls(cfg.ns_method, cfg.ns_steps, ns_dtype(cfg, device), cfg.normuon, cfg.normuon_beta2,
                   OrdMode.from_config(cfg))


@dataclass
class MuonParts:
    """What one update computed, per matrix of the batch (k, m, n): the direction (before the
    LR) and the parts the diagnostics and the ORD statistics read."""

    update: torch.Tensor
    G: torch.Tensor  # the gradient after Nesterov momentum
    ns_in: torch.Tensor  # what was orthogonalized
    ns_out: torch.Tensor  # the orthogonalization's output
    rho: torch.Tensor | None = None  # (k, 1, 1), ORD only
    G_par: torch.Tensor | None = None

    def stats(self, W: torch.Tensor, eps: float) -> torch.Tensor:
        """(k, len(ORD_STATS)): rho, ||G_par||/||G||, ||update||, cos(update, W)."""
        w_sq = W.square().sum(dim=(-2, -1))
        rho = self.rho.flatten() if self.rho is not None else (self.G * W).sum(dim=(-2, -1)) / (w_sq + eps)
        g_norm = self.G.norm(dim=(-2, -1))
        u_norm = self.update.norm(dim=(-2, -1))
        cos = (self.update * W).sum(dim=(-2, -1)) / (u_norm * w_sq.sqrt()).clamp_min(1e-30)
        return torch.stack([rho, rho.abs() * w_sq.sqrt() / g_norm.clamp_min(1e-30), u_norm, cos], dim=1)


def normuon(O: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (the fork's variance reduction): a running mean of O^2 per neuron (rows when
    rows >= cols, else columns; second_moment is updated in place), O scaled by its rsqrt
    (floored at 1e-10), then rescaled so each matrix keeps the Frobenius norm it had."""
    reduce_dim = -1 if O.size(-2) >= O.size(-1) else -2
    v_mean = O.float().square().mean(dim=reduce_dim, keepdim=True)
    size = O.size(reduce_dim)
    norm_before = v_mean.sum(dim=(-2, -1), keepdim=True).mul_(size).sqrt_()
    second_moment.lerp_(v_mean.to(second_moment.dtype), 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt_()
    norm_after = ((v_mean * size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt_()
    return O * (step_size * (norm_before / norm_after.clamp_min_(1e-10))).type_as(O)


def ord_split(G: torch.Tensor, W: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matrix (the last two dims): rho = <G,W> / (||W||^2 + eps) and G_par = rho W."""
    rho = (G * W).sum(dim=(-2, -1), keepdim=True) / W.square().sum(dim=(-2, -1), keepdim=True).add_(eps)
    return rho, rho * W


def muon_update(
    grad: torch.Tensor,
    W: torch.Tensor,
    momentum_buf: torch.Tensor,
    second_moment: torch.Tensor,
    momentum: float,
    rule: MuonRule,
    s: torch.Tensor | float = 0.0,
    unit_scale: float = 1.0,
) -> MuonParts:
    """Muon's update of a batch of matrices (k, m, n): Nesterov momentum (updates momentum_buf),
    ORD when rule.ord is set (s: its coefficient, per matrix (k, 1, 1) or one number; unit_scale:
    the factor from mean-loss to the gradient's units, for ord_units mean), orthogonalization,
    NorMuon (updates second_moment). Returns the direction before the learning rate, and parts."""
    momentum_buf.lerp_(grad, 1 - momentum)
    G = grad.lerp(momentum_buf, momentum)
    mode = rule.ord
    rho = G_par = None
    if mode is None:
        ns_in = G
    else:
        rho, G_par = ord_split(G, W, mode.eps)
        ns_in = G - (G_par if mode.form == "projected" else s * G_par)
    O = orthogonalize(ns_in, method=rule.ns_method, steps=rule.ns_steps, dtype=rule.ns_dtype)
    ns_out = O
    if mode is not None and mode.reproject:
        O = O - ord_split(O, W, mode.eps)[1]
    add_back = None
    if mode is not None:
        add_back = s * G_par if mode.units == "fork" else s * G_par / unit_scale
        if mode.placement == "before_norm":
            O = O + add_back
    if rule.normuon:
        O = normuon(O, second_moment, rule.beta2)
    if mode is not None and mode.placement == "after_norm":
        O = O + add_back
    return MuonParts(update=O.float(), G=G, ns_in=ns_in, ns_out=ns_out, rho=rho, G_par=G_par)


def ns_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.ns_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.ns_dtype]


def matrix_lr_factor(role: str, shape: tuple[int, int], cfg: Config) -> float:
    """The fork's per-matrix LR factor: max(1, rows/cols)^0.5 on its stored layout (attention
    square, MLP matrices stored tall), times muon_lr_mul_mlp_proj for the MLP output projection."""
    m, n = shape
    factor = (max(m, n) / min(m, n)) ** 0.5 if role.startswith("mlp") else max(1.0, m / n) ** 0.5
    return factor * (cfg.muon_lr_mul_mlp_proj if role == "mlp_proj" else 1.0)


def matrix_spectral_mul(role: str, cfg: Config) -> float:
    """ORD's s for a matrix: the per-kind value where set, else spectral_lr_mul (0 with ORD off)."""
    if role.startswith("attn") and cfg.spectral_lr_mul_attn is not None:
        return cfg.spectral_lr_mul_attn
    if role.startswith("mlp") and cfg.spectral_lr_mul_mlp is not None:
        return cfg.spectral_lr_mul_mlp
    return cfg.spectral_lr_mul or 0.0


# ------------------------------------------------------------------------------------------
# Muon: sharded over ranks


@dataclass
class MatrixRef:
    """One matrix of a Muon parameter: the parameter viewed as (-1, m, n), entry `index`."""

    name: str
    param: nn.Parameter
    index: int
    role: str
    shape: tuple[int, int]

    @property
    def kind(self) -> str:
        return self.role.split("_")[0] if self.role != "pad" else "other"

    def weight(self) -> torch.Tensor:
        return self.param.view(-1, *self.shape)[self.index]

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else g.view(-1, *self.shape)[self.index]


def matrix_refs(specs: list[ParamSpec], params: dict[str, nn.Parameter]) -> list[MatrixRef]:
    return [MatrixRef(m.name, params[s.name], i, m.role, s.matrix_shape)
            for s in specs if s.optim == "muon" for i, m in enumerate(s.matrices)]


@dataclass
class MuonGroup:
    shape: tuple[int, int]
    refs: list[MatrixRef]
    world_size: int
    rank: int
    params: list[nn.Parameter] = field(default_factory=list)
    momentum: torch.Tensor | None = None
    second_moment: torch.Tensor | None = None
    lr_factor: torch.Tensor | None = None  # (per_rank, 1, 1) for this rank's share
    spectral_mul: torch.Tensor | None = None  # (per_rank, 1, 1), ORD's s for this rank's share
    pending: Callable[[], torch.Tensor] | None = None  # waits for this step's reduce-scatter
    share: torch.Tensor | None = None  # this step's reduced gradient share, once waited for (clipping)
    ready_count: int = 0

    def __post_init__(self):
        seen: list[nn.Parameter] = []
        for r in self.refs:
            if not any(r.param is p for p in seen):
                seen.append(r.param)
        self.params = seen

    @property
    def padded(self) -> int:
        return math.ceil(len(self.refs) / self.world_size) * self.world_size

    @property
    def per_rank(self) -> int:
        return self.padded // self.world_size

    @property
    def owned(self) -> range:
        """Indices (into refs) of the real matrices this rank owns."""
        start = self.rank * self.per_rank
        return range(start, min(start + self.per_rank, len(self.refs)))

    def share_values(self, value: Callable[[MatrixRef], float], device: torch.device) -> torch.Tensor:
        """(per_rank, 1, 1) of value(ref) over this rank's share (0 for padding)."""
        vals = [value(self.refs[i]) if i < len(self.refs) else 0.0
                for i in range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)]
        return torch.tensor(vals, dtype=torch.float32, device=device).view(-1, 1, 1)

    def stacked_grads(self) -> torch.Tensor:
        m, n = self.shape
        p0 = self.refs[0].param
        out = torch.zeros(self.padded, m, n, dtype=torch.float32, device=p0.device)
        for i, r in enumerate(self.refs):
            g = r.grad()
            if g is not None:
                out[i].copy_(g)
        return out

    def owned_weights(self) -> torch.Tensor:
        m, n = self.shape
        p0 = self.refs[0].param
        out = torch.zeros(self.per_rank, m, n, dtype=torch.float32, device=p0.device)
        for j, i in enumerate(self.owned):
            out[j].copy_(self.refs[i].weight())
        return out


class ShardedMuon:
    def __init__(self, matrices: list[MatrixRef], cfg: Config, info: hdist.DistInfo):
        self.cfg = cfg
        self.info = info
        self.rule = MuonRule.from_config(cfg, info.device)
        by_shape: dict[tuple[int, int], list[MatrixRef]] = {}
        for r in matrices:
            by_shape.setdefault(tuple(r.shape), []).append(r)
        self.groups = [MuonGroup(shape, refs, info.world_size, info.rank) for shape, refs in by_shape.items()]
        for g in self.groups:
            m, n = g.shape
            dev = g.refs[0].param.device
            g.momentum = torch.zeros(g.per_rank, m, n, dtype=torch.float32, device=dev)
            sm_shape = (g.per_rank, m, 1) if m >= n else (g.per_rank, 1, n)
            g.second_moment = torch.zeros(sm_shape, dtype=torch.float32, device=dev)
            g.lr_factor = g.share_values(lambda r: matrix_lr_factor(r.role, r.shape, cfg), dev)
            g.spectral_mul = g.share_values(lambda r: matrix_spectral_mul(r.role, cfg), dev)
        self.launch_on_ready = False  # set by the trainer for the micro-batch whose backward syncs
        self._hooks: list = []
        # Inspection hook (harness/diagnostics.py): when set, called per group on the owner rank
        # as inspect(group, probe) with this rank's share (per_rank, m, n, padding included) of:
        # grad (reduced raw gradient), G (after momentum), ns_in / ns_out (the orthogonalization's
        # input and output), update (the direction after NorMuon/ORD, before the LR), W (before
        # the step) and dW (the applied change). It only reads them: the step is unchanged.
        self.inspect: Callable[[MuonGroup, dict[str, torch.Tensor]], None] | None = None

    # --- communication --------------------------------------------------------------------
    def _launch(self, g: MuonGroup) -> None:
        stacked = g.stacked_grads()
        out = torch.empty(g.per_rank, *g.shape, dtype=torch.float32, device=stacked.device)
        g.pending = hdist.reduce_scatter_mean_async(out, stacked)

    def attach_backward_hooks(self) -> None:
        """Start each group's reduce-scatter as soon as its last gradient is accumulated."""
        owner: dict[int, list[MuonGroup]] = {}
        for g in self.groups:
            for p in g.params:
                owner.setdefault(id(p), []).append(g)

        def hook(p: torch.Tensor) -> None:
            if not self.launch_on_ready:
                return
            for g in owner[id(p)]:
                g.ready_count += 1
                if g.ready_count == len(g.params):
                    self._launch(g)

        for g in self.groups:
            for p in g.params:
                if p.requires_grad and not any(h[0] is p for h in self._hooks):
                    self._hooks.append((p, p.register_post_accumulate_grad_hook(hook)))

    def _take_share(self, g: MuonGroup) -> torch.Tensor:
        """This rank's share of the group's averaged gradient (waiting for it if needed)."""
        if g.share is None:
            g.share = g.pending()
        grad, g.share, g.pending, g.ready_count = g.share, None, None, 0
        return grad

    def reduced_shares(self) -> list[torch.Tensor]:
        """Wait for every group's reduce-scatter (starting those the hooks did not) and keep the
        shares for step(): clipping scales them in place before the update."""
        for g in self.groups:
            if g.pending is None and g.share is None:
                self._launch(g)
        for g in self.groups:
            if g.share is None:
                g.share = g.pending()
        return [g.share for g in self.groups]

    # --- the update -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr_mul: float, momentum: float, unit_scale: float = 1.0,
             collect_stats: bool = False) -> dict[str, dict[str, float]]:
        """One step of every group; returns {matrix name: ORD_STATS} when collect_stats."""
        cfg = self.cfg
        for g in self.groups:
            if g.pending is None and g.share is None:
                self._launch(g)
        lr = cfg.muon_lr * lr_mul
        gathers, stats_gathers = [], []
        for g in self.groups:
            grad = self._take_share(g)
            W = g.owned_weights()
            W0 = W.clone() if self.inspect is not None else None
            parts = muon_update(grad, W, g.momentum, g.second_moment, momentum, self.rule, g.spectral_mul, unit_scale)
            update, lr_eff = parts.update, lr * g.lr_factor
            if cfg.muon_wd > 0:
                mask = (update * W >= 0) if cfg.cautious_wd else torch.ones_like(W, dtype=torch.bool)
                W.copy_(W - W * mask * (cfg.muon_wd * lr) * lr_eff - update * lr_eff)
            else:
                W.sub_(update * lr_eff)
            m, n = g.shape
            full = torch.empty(g.padded, m, n, dtype=torch.float32, device=W.device)
            gathers.append((g, hdist.all_gather_async(full, W), full))
            if W0 is not None:  # runs while the weights' all-gather is in flight
                self.inspect(g, dict(W=W0, grad=grad, G=parts.G, ns_in=parts.ns_in, ns_out=parts.ns_out,
                                     update=update, dW=W - W0))
            if collect_stats:
                stats = parts.stats(W if W0 is None else W0, cfg.spectral_proj_eps)
                full_stats = torch.empty(g.padded, stats.size(1), dtype=stats.dtype, device=stats.device)
                stats_gathers.append((g, hdist.all_gather_async(full_stats, stats)))
        for g, wait, full in gathers:
            wait()
            for i, r in enumerate(g.refs):
                r.weight().copy_(full[i])
        out: dict[str, dict[str, float]] = {}
        for g, wait in stats_gathers:
            full_stats = wait().cpu()
            for i, r in enumerate(g.refs):
                out[r.name] = dict(zip(ORD_STATS, full_stats[i].tolist()))
        return out

    # --- state (checkpoints) ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """The whole Muon state, gathered from every rank's share, in matrix order and without
        the padding: a checkpoint written at one world size loads at any other. A collective:
        every rank must call it (each gets the whole state; rank 0 writes it)."""
        groups = []
        for g in self.groups:
            n = len(g.refs)
            entry: dict = {"shape": list(g.shape), "names": [r.name for r in g.refs]}
            for key in ("momentum", "second_moment"):
                shard = getattr(g, key)
                if self.info.world_size == 1:  # the shard is the whole state: no copy
                    entry[key] = shard.cpu()
                    continue
                full = torch.empty(g.padded, *shard.shape[1:], dtype=shard.dtype, device=shard.device)
                hdist.all_gather_async(full, shard)()
                # clone the unpadded part: torch.save writes a view's whole storage
                entry[key] = (full[:n].clone() if n < g.padded else full).cpu()
            groups.append(entry)
        return {"world_size": self.info.world_size, "groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's share of a whole state written by state_dict (any world size).
        A state that does not fit these matrices raises ValueError naming the group."""
        if len(state["groups"]) != len(self.groups):
            raise ValueError(f"{len(state['groups'])} Muon groups saved, {len(self.groups)} here")
        for g, s in zip(self.groups, state["groups"]):
            names = [r.name for r in g.refs]
            if list(s["shape"]) != list(g.shape) or list(s["names"]) != names:
                raise ValueError(f"Muon group {tuple(s['shape'])} with {len(s['names'])} matrices saved,"
                                 f" {g.shape} with {len(names)} here")
            for key in ("momentum", "second_moment"):
                mine, full = getattr(g, key), s[key]
                if tuple(full.shape) != (len(g.refs), *mine.shape[1:]):
                    raise ValueError(f"Muon {key} of group {g.shape} has shape {tuple(full.shape)}")
                mine.zero_()  # the padding matrices stay zero, as in a fresh run
                for j, i in enumerate(g.owned):
                    mine[j].copy_(full[i])


# ------------------------------------------------------------------------------------------
# Adam


@dataclass(frozen=True)
class AdamSetting:
    beta1: float
    beta2: float
    lr_mul: float = 1.0
    wd_mul: float = 1.0


# The fork's param table (TrainingManager.param_table) for its Adam labels.
ADAM_TABLE: dict[str, AdamSetting] = {
    "scalars": AdamSetting(0.9, 0.99, lr_mul=5.0, wd_mul=0.0),
    "value_embed": AdamSetting(0.75, 0.95, lr_mul=75.0, wd_mul=5.0),
    "bigram_embed": AdamSetting(0.75, 0.95, lr_mul=75.0, wd_mul=5.0),
    "smear_gate": AdamSetting(0.9, 0.99, lr_mul=0.01, wd_mul=0.0),
    "skip_gate": AdamSetting(0.9, 0.99, lr_mul=0.05, wd_mul=0.0),
    "attn_gate_bank": AdamSetting(0.9, 0.99),
    "ve_gate_bank": AdamSetting(0.9, 0.99),
    "x0_lambdas": AdamSetting(0.65, 0.95, lr_mul=5.0, wd_mul=0.0),
    "lm_head": AdamSetting(0.5, 0.95, wd_mul=150.0),
    "embed": AdamSetting(0.5, 0.95, wd_mul=150.0),
}


def adam_settings(cfg: Config) -> dict[str, AdamSetting]:
    """ADAM_TABLE with cfg.adam_overrides applied (`*.KEY` first, then `LABEL.KEY`)."""
    out = dict(ADAM_TABLE)
    for wildcard in (True, False):
        for key, value in cfg.adam_overrides.items():
            label, _, what = key.partition(".")
            if (label == "*") != wildcard:
                continue
            for name in (out if wildcard else [label]):
                out[name] = replace(out[name], **{what: value})
    return out


def adam_update_(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, t: int,
                 lr: float, beta1: float, beta2: float, eps: float, wd: float) -> None:
    """The fork's Adam step t (1-based) on p: eps added to sqrt(v) before the bias correction,
    cautious decoupled decay by lr^2 x wd where the update and p agree in sign."""
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
    update = exp_avg.div(exp_avg_sq.sqrt().add_(eps)).mul_(step_size)
    mask = (update * p) > 0
    update.addcmul_(p, mask, value=lr * lr * wd)
    p.sub_(update)


@dataclass
class AdamEntry:
    """One Adam parameter, sharded by rows (dim 0) as the fork shards its embeddings: each of the
    W ranks owns `rows` = ceil(R / W) consecutive rows of the R (the last owners' blocks padded
    with zero rows where W does not divide R) and holds the moments of those rows only
    ((rows, *shape[1:]); at world size 1 the parameter's shape)."""

    name: str
    label: str
    param: nn.Parameter
    setting: AdamSetting
    world_size: int
    rows: int
    start: int  # this rank's first row (may be past the end: a rank with only padding)
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    t: int = 0

    @classmethod
    def create(cls, name: str, label: str, p: nn.Parameter, setting: AdamSetting, world_size: int, rank: int):
        rows = math.ceil(num_rows(p) / world_size)
        shape = (rows, *p.shape[1:])
        return cls(name, label, p, setting, world_size, rows, rank * rows,
                   torch.zeros(shape, dtype=torch.float32, device=p.device),
                   torch.zeros(shape, dtype=torch.float32, device=p.device))

    @property
    def padded(self) -> bool:
        """Whether W does not divide the rows (the collectives then go through padded copies)."""
        return self.rows * self.world_size != num_rows(self.param)

    @property
    def owned(self) -> int:
        """How many of this rank's rows are real (the rest is padding)."""
        return max(0, min(self.rows, num_rows(self.param) - self.start))

    def by_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of the parameter's shape viewed as (R, *shape[1:]) (a 0-d one as (1,))."""
        return t.view(num_rows(self.param), *self.param.shape[1:])

    def padded_rows(self, t: torch.Tensor) -> torch.Tensor:
        """t (the parameter's shape) as (W x rows, *shape[1:]): t itself where W divides the rows,
        else a copy with zero rows at the end."""
        t = self.by_rows(t)
        if not self.padded:
            return t
        out = t.new_zeros(self.rows * self.world_size, *t.shape[1:])
        out[: t.size(0)].copy_(t)
        return out


def num_rows(t: torch.Tensor) -> int:
    return t.shape[0] if t.ndim else 1


class LabelledAdam:
    """Adam over labelled parameters, every `adam_every`-th step, with the embedding tied to the
    head until `split_step` (cfg.tied_embed), sharded over ranks as the fork's DistAdam (ZeRO-1):
    each parameter's gradient is reduce-scattered (mean) by rows, each rank updates its rows
    with its rows of the moments, and the rows are all-gathered into the parameter (in place
    where the world size divides the rows). Per-rank Adam state and update work fall as 1 /
    world size; the state dict gathers the whole state (any world size loads it)."""

    def __init__(self, named: list[tuple[str, str, nn.Parameter]], cfg: Config, split_step: int | None,
                 info: hdist.DistInfo | None = None):
        settings = adam_settings(cfg)
        self.cfg = cfg
        self.world_size, self.rank = (info.world_size, info.rank) if info is not None else (1, 0)
        self.entries = [AdamEntry.create(name, label, p, settings[label], self.world_size, self.rank)
                        for name, label, p in named]
        by_label = {e.label: e for e in self.entries}
        self.head, self.embed = by_label.get("lm_head"), by_label.get("embed")
        self.split_step = split_step if cfg.tied_embed and self.head and self.embed else None
        self.tied = self.split_step is not None
        if self.tied and tuple(self.head.param.shape) not in (tuple(self.embed.param.shape),
                                                              tuple(self.embed.param.shape[::-1])):
            raise ValueError(f"tied_embed: head {tuple(self.head.param.shape)} and embedding"
                             f" {tuple(self.embed.param.shape)} are not one matrix")
        # per parameter updated this step: a function that waits for its rows of the mean gradient
        self._pending: list[tuple[AdamEntry, Callable[[], torch.Tensor]]] | None = None

    def due(self, step: int) -> bool:
        return self.cfg.adam_every == 1 or step % 2 == 1

    @staticmethod
    def _like(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """t in other's layout (the head and the embedding may be stored transposed)."""
        return t if t.shape == other.shape else t.T

    def _active(self) -> list[AdamEntry]:
        return [e for e in self.entries if not (self.tied and e is self.embed)]

    def launch_reduce(self) -> None:
        """Start the reduce-scatter of every updated parameter's gradient."""
        if self.tied and self.embed.param.grad is not None:
            # one matrix while tied: the head takes the embedding's gradient too
            if self.head.param.grad is None:
                self.head.param.grad = torch.zeros_like(self.head.param)
            self.head.param.grad.add_(self._like(self.embed.param.grad, self.head.param))
        self._pending = [(e, self._reduce_rows(e)) for e in self._active()]

    def _reduce_rows(self, e: AdamEntry) -> Callable[[], torch.Tensor]:
        g = e.param.grad
        g = torch.zeros_like(e.param, dtype=torch.float32) if g is None else g.float()
        if self.world_size == 1:  # a copy all the same: clipping scales it, p.grad stays as it was
            shard = e.by_rows(g).clone()
            return lambda: shard
        shard = torch.empty_like(e.exp_avg)
        return hdist.reduce_scatter_mean_async(shard, e.padded_rows(g))

    def reduced(self) -> list[torch.Tensor]:
        """This rank's rows of every updated parameter's mean gradient ((rows, *shape[1:]) each,
        padding rows zero), waiting for the reductions if needed."""
        if self._pending is None:
            self.launch_reduce()
        shards = [wait() for _, wait in self._pending]
        self._pending = [(e, (lambda s=s: s)) for (e, _), s in zip(self._pending, shards)]
        return shards

    @torch.no_grad()
    def step(self, step: int, lr_mul: float) -> None:
        cfg = self.cfg
        shards = self.reduced()
        entries = [e for e, _ in self._pending]
        self._pending = None
        gathers = []
        for e, g in zip(entries, shards):
            rows = e.by_rows(e.param.data)
            if e.padded:  # a copy of this rank's rows, zero-padded (padding stays zero: g and moments are)
                mine = rows.new_zeros(e.rows, *rows.shape[1:])
                mine[: e.owned].copy_(rows[e.start: e.start + e.owned])
            else:  # this rank's rows of the parameter itself
                mine = rows[e.start: e.start + e.rows]
            e.t += 1
            lr = cfg.adam_lr * lr_mul * e.setting.lr_mul
            adam_update_(mine, g.to(e.param.dtype), e.exp_avg, e.exp_avg_sq, e.t, lr,
                         e.setting.beta1, e.setting.beta2, cfg.adam_eps, cfg.adam_wd * e.setting.wd_mul)
            if self.world_size > 1:
                full = rows.new_empty(e.rows * self.world_size, *rows.shape[1:]) if e.padded else rows
                gathers.append((e, full, hdist.all_gather_async(full, mine)))
        for e, full, wait in gathers:
            wait()
            if e.padded:
                e.by_rows(e.param.data).copy_(full[: num_rows(e.param)])
        if self.tied:
            self.embed.param.data.copy_(self._like(self.head.param.data, self.embed.param))
            if step == self.split_step:  # untie: the embedding goes on from the head's state
                for key in ("exp_avg", "exp_avg_sq"):
                    self._load_rows(self.embed, key, self._like(self._gather(self.head, key), self.embed.param))
                self.embed.t = self.head.t
                self.tied = False

    def zero_grad(self) -> None:
        for e in self.entries:
            e.param.grad = None

    def _gather(self, e: AdamEntry, key: str) -> torch.Tensor:
        """The whole moment `key` of e, in the parameter's shape (a collective at world size > 1)."""
        shard = getattr(e, key)
        if self.world_size == 1:
            return shard.view(e.param.shape)
        full = torch.empty(self.world_size * e.rows, *shard.shape[1:], dtype=shard.dtype, device=shard.device)
        hdist.all_gather_async(full, shard)()
        R = num_rows(e.param)
        # clone the real rows: torch.save writes a view's whole storage
        return (full[:R].clone() if e.padded else full).view(e.param.shape)

    def _load_rows(self, e: AdamEntry, key: str, full: torch.Tensor) -> None:
        """Take this rank's rows of a whole moment (padding rows zero, as in a fresh run)."""
        mine = getattr(e, key)
        mine.zero_()
        mine[: e.owned].copy_(e.by_rows(full.contiguous())[e.start: e.start + e.owned])

    def state_dict(self) -> dict:
        """Per parameter name: the whole moments (gathered from every rank's rows: a collective,
        every rank must call it) and the step count; whether the embedding is still tied; and,
        between the two steps of an adam_every=2 pair, the gradients summed so far (this rank's)."""
        return {
            "tied": self.tied,
            "params": {e.name: {"exp_avg": self._gather(e, "exp_avg").cpu(),
                                "exp_avg_sq": self._gather(e, "exp_avg_sq").cpu(), "t": e.t}
                       for e in self.entries},
            "pending_grads": {e.name: e.param.grad.detach().cpu() for e in self.entries if e.param.grad is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's rows of a whole state written by state_dict (any world size)."""
        saved = state["params"]
        if set(saved) != {e.name for e in self.entries}:
            raise ValueError(f"Adam state for {sorted(saved)[:4]}... does not match these parameters")
        for e in self.entries:
            s = saved[e.name]
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(s[key].shape) != tuple(e.param.shape):
                    raise ValueError(f"Adam {key} of {e.name} has shape {tuple(s[key].shape)},"
                                     f" not {tuple(e.param.shape)}")
                self._load_rows(e, key, s[key].to(e.exp_avg.device))
            e.t = int(s["t"])
            pending = state.get("pending_grads", {}).get(e.name)
            e.param.grad = None if pending is None else pending.to(e.param.device, e.param.dtype).clone()
        self.tied = bool(state["tied"]) and self.split_step is not None


# ------------------------------------------------------------------------------------------
# Both, as the trainer sees them


class Optimizers:
    """Muon + Adam from the model's parameter table: one step, one zero_grad, one state dict."""

    def __init__(self, model: nn.Module, cfg: Config, info: hdist.DistInfo, split_step: int | None = None):
        specs: list[ParamSpec] = model.param_specs()
        params = dict(model.named_parameters())
        missing = set(params) - {s.name for s in specs}
        if missing:
            raise ValueError(f"parameters without a param_specs() entry: {sorted(missing)}")
        self.specs = specs
        self.assignment = {s.name: "muon" if s.optim == "muon" else f"adam_{s.label}" for s in specs}
        self.muon = ShardedMuon(matrix_refs(specs, params), cfg, info)
        self.adam = LabelledAdam([(s.name, s.label, params[s.name]) for s in specs if s.optim == "adam"],
                                 cfg, split_step, info)
        self.muon_params = [params[s.name] for s in specs if s.optim == "muon"]
        self._adam_stepped = True
        self.model = model

    def attach_backward_hooks(self) -> None:
        self.muon.attach_backward_hooks()

    def set_sync(self, sync: bool) -> None:
        """True for the micro-batch whose backward completes this step's gradients."""
        self.muon.launch_on_ready = sync

    def step(self, step: int, lr_mul: float, momentum: float, unit_scale: float = 1.0,
             collect_stats: bool = False, clip: float = 0.0) -> tuple[float | None, dict[str, dict[str, float]]]:
        """Training step `step` of both (Adam only when it is due); with clip > 0, first scale the
        averaged gradients so their global norm is at most clip (torch's clip_grad_norm_ rule).
        Returns (the norm before clipping or None, the ORD statistics when collect_stats).
        Clipping must see the averaged gradient, which only exists after the reductions: the
        Muon shares are already in flight from the backward hooks, so clipping p.grad on each
        rank would miss them, and each rank would clip by a different, local norm."""
        adam_due = self.adam.due(step)
        if adam_due:
            self.adam.launch_reduce()
        norm = self._clip(clip, adam_due) if clip > 0 else None
        stats = self.muon.step(lr_mul, momentum, unit_scale, collect_stats)
        if adam_due:
            self.adam.step(step, lr_mul)
        self._adam_stepped = adam_due
        return norm, stats

    @torch.no_grad()
    def _clip(self, clip: float, adam_due: bool) -> float:
        shares = self.muon.reduced_shares()
        if adam_due:
            shares = shares + self.adam.reduced()
        # every real matrix and every real Adam row is owned by exactly one rank (padding is
        # zero): the global norm is the sum over ranks of each rank's sum of squares
        sq = torch.zeros(1, dtype=torch.float64, device=shares[0].device if shares else "cpu")
        for s in shares:
            sq += s.double().square().sum()
        norm = float(hdist.all_reduce_sum_(sq).sqrt().item())
        coef = clip / (norm + 1e-6)
        if coef < 1.0:
            for s in shares:
                s.mul_(coef)
        return norm

    def zero_grad(self) -> None:
        """After step(): clear the Muon gradients, and Adam's when it stepped (else they go on
        summing into the next step's)."""
        for p in self.muon_params:
            p.grad = None
        if self._adam_stepped:
            self.adam.zero_grad()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])
