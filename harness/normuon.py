"""NorMuon with polar express and ORD as a plain `torch.optim.Optimizer`, for other training
scripts: the same update as the harness's sharded optimizer (harness/optim.py `muon_update`,
the fork's rules), one matrix at a time, no communication of its own (except to gather
FSDP2-sharded matrices, below).

    from harness.normuon import NorMuon

    hidden = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "head" not in n]
    rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
    opt = NorMuon(hidden, lr=0.023, momentum=0.95, weight_decay=1.2)      # the fork's values
    adam = torch.optim.AdamW(rest, lr=0.008, betas=(0.8, 0.95))
    for x, y in batches:
        model(x, y).backward()
        opt.step(); adam.step()
        opt.zero_grad(set_to_none=True); adam.zero_grad(set_to_none=True)
    # ORD as train_gpt_muon_new.py: NorMuon(hidden, ..., spectral_lr_mul=0.1)
    # FSDP2: fully_shard(model) (torch.distributed.fsdp) before the lines above; nothing else changes

Parameters of 2 or more dimensions; a tensor (k, m, n) is k matrices (m, n). Per matrix:
Nesterov momentum, ORD when spectral_lr_mul is set (rho = <G,W>/||W||^2, G_par = rho W;
Polar(G - s G_par), or Polar(G - G_par) with ord_form="projected"; s G_par added back after
NorMuon, or before with ord_placement="before_norm"), the orthogonalization, NorMuon's
per-neuron normalisation, then W -= W x mask x weight_decay x lr x lr_eff + update x lr_eff
with lr_eff = lr x max(1, rows/cols)^0.5 and mask = (update x W >= 0) when cautious_wd.
s G_par is in the gradient's own units: the fork's gradients are (B/4) x those of a mean loss
over B tokens (harness/trainer.py grad_unit), so a mean-loss script that wants the fork's s
passes grad_scale=B/4 (it scales only the added-back part, as the harness's ord_units=mean).

Data parallel (DDP): the gradients are already averaged when step() runs; every rank computes
the same update. Sharded parameters (FSDP2's `fully_shard`, or any DTensor parameter): each step
gathers the full gradient and the full weights of every matrix (`full_tensor()`, two all-gathers
of the matrix per step), computes the update exactly as one process would, and keeps this rank's
shard of the new weights. The cost: that communication, the whole orthogonalization on every
rank (not split between them), and the optimizer state (momentum, second moment) kept whole on
every rank, not sharded (float32, a bit more than one copy of each matrix). The harness's
ShardedMuon splits the orthogonalization between ranks instead.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed: no sharded parameters either
    DTensor = distribute_tensor = None

from harness.optim import MuonRule, OrdMode, muon_update


class NorMuon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.023, momentum: float = 0.95, weight_decay: float = 0.0,
                 cautious_wd: bool = True, normuon: bool = True, beta2: float = 0.95,
                 ns_method: str = "polar_express", ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 spectral_lr_mul: float | None = None, ord_form: str = "interpolated",
                 ord_placement: str = "after_norm", ord_reproject: bool = False, ord_eps: float = 1e-12,
                 grad_scale: float = 1.0):
        if not lr > 0:
            raise ValueError(f"lr={lr}: must be > 0")
        if not 0 <= momentum < 1 or not 0 <= beta2 < 1:
            raise ValueError(f"momentum={momentum}, beta2={beta2}: each must be in [0, 1)")
        if ord_form not in ("interpolated", "projected") or ord_placement not in ("after_norm", "before_norm"):
            raise ValueError(f"ord_form={ord_form!r} (interpolated|projected), ord_placement={ord_placement!r}"
                             " (after_norm|before_norm)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, cautious_wd=cautious_wd,
                        normuon=normuon, beta2=beta2, ns_method=ns_method, ns_steps=ns_steps, ns_dtype=ns_dtype,
                        spectral_lr_mul=spectral_lr_mul, ord_form=ord_form, ord_placement=ord_placement,
                        ord_reproject=ord_reproject, ord_eps=ord_eps, grad_scale=grad_scale)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"NorMuon takes matrices: a parameter of shape {tuple(p.shape)} needs Adam")

    @staticmethod
    def _rule(group: dict, device: torch.device) -> MuonRule:
        s = group["spectral_lr_mul"]
        ord_mode = None if s is None else OrdMode(group["ord_form"], "mean", group["ord_placement"],
                                                  group["ord_reproject"], group["ord_eps"])
        dtype = group["ns_dtype"] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return MuonRule(group["ns_method"], group["ns_steps"], dtype, group["normuon"], group["beta2"], ord_mode)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if DTensor is not None and isinstance(p, DTensor):
                    self._step_sharded(p, group)
                else:
                    p.copy_(self._new_weights(p.detach(), p.grad, self.state[p], group).to(p.dtype))
        return loss

    def _step_sharded(self, p, group: dict) -> None:
        """A DTensor parameter: the single-process update of the whole matrix, computed on every
        rank from the gathered gradient and weights; this rank keeps its shard of the result."""
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        new = self._new_weights(p.full_tensor(), grad, self.state[p], group).to(p.dtype)
        # every rank holds the same `new`: take the local shard without communication
        local = distribute_tensor(new, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(local)

    def _new_weights(self, weights: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """The weights after one step (float32, the parameter's shape); updates `state`."""
        lr, wd = group["lr"], group["weight_decay"]
        m, n = weights.shape[-2:]
        Wf = weights.reshape(-1, m, n).float()
        if not state:
            state["momentum_buffer"] = torch.zeros(Wf.shape, dtype=torch.float32, device=Wf.device)
            sm_shape = (Wf.size(0), m, 1) if m >= n else (Wf.size(0), 1, n)
            state["second_moment"] = torch.zeros(sm_shape, dtype=torch.float32, device=Wf.device)
        # ord_units "mean" divides the added-back part by unit_scale: 1 / grad_scale multiplies it
        parts = muon_update(grad.reshape(-1, m, n).float(), Wf, state["momentum_buffer"], state["second_moment"],
                            group["momentum"], self._rule(group, Wf.device), group["spectral_lr_mul"] or 0.0,
                            1.0 / group["grad_scale"])
        lr_eff = lr * max(1.0, m / n) ** 0.5
        update = parts.update
        if wd > 0:
            mask = (update * Wf >= 0) if group["cautious_wd"] else torch.ones_like(Wf, dtype=torch.bool)
            new = Wf - Wf * mask * (wd * lr) * lr_eff - update * lr_eff
        else:
            new = Wf - update * lr_eff
        return new.view(weights.shape)
