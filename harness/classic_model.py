"""The classic GPT-2 baseline (nanoGPT's model): the reference the CPU presets are measured against.

Learned absolute positions, pre-LayerNorm blocks with biases, GELU MLP, causal attention over the
whole sequence, a final LayerNorm and a head tied to the token embedding; weights N(0, 0.02) with
the residual output projections at 0.02 / sqrt(2 x layers), biases zero (GPT-2's initialisation,
as nanoGPT's `model.py`). No dropout (nanoGPT's pretraining default). It is trained by
harness.adamw (AdamW, warm-up + cosine decay) through the same trainer, loader and run log as
the modern model, so `--preset classic` is the "Adam baseline" of the CPU studies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.config import Config


@dataclass(frozen=True)
class ClassicShape:
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    mlp_ratio: int
    seq_len: int  # the block size: rows of the position table

    @classmethod
    def from_config(cls, cfg: Config) -> "ClassicShape":
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


class ClassicAttention(nn.Module):
    def __init__(self, shape: ClassicShape):
        super().__init__()
        d = shape.model_dim
        self.num_heads = shape.num_heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d))


class ClassicMLP(nn.Module):
    def __init__(self, shape: ClassicShape):
        super().__init__()
        d = shape.model_dim
        self.c_fc = nn.Linear(d, shape.mlp_ratio * d)
        self.c_proj = nn.Linear(shape.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ClassicBlock(nn.Module):
    def __init__(self, shape: ClassicShape):
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.model_dim)
        self.attn = ClassicAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.model_dim)
        self.mlp = ClassicMLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClassicGPT(nn.Module):
    def __init__(self, shape: ClassicShape):
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.vocab_size, shape.model_dim)
        self.wpe = nn.Embedding(shape.seq_len, shape.model_dim)
        self.blocks = nn.ModuleList(ClassicBlock(shape) for _ in range(shape.num_layers))
        self.ln_f = nn.LayerNorm(shape.model_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0)
            elif name.endswith("c_proj.weight"):  # residual projections, GPT-2's scaled init
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.shape.num_layers))
            else:
                p.normal_(0.0, 0.02)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.shape.seq_len:
            raise ValueError(f"ClassicGPT: sequence of {T} tokens, longer than its {self.shape.seq_len} positions")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight).float()  # the head is the embedding

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
