"""AdamW on every parameter, as nanoGPT trains GPT-2: the optimizer of `--optimizer adamw` (the
classic preset), with the interface the trainer drives (harness.optim.Optimizers').

nanoGPT's rules: weight decay on every tensor of two or more dimensions (matrices and
embeddings), none on biases and norm gains; one learning rate for all; the global gradient norm
clipped (grad_clip); torch's AdamW (decoupled decay lr x wd). Betas come from adam_overrides'
`*.beta1` / `*.beta2`, eps from adam_eps, the LR from adam_lr x the schedule's multiplier.

Gradients: the trainer backpropagates (B/4) x the mean loss (the fork's units, harness/optim.py);
here they are averaged over ranks in one flat all-reduce and divided back to the mean loss's
gradient, so grad_clip and eps mean what they mean in nanoGPT.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from harness import dist as hdist
from harness.config import Config


def adamw_betas(cfg: Config) -> tuple[float, float]:
    return (float(cfg.adam_overrides.get("*.beta1", 0.9)), float(cfg.adam_overrides.get("*.beta2", 0.95)))


class DataParallelAdamW:
    """torch.optim.AdamW over the model, gradients all-reduced in one flat buffer per step."""

    def __init__(self, model: nn.Module, cfg: Config, info: hdist.DistInfo):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # nanoGPT's split: matrices and embeddings decay, biases and norm gains do not
        self.assignment = {n: "adamw_decay" if p.dim() >= 2 else "adamw_no_decay" for n, p in named}
        decay = [p for n, p in named if self.assignment[n] == "adamw_decay"]
        no_decay = [p for n, p in named if self.assignment[n] == "adamw_no_decay"]
        self.cfg = cfg
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.adam_wd}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.adam_lr, betas=adamw_betas(cfg), eps=cfg.adam_eps, foreach=True)

    def attach_backward_hooks(self) -> None:
        """Nothing to overlap: one all-reduce after the backward (the CPU baseline's path)."""

    def set_sync(self, sync: bool) -> None:
        pass

    @torch.no_grad()
    def step(self, step: int, lr_mul: float, momentum: float, unit_scale: float = 1.0,
             collect_stats: bool = False, clip: float = 0.0) -> tuple[float | None, dict[str, dict[str, float]]]:
        """One AdamW step at adam_lr x lr_mul (momentum is Muon's and unused here). Returns (the
        gradient norm before clipping when clip > 0, else None; no ORD statistics)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        hdist.all_reduce_mean_(flat)
        flat.div_(unit_scale)  # back to the mean loss's gradient
        norm = None
        if clip > 0:
            norm = float(flat.double().norm().item())
            coef = clip / (norm + 1e-6)
            if coef < 1.0:
                flat.mul_(coef)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
            offset += n
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.adam_lr * lr_mul
        self.opt.step()
        return norm, {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"adamw": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "adamw" not in state:
            raise ValueError("the checkpoint's optimizer state is not AdamW's (optimizer=adamw): it was saved"
                             " by another optimizer")
        self.opt.load_state_dict(state["adamw"])
