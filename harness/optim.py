"""The optimizers: sharded NorMuon (with ORD) for the hidden matrices, all-reduced AdamW for the rest.

Muon. Matrices of one shape form a group (a (3, d, d) stack counts as three d x d matrices). The
group's gradients are stacked, padded with zero matrices to a multiple of the world size, and
reduce-scattered (mean), so each rank owns a contiguous share of the matrices. Each rank runs
momentum, orthogonalization, NorMuon and the update on its share only, then the updated weights
are all-gathered: the per-rank orthogonalization work falls as 1/world size. With
`overlap_with_backward`, a group's reduce-scatter starts from a gradient hook as soon as the
last of its gradients is accumulated, while the backward pass goes on.

ORD (train_gpt_muon_new.py), per matrix with G the momentum-adjusted gradient and W the weight:
rho = <G,W> / (||W||² + eps), G_par = rho W, G_perp = G - G_par,
update = Polar(G_perp) + spectral_lr_mul * G_par (added after NorMuon by default, or before it).
With spectral_lr_mul = 0 and no projection the ORD code is skipped entirely, so the update is the
standard one bit for bit.

Adam: embeddings, head and scalars, all-reduced rather than sharded. These are a handful of
tensors (mostly the two vocabulary-sized matrices); an all-reduce moves the same bytes as a
reduce-scatter plus all-gather, and their Adam state (~0.6 GB for the speedrun model) does not
need sharding on an 80 GB GPU, so the simpler path wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from harness import dist as hdist
from harness.config import Config
from kernels import orthogonalize

# per-matrix statistics the ORD path can report (order of columns in the stats tensor)
ORD_STATS = ("rho", "spectral_frac", "update_norm", "cos_update_w")


@dataclass
class MatrixRef:
    """One matrix of a Muon parameter: the whole 2D parameter, or one slice of a 3D stack."""

    name: str
    param: nn.Parameter
    index: int | None

    @property
    def kind(self) -> str:
        if ".attn." in self.name:
            return "attn"
        if ".mlp." in self.name:
            return "mlp"
        return "other"

    def weight(self) -> torch.Tensor:
        # a stack of any rank (e.g. the speedrun model's (layers, 2, 4d, d) MLP bank) splits on its last two dims
        return self.param if self.index is None else self.param.view(-1, *self.param.shape[-2:])[self.index]

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        if g is None:
            return None
        return g if self.index is None else g.view(-1, *g.shape[-2:])[self.index]


@dataclass
class MuonGroup:
    shape: tuple[int, int]
    refs: list[MatrixRef]
    world_size: int
    rank: int
    params: list[nn.Parameter] = field(default_factory=list)
    momentum: torch.Tensor | None = None
    second_moment: torch.Tensor | None = None
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


def normuon_(O: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon: divide by a running per-neuron RMS (rows when tall, columns when wide), then
    rescale so each matrix keeps the Frobenius norm it had."""
    m, n = O.shape[-2:]
    reduce_dim = -1 if m >= n else -2
    v = O.square().mean(dim=reduce_dim, keepdim=True)
    second_moment.lerp_(v, 1 - beta2)
    norm_before = O.norm(dim=(-2, -1), keepdim=True)
    O = O / (second_moment.sqrt() + 1e-10)
    norm_after = O.norm(dim=(-2, -1), keepdim=True)
    return O * (norm_before / norm_after.clamp_min(1e-30))


def ord_decompose(G: torch.Tensor, W: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per matrix (the last two dims): rho = <G,W> / (||W||² + eps), G_par = rho W, G_perp = G - G_par."""
    w_sq = W.square().sum(dim=(-2, -1), keepdim=True)
    rho = (G * W).sum(dim=(-2, -1), keepdim=True) / (w_sq + eps)
    G_par = rho * W
    return rho, G_par, G - G_par


def ns_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.ns_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.ns_dtype]


class ShardedMuon:
    def __init__(self, matrices: list[MatrixRef], cfg: Config, info: hdist.DistInfo):
        self.cfg = cfg
        self.info = info
        by_shape: dict[tuple[int, int], list[MatrixRef]] = {}
        for r in matrices:
            by_shape.setdefault(tuple(r.weight().shape), []).append(r)
        self.groups = [MuonGroup(shape, refs, info.world_size, info.rank) for shape, refs in by_shape.items()]
        for g in self.groups:
            m, n = g.shape
            dev = g.refs[0].param.device
            g.momentum = torch.zeros(g.per_rank, m, n, dtype=torch.float32, device=dev)
            sm_shape = (g.per_rank, m, 1) if m >= n else (g.per_rank, 1, n)
            g.second_moment = torch.zeros(sm_shape, dtype=torch.float32, device=dev)
        self.launch_on_ready = False  # set by the trainer for the micro-batch whose backward syncs
        self._hooks: list = []
        self.ns_dtype = ns_dtype(cfg, info.device)
        self.last_stats: dict[str, dict[str, float]] = {}
        # Inspection hook (harness/diagnostics.py): when set, called per group on the owner rank
        # as inspect(group, probe) with this rank's share (per_rank, m, n, padding included) of:
        # grad (reduced raw gradient), G (after momentum), ns_in / ns_out (the orthogonalization's
        # input and output), update (the direction after NorMuon/ORD, before the LR), W (before
        # the step) and dW (the applied change). It only reads them: the step is unchanged.
        self.inspect: Callable[[MuonGroup, dict[str, torch.Tensor]], None] | None = None
        self._probe: dict[str, torch.Tensor] | None = None

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
    def spectral_muls(self, g: MuonGroup) -> torch.Tensor:
        cfg = self.cfg
        vals = []
        for j in range(g.per_rank):
            i = g.rank * g.per_rank + j
            kind = g.refs[i].kind if i < len(g.refs) else "other"
            s = cfg.spectral_lr_mul
            if kind == "attn" and cfg.spectral_lr_mul_attn is not None:
                s = cfg.spectral_lr_mul_attn
            elif kind == "mlp" and cfg.spectral_lr_mul_mlp is not None:
                s = cfg.spectral_lr_mul_mlp
            vals.append(s)
        return torch.tensor(vals, dtype=torch.float32, device=g.momentum.device).view(-1, 1, 1)

    def _ord_active(self) -> bool:
        cfg = self.cfg
        if not cfg.ord:
            return False
        muls = [cfg.spectral_lr_mul, cfg.spectral_lr_mul_attn, cfg.spectral_lr_mul_mlp]
        return cfg.ord_project or cfg.ord_reproject or any(m not in (None, 0.0) for m in muls)

    @torch.no_grad()
    def step(self, lr_mul: float, momentum: float, collect_stats: bool = False) -> None:
        cfg = self.cfg
        for g in self.groups:
            if g.pending is None and g.share is None:
                self._launch(g)
        gathers = []
        stats_gathers = []
        for g in self.groups:
            grad = self._take_share(g)
            W = g.owned_weights()
            self._probe = {"W": W.clone()} if self.inspect is not None else None
            update, stats = self._update(g, grad, W, momentum, collect_stats)
            m, n = g.shape
            lr = cfg.muon_lr * lr_mul * max(1.0, m / n) ** 0.5
            if cfg.muon_wd > 0:
                decay = W * (lr * cfg.muon_wd)
                if cfg.cautious_wd:
                    decay = decay * (update * W >= 0)
                W.sub_(decay)
            W.sub_(update, alpha=lr)
            full = torch.empty(g.padded, m, n, dtype=torch.float32, device=W.device)
            gathers.append((g, hdist.all_gather_async(full, W), full))
            if self._probe is not None:  # runs while the weights' all-gather is in flight
                probe, self._probe = self._probe, None
                probe.update(grad=grad, update=update, dW=W - probe["W"])
                self.inspect(g, probe)
            if stats is not None:
                full_stats = torch.empty(g.padded, stats.size(1), dtype=stats.dtype, device=stats.device)
                stats_gathers.append((g, hdist.all_gather_async(full_stats, stats)))
        for g, wait, full in gathers:
            wait()
            for i, r in enumerate(g.refs):
                r.weight().copy_(full[i])
        self.last_stats = {}
        for g, wait in stats_gathers:
            full_stats = wait().cpu()
            for i, r in enumerate(g.refs):
                self.last_stats[r.name] = dict(zip(ORD_STATS, full_stats[i].tolist()))

    def _update(self, g: MuonGroup, grad: torch.Tensor, W: torch.Tensor, momentum: float, collect: bool):
        """Momentum, (ORD,) orthogonalization and NorMuon on this rank's share; returns the
        update direction (before the learning rate) and, when asked, the ORD statistics."""
        cfg = self.cfg
        buf = g.momentum
        buf.lerp_(grad, 1 - momentum)
        G = grad.lerp(buf, momentum)  # Nesterov
        ord_on = self._ord_active()
        if ord_on:
            _, G_par, G_perp = ord_decompose(G, W, cfg.spectral_proj_eps)
            O = orthogonalize(G_perp, method=cfg.ns_method, steps=cfg.ns_steps, dtype=self.ns_dtype).float()
            if self._probe is not None:
                self._probe.update(G=G, ns_in=G_perp, ns_out=O)
            if cfg.ord_reproject:
                O = ord_decompose(O, W, cfg.spectral_proj_eps)[2]
            s = self.spectral_muls(g)
            if cfg.ord_parallel_placement == "before_norm":
                O = O + s * G_par
            if cfg.normuon:
                O = normuon_(O, g.second_moment, cfg.normuon_beta2)
            if cfg.ord_parallel_placement == "after_norm":
                O = O + s * G_par
        else:
            O = orthogonalize(G, method=cfg.ns_method, steps=cfg.ns_steps, dtype=self.ns_dtype).float()
            if self._probe is not None:
                self._probe.update(G=G, ns_in=G, ns_out=O)
            if cfg.normuon:
                O = normuon_(O, g.second_moment, cfg.normuon_beta2)
        stats = None
        if collect:
            w_sq = W.square().sum(dim=(-2, -1))
            dot = (G * W).sum(dim=(-2, -1))
            rho = dot / (w_sq + cfg.spectral_proj_eps)
            g_norm = G.norm(dim=(-2, -1))
            par_norm = rho.abs() * w_sq.sqrt()
            u_norm = O.norm(dim=(-2, -1))
            cos = (O * W).sum(dim=(-2, -1)) / (u_norm * w_sq.sqrt()).clamp_min(1e-30)
            stats = torch.stack([rho, par_norm / g_norm.clamp_min(1e-30), u_norm, cos], dim=1)
        return O, stats

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


class AllReducedAdam:
    """AdamW on embeddings, head and scalars; gradients averaged over ranks in one flat buffer."""

    def __init__(self, groups: list[dict], cfg: Config):
        self.base_lrs = [grp["lr"] for grp in groups]
        self.params = [p for grp in groups for p in grp["params"]]
        self.opt = torch.optim.AdamW(
            groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.adam_wd,
            foreach=True,
        )
        self._pending: tuple[Callable[[], torch.Tensor], torch.Tensor] | None = None

    def launch_reduce(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self._pending = (hdist.all_reduce_mean_async(flat), flat)

    def reduced(self) -> torch.Tensor:
        """The averaged gradients as one flat buffer (waiting for the reduction if needed)."""
        if self._pending is None:
            self.launch_reduce()
        wait, flat = self._pending
        self._pending = (lambda: flat), flat
        return wait()

    @torch.no_grad()
    def step(self, lr_mul: float) -> None:
        flat = self.reduced()
        self._pending = None
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        for grp, base in zip(self.opt.param_groups, self.base_lrs):
            grp["lr"] = base * lr_mul
        self.opt.step()

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


class Optimizers:
    """Muon + Adam as the trainer sees them: one step, one zero_grad, one state dict."""

    def __init__(self, model: nn.Module, cfg: Config, info: hdist.DistInfo):
        roles = model.param_roles()
        matrices: list[MatrixRef] = []
        adam_groups: dict[str, list[nn.Parameter]] = {"embed": [], "head": [], "scalar": []}
        self.assignment: dict[str, str] = {}
        for name, p in model.named_parameters():
            role = roles[name]
            if role == "muon":
                names = model.matrix_names(name, p)
                if p.ndim == 2:
                    matrices.append(MatrixRef(names[0], p, None))
                else:
                    stack = p.view(-1, *p.shape[-2:])
                    if stack.size(0) != len(names):
                        names = [f"{name}.{i}" for i in range(stack.size(0))]
                    matrices.extend(MatrixRef(nm, p, i) for i, nm in enumerate(names))
                self.assignment[name] = "muon"
            else:
                adam_groups[role].append(p)
                self.assignment[name] = f"adam_{role}"
        lrs = {"embed": cfg.adam_lr_embed, "head": cfg.adam_lr_head, "scalar": cfg.adam_lr_scalar}
        groups = [{"params": ps, "lr": lrs[role], "name": role} for role, ps in adam_groups.items() if ps]
        self.muon = ShardedMuon(matrices, cfg, info)
        self.adam = AllReducedAdam(groups, cfg)
        self.model = model

    def attach_backward_hooks(self) -> None:
        self.muon.attach_backward_hooks()

    def set_sync(self, sync: bool) -> None:
        """True for the micro-batch whose backward completes this step's gradients."""
        self.muon.launch_on_ready = sync

    def step(self, lr_mul: float, momentum: float, collect_stats: bool = False, clip: float = 0.0) -> float | None:
        """One step of both; with clip > 0, first scale the averaged gradients so their global
        norm is at most clip (torch's clip_grad_norm_ rule) and return the norm before clipping.
        Clipping must see the averaged gradient, which only exists after the reductions: the
        Muon shares are already in flight from the backward hooks, so clipping p.grad on each
        rank would miss them, and each rank would clip by a different, local norm."""
        self.adam.launch_reduce()
        norm = self._clip(clip) if clip > 0 else None
        self.muon.step(lr_mul, momentum, collect_stats)
        self.adam.step(lr_mul)
        return norm

    @torch.no_grad()
    def _clip(self, clip: float) -> float:
        shares = self.muon.reduced_shares()
        flat = self.adam.reduced()  # the same on every rank
        # every real matrix is owned by exactly one rank (padding is zero): sum the squares
        muon_sq = torch.zeros(1, dtype=torch.float64, device=flat.device)
        for s in shares:
            muon_sq += s.double().square().sum()
        total = (hdist.all_reduce_sum_(muon_sq) + flat.double().square().sum()).sqrt()
        norm = float(total.item())
        coef = clip / (norm + 1e-6)
        if coef < 1.0:
            for s in shares:
                s.mul_(coef)
            flat.mul_(coef)
        return norm

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adam.load_state_dict(state["adam"])
