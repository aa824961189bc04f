"""A modern GPT as in modded-nanogpt's records.

RoPE, RMS-normed queries and keys, ReLU² MLP, untied embedding and zero-initialised head, logit
soft-cap, value embeddings mixed into the attention values of the first and last layers, and
U-net skip connections from the first half of the blocks to the second; each is switchable.
Attention is causal with an optional sliding window: FlexAttention on CUDA (it has no backward
on CPU), scaled_dot_product_attention elsewhere.

The attention's q, k and v weights are one (3, d, d) parameter: a stack of matrices that Muon
orthogonalizes one matrix at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.config import Config
from harness.fused_loss import softcapped_cross_entropy
from harness.params import MatrixSpec, ParamSpec


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    mlp_ratio: int
    window_size: int
    rope: bool
    rope_base: float
    qk_norm: bool
    logit_softcap: float
    value_embeds: bool
    unet_skips: bool

    @classmethod
    def from_config(cls, cfg: Config) -> "ModelShape":
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cache = (seq_len, device, freqs.cos(), freqs.sin())
        _, _, cos, sin = self._cache
        return cos[:seq_len], sin[:seq_len]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, H, D); rotate pairs (first half, second half) of the head dimension
        cos, sin = self.cos_sin(x.size(1), x.device)
        cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def _flex_attention(q, k, v, window: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = q.size(-2)

    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        if window > 0:
            return causal & (q_idx - kv_idx < window)
        return causal

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask)


def _sdpa_attention(q, k, v, window: int):
    if window <= 0 or window >= q.size(-2):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.size(-2)
    i = torch.arange(T, device=q.device)
    mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        d = shape.model_dim
        self.shape = shape
        self.qkv = nn.Parameter(torch.empty(3, d, d))  # stack of q, k, v weights (out, in)
        self.proj = nn.Linear(d, d, bias=False)
        self.rotary = Rotary(shape.head_dim, shape.rope_base) if shape.rope else None
        # mixing of the value with the layer's value embedding (when it has one)
        self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))
        self.attn_impl = "sdpa"

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        B, T, d = x.shape
        H, D = self.shape.num_heads, self.shape.head_dim
        q, k, v = F.linear(x, self.qkv.flatten(0, 1).type_as(x)).view(B, T, 3, H, D).unbind(2)
        if self.shape.qk_norm:
            q, k = norm(q), norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        if ve is not None:
            v = self.value_lambdas[0] * v + self.value_lambdas[1] * ve.view_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        attend = _flex_attention if self.attn_impl == "flex" else _sdpa_attention
        y = attend(q, k, v, self.shape.window_size)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        d, h = shape.model_dim, shape.mlp_ratio * shape.model_dim
        self.fc = nn.Linear(d, h, bias=False)
        self.proj = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.attn = CausalSelfAttention(shape)
        self.mlp = MLP(shape)
        # residual mixing with the embedding output x0 (modded-nanogpt's per-block lambdas)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: torch.Tensor, x0: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(norm(x), ve)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        L, d = shape.num_layers, shape.model_dim
        self.embed = nn.Embedding(shape.vocab_size, d)
        # value embeddings: layer i < k uses ve[i], layer L-k+j uses ve[j] (a U shape)
        self.n_value_embeds = min(3, L // 2) if shape.value_embeds else 0
        self.value_embeds = nn.ModuleList(nn.Embedding(shape.vocab_size, d) for _ in range(self.n_value_embeds))
        self.blocks = nn.ModuleList(Block(shape) for _ in range(L))
        self.n_skips = L // 2 if shape.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(max(self.n_skips, 1)))
        self.lm_head = nn.Linear(d, shape.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.shape.model_dim
        bound = math.sqrt(3.0) * 0.5 * d**-0.5  # uniform with std 0.5/sqrt(d), as modded-nanogpt
        for block in self.blocks:
            block.attn.qkv.uniform_(-bound, bound)
            block.attn.proj.weight.zero_()  # zero-init output projections: each block starts as identity
            block.mlp.fc.weight.uniform_(-bound, bound)
            block.mlp.proj.weight.zero_()
        nn.init.normal_(self.embed.weight, std=1.0)
        for ve in self.value_embeds:
            nn.init.normal_(ve.weight, std=1.0)
        self.lm_head.weight.zero_()

    def set_attention(self, impl: str) -> None:
        if impl not in ("sdpa", "flex"):
            raise ValueError(f"unknown attention implementation {impl!r}")
        for block in self.blocks:
            block.attn.attn_impl = impl

    def _value_embed_for_layers(self, idx: torch.Tensor) -> list[torch.Tensor | None]:
        L, k = self.shape.num_layers, self.n_value_embeds
        ves = [ve(idx) for ve in self.value_embeds]
        out: list[torch.Tensor | None] = [None] * L
        for j in range(k):
            out[j] = ves[j]
            out[L - k + j] = ves[j]
        return out

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The normed last hidden states, the head's input."""
        x = x0 = norm(self.embed(idx))
        ves = self._value_embed_for_layers(idx)
        skips: list[torch.Tensor] = []
        L = self.shape.num_layers
        for i, block in enumerate(self.blocks):
            if self.n_skips and i >= L - self.n_skips:
                x = x + self.skip_weights[L - 1 - i] * skips.pop()
            x = block(x, x0, ves[i])
            if self.n_skips and i < self.n_skips:
                skips.append(x)
        return norm(x)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.hidden(idx)).float()
        cap = self.shape.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            # on CPU the head's (tokens x vocab) copies cost more than its matmuls: fused chunks
            return softcapped_cross_entropy(self.hidden(idx), self.lm_head.weight, targets, self.shape.logit_softcap)
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    # --- parameter roles, for the optimizers and diagnostics ------------------------------
    def matrix_names(self, name: str, param: nn.Parameter) -> list[str]:
        """Names of the matrices in a Muon parameter (a 3D stack has several)."""
        if name.endswith("attn.qkv"):
            return [f"{name}.{part}" for part in "qkv"]
        return [name]

    def param_roles(self) -> dict[str, str]:
        """name -> muon | embed | head | scalar."""
        roles = {}
        for name, p in self.named_parameters():
            if name.startswith("embed.") or name.startswith("value_embeds."):
                roles[name] = "embed"
            elif name.startswith("lm_head."):
                roles[name] = "head"
            elif p.ndim >= 2:
                roles[name] = "muon"
            else:
                roles[name] = "scalar"
        return roles

    def param_specs(self) -> list[ParamSpec]:
        """The parameter table (harness/params.py), with the fork's labels. Matrix names are
        those of matrix_names(); every matrix is (out, in) as the forward uses it."""
        d = self.shape.model_dim
        specs = []
        for name, p in self.named_parameters():
            if name.startswith("embed."):
                specs.append(ParamSpec(name, "embed"))
            elif name.startswith("value_embeds."):
                specs.append(ParamSpec(name, "value_embed"))
            elif name.startswith("lm_head."):
                specs.append(ParamSpec(name, "lm_head"))
            elif name.endswith("attn.qkv"):
                mats = tuple(MatrixSpec(n, f"attn_{n[-1]}") for n in self.matrix_names(name, p))
                specs.append(ParamSpec(name, "attn", (d, d), mats))
            elif name.endswith("attn.proj.weight"):
                specs.append(ParamSpec(name, "attn", tuple(p.shape), (MatrixSpec(name, "attn_o"),)))
            elif name.endswith("mlp.fc.weight"):
                specs.append(ParamSpec(name, "mlp", tuple(p.shape), (MatrixSpec(name, "mlp_fc"),)))
            elif name.endswith("mlp.proj.weight"):
                specs.append(ParamSpec(name, "mlp", tuple(p.shape), (MatrixSpec(name, "mlp_proj"),)))
            elif p.ndim < 2:
                specs.append(ParamSpec(name, "scalars"))
            else:
                raise ValueError(f"GPT.param_specs: parameter {name} {tuple(p.shape)} has no label")
        return specs
