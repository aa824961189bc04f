"""The fork's GPT (the fork's train_gpt.py, upstream modded-nanogpt fea4873; docs/REFERENCE.md), CPU-capable.

What it is, in the fork's terms (figures from its code; the code here is ours):
- 11 layers; layer 6 has no attention; every layer has a ReLU² MLP (hidden 4*dim).
- Attention: q, k, v from one (4*dim, dim) matrix per attention layer (q, k, v, o rows), QK RMS
  norm, half-truncated RoPE with base-frequency 1/1024 and YaRN rescaling on window change,
  softmax scale 0.1 (YaRN-adjusted), causal, masked to documents (cumulative lengths) and a
  sliding window: short on most layers, long on layers 3 and 10 (`i - j <= window`, FA3's
  `window_size=(w, 0)`). Long-window layers shift the keys' non-rotated half forward by one
  position (key offset). Paired-head layers (0, 2, 5, 9) interleave each pair of heads into one
  sequence of twice the length (positions 2t and 2t+1), so a query sees its partner's keys.
  An output gate per head from the first 12 channels of the input.
- Five zero-initialised value embeddings (one (5*V, dim) table) on layers 0, 1 and the last
  three (the "01...234" pattern), each with a per-head gate 2*sigmoid(...).
- Embedding smeared one position forward through a gate; a bigram hash embedding added to the
  residual of every layer; per-layer residual, x0 and bigram lambdas; a skip from layer 3 into
  layer 6 through a gate; "backout" of the layer-7 stream before the head.
- Head stored (dim, vocab) (the fork's CastedLinearT), N(0, 0.005); the embedding starts as
  head.T. Tying (embed = head.T and summed gradients until the split step) is the optimizer's
  job: `tied_embed_head()` names the pair.
- Logits soft-capped with 23*sigmoid((z+5)/7.5). Training loss: SUM over positions of the
  multi-token-prediction weighted CE (weight k on the target k positions ahead); evaluation:
  mean CE of the next token.

Attention runs with scaled_dot_product_attention and an explicit boolean mask on CPU, and with
FlexAttention block masks on CUDA (no FA3 needed). Every part is a switch in SpeedrunFeatures so a
test can turn one off. Precision facts kept from the fork: RoPE tables are bf16 and the gate
banks enter the forward as bf16 (whatever the activation dtype).

Inputs are one packed stream (B = 1): input ids (T,), targets (T,), cumulative document lengths
(padded with T), bigram hash ids (T,), and a ForwardArgs with the MTP weights and the two window
sizes in tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.params import MatrixSpec, ParamSpec

SOFTCAP_A, SOFTCAP_B, SOFTCAP_C = 23.0, 5.0, 7.5  # 23*sigmoid((z+5)/7.5)
GATE_CHANNELS = 12  # the gates read the first 12 channels of their input
FP8_SCALES = dict(x_s=100 / 448, w_s=1.6 / 448, grad_s=0.75 / 448)  # the fork's head FP8 scales (grad_s x grad_scale)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def next_multiple(v: int, n: int) -> int:
    return -(-v // n) * n


def softcap(logits: torch.Tensor) -> torch.Tensor:
    return SOFTCAP_A * torch.sigmoid((logits + SOFTCAP_B) / SOFTCAP_C)


@dataclass(frozen=True)
class SpeedrunFeatures:
    """Each of the fork's parts, switchable (all on = the fork)."""

    doc_mask: bool = True  # attention stays within a document
    sliding_window: bool = True  # off: full causal attention (within documents)
    attnless_layer: bool = True  # the layout's attention-less layer (fork: 6); off: it gets short-window attention
    paired_heads: bool = True
    rope: bool = True
    yarn: bool = True  # RoPE frequencies and attention scale follow window changes
    key_offset: bool = True
    attn_gate: bool = True
    value_embeds: bool = True
    ve_gate: bool = True  # off: value embeddings added with weight 1
    smear: bool = True
    bigram: bool = True
    skip: bool = True  # the gated skip from skip_from into skip_to
    backout: bool = True
    x0_lambdas: bool = True
    mtp: bool = True  # off: only the first MTP weight (next-token loss)
    softcap: bool = True
    fp8_head: bool = False  # CUDA + training only (the fork's default on H100); bf16/fp32 elsewhere


@dataclass(frozen=True)
class SpeedrunLayout:
    """Which layer does what. `windows[i]` is "short", "long" or None (no attention)."""

    windows: tuple[str | None, ...]
    paired: tuple[int, ...]
    ve_layers: tuple[int, ...]  # ve_layers[j] = the layer that uses value embedding j
    skip_from: int
    skip_to: int
    backout_layer: int

    @property
    def num_layers(self) -> int:
        return len(self.windows)

    @classmethod
    def for_layers(cls, num_layers: int) -> "SpeedrunLayout":
        """The fork's layout. It is tuned for 11 layers, and its skip (3 -> 6, into the
        attention-less layer), backout (7) and 01...234 value embeddings do not scale down in any
        canonical way, so other depths must pass an explicit layout."""
        if num_layers != 11:
            raise ValueError(f"speedrun model: num_layers={num_layers} has no built-in layer layout; allowed: 11 "
                             "(the fork's), or pass layout=SpeedrunLayout(...) for another depth")
        s, L = "short", "long"
        return cls(windows=(s, s, s, L, s, s, None, s, s, s, L), paired=(0, 2, 5, 9),
                   ve_layers=(0, 1, 8, 9, 10), skip_from=3, skip_to=6, backout_layer=7)

    def validate(self) -> None:
        n = self.num_layers
        where = "speedrun layout"
        for w in self.windows:
            if w not in ("short", "long", None):
                raise ValueError(f"{where}: window {w!r} is invalid; allowed: 'short', 'long', None")
        for name, idx in (("paired", self.paired), ("ve_layers", self.ve_layers)):
            if any(not 0 <= i < n for i in idx) or len(set(idx)) != len(idx):
                raise ValueError(f"{where}: {name}={idx} must be distinct layer indices in [0, {n})")
        if len(self.ve_layers) != 5:
            raise ValueError(f"{where}: ve_layers={self.ve_layers} must name 5 layers (the fork's 5 value embeddings)")
        for name in ("skip_from", "skip_to", "backout_layer"):
            if not 0 <= getattr(self, name) < n:
                raise ValueError(f"{where}: {name}={getattr(self, name)} must be in [0, {n})")
        if not self.skip_from < self.skip_to:
            raise ValueError(f"{where}: skip_from={self.skip_from} must be < skip_to={self.skip_to}")
        if any(self.windows[i] is None for i in self.paired):
            raise ValueError(f"{where}: paired={self.paired} names an attention-less layer")
        if any(self.windows[i] is None for i in self.ve_layers):
            raise ValueError(f"{where}: ve_layers={self.ve_layers} names an attention-less layer")


@dataclass
class ForwardArgs:
    """Per-forward schedule inputs (the fork's ForwardScheduleConfig): windows in tokens."""

    mtp_weights: torch.Tensor
    ws_short: int
    ws_long: int


# ------------------------------------------------------------------------------------------
# RoPE with YaRN (the fork's Yarn semantics)


class YarnRope(nn.Module):
    """Half-truncated RoPE: head_dim/4 frequencies (1/1024)^linspace(0, 1), each used by an
    adjacent pair of channels; the second half of the head is not rotated. `paired`: the table
    row t holds positions 2t (first head_dim) and 2t+1 (second), for interleaved head pairs.
    Tables are bf16 as the fork's; `apply(old, new)` is YaRN: frequencies that turn less than
    alpha times over the old window are scaled by old/new, those over beta are kept, linear in
    between, and the softmax scale grows by 0.2*log(new/old)+1."""

    def __init__(self, head_dim: int, max_seq_len: int, paired: bool = False):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"speedrun model: head_dim={head_dim} must be a multiple of 4 (half-truncated RoPE pairs)")
        self.head_dim, self.max_seq_len, self.paired = head_dim, max_seq_len, paired
        self.register_buffer("factor1", torch.empty(0), persistent=False)
        self.register_buffer("factor2", torch.empty(0), persistent=False)
        self.register_buffer("angular_freq", torch.empty(0), persistent=False)
        self.reset()

    def reset(self) -> None:
        dev = self.factor1.device
        f = (1 / 1024) ** torch.linspace(0, 1, steps=self.head_dim // 4, dtype=torch.float32, device=dev)
        f = torch.cat([f.repeat_interleave(2), f.new_zeros(self.head_dim // 2)])
        if self.angular_freq.shape == f.shape:
            self.angular_freq.copy_(f)
        else:
            self.angular_freq = f
        self._fill()
        self.attn_scale = 0.1

    def _fill(self) -> None:
        t = torch.arange(2 * self.max_seq_len, dtype=torch.float32, device=self.angular_freq.device)
        if self.paired:
            th1, th2 = torch.outer(2 * t, self.angular_freq), torch.outer(2 * t + 1, self.angular_freq)
            cos, sin = torch.cat((th1.cos(), th2.cos()), -1), torch.cat((th1.sin(), th2.sin()), -1)
        else:
            theta = torch.outer(t, self.angular_freq)
            cos, sin = theta.cos(), theta.sin()
        sin[..., 1::2] *= -1  # odd channel of a pair gets -sin: (a, b) -> (a cos + b sin, b cos - a sin)
        if self.factor1.shape == cos.shape:  # in place, as the fork: a compiled graph keeps its buffers
            self.factor1.copy_(cos)
            self.factor2.copy_(sin)
        else:
            self.factor1 = cos.to(torch.bfloat16)
            self.factor2 = sin.to(torch.bfloat16)

    def apply(self, old_window: int, new_window: int, alpha: float = 1, beta: float = 32) -> None:
        rotations = old_window * self.angular_freq / (2 * torch.pi)
        scaling = old_window / new_window
        ramp = torch.clamp((rotations - alpha) / (beta - alpha), 0, 1)
        self.angular_freq.mul_(scaling + ramp * (1 - scaling))
        self._fill()
        self.attn_scale *= 0.2 * math.log(new_window / old_window) + 1

    def rotary(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, H, D); positions are those of the packed stream (only differences matter)
        T = x.size(-3)
        if T > self.factor1.size(0):
            raise ValueError(f"speedrun model: sequence of {T} tokens exceeds the RoPE table "
                             f"({self.factor1.size(0)} = 2 x max_seq_len)")
        c, s = self.factor1[None, :T, None, :], self.factor2[None, :T, None, :]
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return c * x + s * swapped


# ------------------------------------------------------------------------------------------
# Attention masks


def document_ids(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """Document index of each of T positions from cumulative lengths [0, c1, c2, ..., T, T]."""
    pos = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens.contiguous(), pos, right=True)


def attention_mask(doc: torch.Tensor | None, T: int, window: int | None, device) -> torch.Tensor:
    """(T, T) boolean: query i may see key j (causal, same document, i - j <= window)."""
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    mask = d >= 0
    if window is not None:
        mask &= d <= window
    if doc is not None:
        mask &= doc[:, None] == doc[None, :]
    return mask


def block_mask(doc: torch.Tensor | None, T: int, window: int | None, device):
    """The same mask as a FlexAttention BlockMask (CUDA): blocks wholly outside it are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        m = qi >= ki
        if window is not None:
            m = m & (qi - ki <= window)
        if doc is not None:
            m = m & (doc[qi] == doc[ki])
        return m

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def _sdpa(q, k, v, mask, scale):
    # q, k, v: (T, H, D) -> (T, H, D); mask: (T, T) boolean
    y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=mask, scale=scale)
    return y.transpose(0, 1)


def _flex(q, k, v, mask, scale):
    from torch.nn.attention.flex_attention import flex_attention

    y = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=mask, scale=scale)
    return y[0].transpose(0, 1)


class _Masks:
    """The attention masks of one forward, built once per (window, paired) and shared by layers."""

    def __init__(self, doc: torch.Tensor | None, T: int, device: torch.device):
        self.doc, self.T, self.device = doc, T, device
        self.cuda = device.type == "cuda"
        self.cache: dict = {}

    def get(self, window: int | None, paired: bool):
        key = (window, paired)
        if key not in self.cache:
            doc, T = self.doc, self.T
            if paired:  # head pairs interleaved: position 2t and 2t+1 are token t
                doc = None if doc is None else doc.repeat_interleave(2)
                T = 2 * T
            build = block_mask if self.cuda else attention_mask
            self.cache[key] = build(doc, T, window, self.device)
        return self.cache[key]


# ------------------------------------------------------------------------------------------
# FP8 head (CUDA only)


class _FP8HeadMatmul(torch.autograd.Function):
    """x @ w with x, w and the output gradient cast to float8 with the fork's fixed scales."""

    @staticmethod
    def forward(ctx, x, w, x_s, w_s, grad_s):
        x8 = (x / x_s).to(torch.float8_e4m3fn)
        w8 = (w / w_s).to(torch.float8_e4m3fn)
        one = torch.ones((), device=x.device, dtype=torch.float32)
        out = torch._scaled_mm(x8, w8.T.contiguous().T, out_dtype=torch.bfloat16,
                               scale_a=one * x_s, scale_b=one * w_s, use_fast_accum=True)
        ctx.save_for_backward(x8, w8)
        ctx.scales = (x_s, w_s, grad_s)
        return out

    @staticmethod
    def backward(ctx, g):
        x8, w8 = ctx.saved_tensors
        x_s, w_s, grad_s = ctx.scales
        g8 = (g / grad_s).to(torch.float8_e5m2)
        one = torch.ones((), device=g.device, dtype=torch.float32)
        gx = torch._scaled_mm(g8, w8.T, out_dtype=torch.bfloat16, scale_a=one * grad_s, scale_b=one * w_s,
                              use_fast_accum=False)
        gw = torch._scaled_mm(x8.T.contiguous(), g8.T.contiguous().T, out_dtype=torch.float32,
                              scale_a=one * x_s, scale_b=one * grad_s, use_fast_accum=False)
        return gx, gw, None, None, None


# ------------------------------------------------------------------------------------------
# The model


class SpeedrunGPT(nn.Module):
    def __init__(self, vocab_size: int = 50257, num_layers: int = 11, model_dim: int = 768, num_heads: int = 6,
                 head_dim: int = 128, bigram_vocab_size: int = 50304 * 5, max_seq_len: int = 2048,
                 features: SpeedrunFeatures = SpeedrunFeatures(), layout: SpeedrunLayout | None = None,
                 scalars_pad_world_size: int = 1, grad_scale: float = 1.0):
        super().__init__()
        layout = layout or SpeedrunLayout.for_layers(num_layers)
        layout.validate()
        if layout.num_layers != num_layers:
            raise ValueError(f"speedrun model: layout has {layout.num_layers} layers, num_layers={num_layers}")
        if num_heads * head_dim != model_dim:
            raise ValueError(f"speedrun model: num_heads x head_dim = {num_heads} x {head_dim} must equal "
                             f"model_dim={model_dim}")
        if model_dim < GATE_CHANNELS:
            raise ValueError(f"speedrun model: model_dim={model_dim} must be >= {GATE_CHANNELS} (gate inputs)")
        if features.paired_heads and layout.paired and num_heads % 2:
            raise ValueError(f"speedrun model: num_heads={num_heads} must be even for paired-head layers")
        if bigram_vocab_size < 2:
            raise ValueError(f"speedrun model: bigram_vocab_size={bigram_vocab_size} must be >= 2")
        self.features, self.layout = features, layout
        self.num_layers, self.model_dim, self.num_heads, self.head_dim = num_layers, model_dim, num_heads, head_dim
        self.vocab_size = next_multiple(vocab_size, 128)
        self.bigram_vocab_size = bigram_vocab_size
        self.grad_scale = grad_scale  # the FP8 head's gradient scale follows the trainer's loss scale
        d, V = model_dim, self.vocab_size

        windows = list(layout.windows)
        if not features.attnless_layer:
            windows = [w or "short" for w in windows]
        self.windows = windows
        self.attn_layers = [i for i, w in enumerate(windows) if w is not None]
        self.layer_to_attn = {layer: j for j, layer in enumerate(self.attn_layers)}
        self.layer_to_ve = {layer: j for j, layer in enumerate(layout.ve_layers)}

        self.smear_gate = nn.Linear(GATE_CHANNELS, 1, bias=False)
        self.skip_gate = nn.Linear(GATE_CHANNELS, 1, bias=False)
        self.value_embeds = nn.Parameter(torch.zeros(5 * V, d))
        self.attn_gate_bank = nn.Parameter(torch.zeros(len(self.attn_layers), num_heads, GATE_CHANNELS))
        self.ve_gate_bank = nn.Parameter(torch.zeros(5, num_heads, GATE_CHANNELS))
        # (attention layers, 4*dim, dim): rows q, k, v, o; each (dim, dim) block is (out, in)
        self.attn_bank = nn.Parameter(torch.empty(len(self.attn_layers), 4 * d, d))
        # (layers + 1 padding, 2, 4*dim, dim): [c_fc (out, in), c_proj stored (in, out)];
        # the padding layer keeps the fork's even split of 24 matrices over 8 ranks
        self.mlp_bank = nn.Parameter(torch.empty(num_layers + 1, 2, 4 * d, d))
        self.lm_head = nn.Parameter(torch.empty(d, V))  # (in, out): the fork's CastedLinearT
        self.embed = nn.Embedding(V, d)
        self.bigram_embed = nn.Embedding(bigram_vocab_size, d)
        self.x0_lambdas = nn.Parameter(torch.zeros(num_layers))
        L = num_layers
        pad = (-L * 3 - 3) % scalars_pad_world_size  # the fork's formula, kept for its layout
        self.scalars = nn.Parameter(torch.cat([
            1.1 * torch.ones(L),  # resid lambdas
            torch.tensor([0.5, 1.0]).repeat(L),  # sa lambdas: (qkv, o) per layer
            0.1 * torch.ones(L),  # bigram lambdas
            torch.zeros(1),  # smear lambda
            0.5 * torch.ones(1),  # backout lambda
            -1.5 * torch.ones(1),  # skip lambda: sigmoid(-1.5) ~ 0.18
            torch.ones(pad),
        ]))
        self.yarn = YarnRope(head_dim, max_seq_len)
        self.yarn_paired = YarnRope(head_dim, max_seq_len, paired=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.model_dim
        bound = math.sqrt(3.0) * 0.5 * d ** -0.5  # uniform with std 0.5/sqrt(d)
        self.attn_bank.uniform_(-bound, bound)
        self.mlp_bank[:, 0].uniform_(-bound, bound)
        self.mlp_bank[:, 1].zero_()
        nn.init.normal_(self.lm_head, mean=0.0, std=0.005)
        self.embed.weight.copy_(self.lm_head.T)
        for p in (self.smear_gate.weight, self.skip_gate.weight, self.value_embeds, self.attn_gate_bank,
                  self.ve_gate_bank, self.bigram_embed.weight, self.x0_lambdas):
            p.zero_()

    # --- schedule hooks -------------------------------------------------------------------
    def reset_rope(self) -> None:
        self.yarn.reset()
        self.yarn_paired.reset()

    def apply_window_change(self, old_window: int, new_window: int) -> None:
        """YaRN on both RoPE tables when the long window changes (the fork's advance_schedule)."""
        if self.features.yarn and new_window != old_window:
            self.yarn.apply(old_window, new_window)
            self.yarn_paired.apply(old_window, new_window)

    def tied_embed_head(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(embed (V, d), head (d, V)): tied as embed = head.T until the split step. The optimizer
        adds embed.grad.T into the head's gradient, steps the head, and copies head.T to embed."""
        return self.embed.weight, self.lm_head

    # --- forward --------------------------------------------------------------------------
    def _attention(self, i: int, x: torch.Tensor, ve: torch.Tensor | None, masks: _Masks,
                   window: int | None, w: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
        feats = self.features
        T, H, D, d = x.size(1), self.num_heads, self.head_dim, self.model_dim
        q, k, v = F.linear(x, sa[0] * w[:3 * d].type_as(x)).view(1, T, 3 * H, D).chunk(3, dim=-2)
        q, k = norm(q), norm(k)
        paired = feats.paired_heads and i in self.layout.paired
        yarn = self.yarn_paired if paired else self.yarn
        gate_x = x[..., :GATE_CHANNELS]
        ve_gate = None
        if ve is not None:
            ve_gate = (2 * torch.sigmoid(F.linear(gate_x, self.ve_gate_bank[self.layer_to_ve[i]].bfloat16().type_as(x)))
                       if feats.ve_gate else torch.ones(1, T, H, device=x.device, dtype=x.dtype))
        if not paired:
            if feats.rope:
                q, k = yarn.rotary(q), yarn.rotary(k)
            if feats.key_offset and self.windows[i] == "long":
                # keys' non-rotated half shifted one position forward: 1-layer induction heads
                k = torch.cat([k[:, :1], torch.cat([k[:, 1:, :, :D // 2], k[:, :-1, :, D // 2:]], -1)], 1)
            if ve is not None:
                v = v + ve_gate.view(1, T, H, 1) * ve.view_as(v)
            n_pos = T
        else:
            # a head pair becomes one head over 2T positions: token t's heads at 2t and 2t+1
            q = q.reshape(1, T, H // 2, 2 * D)
            k = k.reshape(1, T, H // 2, 2 * D)
            if feats.rope:
                q, k = yarn.rotary(q), yarn.rotary(k)
            q, k = q.reshape(1, 2 * T, H // 2, D), k.reshape(1, 2 * T, H // 2, D)
            v = v.reshape(1, 2 * T, H // 2, D)
            if ve is not None:
                v = v + ve_gate.view(1, 2 * T, H // 2, 1) * ve.view_as(v)
            n_pos = 2 * T
        scale = yarn.attn_scale
        q, k = q.type_as(v), k.type_as(v)  # one dtype for the attention kernel (RoPE tables are bf16)
        attend = _flex if x.is_cuda else _sdpa
        y = attend(q[0], k[0], v[0], masks.get(window, paired), scale).reshape(1, T, H, D)
        assert q.size(1) == n_pos
        if feats.attn_gate:
            g = F.linear(gate_x, self.attn_gate_bank[self.layer_to_attn[i]].bfloat16().type_as(x))
            y = y * torch.sigmoid(g).view(1, T, H, 1)
        y = y.reshape(1, T, d)
        return F.linear(y, sa[1] * w[3 * d:].type_as(y))

    def _mlp(self, x: torch.Tensor, c_fc: torch.Tensor, c_proj: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ c_fc.type_as(x).T).square() @ c_proj.type_as(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        w = self.lm_head
        if self.features.fp8_head and self.training and x.is_cuda:
            s = FP8_SCALES
            flat = x.flatten(0, -2).bfloat16()
            out = _FP8HeadMatmul.apply(flat, w.bfloat16(), s["x_s"], s["w_s"], s["grad_s"] * self.grad_scale)
            return out.view(*x.shape[:-1], -1)
        return x @ w.type_as(x)

    def forward(self, input_seq: torch.Tensor, target_seq: torch.Tensor, cu_seqlens: torch.Tensor,
                bigram_seq: torch.Tensor, fwd: ForwardArgs) -> torch.Tensor:
        if input_seq.ndim != 1:
            raise ValueError(f"speedrun model: input_seq must be one packed stream (T,), got shape "
                             f"{tuple(input_seq.shape)}")
        feats, lay = self.features, self.layout
        L, T = self.num_layers, input_seq.size(0)
        sc = self.scalars
        resid, sa_l, bigram_l = sc[:L], sc[L:3 * L].view(-1, 2), sc[3 * L:4 * L]
        smear_l, backout_l, skip_l = sc[4 * L], sc[4 * L + 1], sc[4 * L + 2]
        sizes = {"short": fwd.ws_short, "long": fwd.ws_long}
        masks = _Masks(document_ids(cu_seqlens, T) if feats.doc_mask else None, T, input_seq.device)

        x = self.embed(input_seq)
        if feats.smear:
            g = smear_l * torch.sigmoid(self.smear_gate(x[1:, :GATE_CHANNELS]))
            x = torch.cat([x[:1], x[1:] + g * x[:-1]])
        x = x0 = norm(x[None])
        x0_bigram = self.bigram_embed(bigram_seq)[None] if feats.bigram else None
        ve_all = self.value_embeds.view(5, self.vocab_size, -1)[:, input_seq] if feats.value_embeds else None

        skip, x_backout = None, None
        for i in range(L):
            if feats.skip and i == lay.skip_to:
                gate = torch.sigmoid(skip_l) * 2 * torch.sigmoid(self.skip_gate(x0[..., :GATE_CHANNELS]))
                x = x + gate * skip
            x0_l = self.x0_lambdas[i] if feats.x0_lambdas else 0.0
            if i == 0:
                x = (resid[0] + x0_l) * x  # x is x0 here
            else:
                x = resid[i] * x + x0_l * x0
            if x0_bigram is not None:
                x = x + bigram_l[i] * x0_bigram
            if self.windows[i] is not None:
                ve = ve_all[self.layer_to_ve[i]] if ve_all is not None and i in self.layer_to_ve else None
                window = sizes[self.windows[i]] if feats.sliding_window else None
                x = x + self._attention(i, norm(x), ve, masks, window, self.attn_bank[self.layer_to_attn[i]], sa_l[i])
            x = x + self._mlp(norm(x), self.mlp_bank[i, 0], self.mlp_bank[i, 1])
            if i == lay.skip_from:
                skip = x
            if i == lay.backout_layer:
                x_backout = x
        if feats.backout:
            x = x - backout_l * x_backout
        logits = self._head(norm(x))[0]
        if self.training:
            weights = fwd.mtp_weights if feats.mtp else fwd.mtp_weights[:1]
            return mtp_loss(logits, target_seq, weights, feats.softcap).sum()
        z = softcap(logits) if feats.softcap else logits
        return F.cross_entropy(z.float(), target_seq, reduction="mean")

    # --- parameter table ------------------------------------------------------------------
    # The current optimizer (harness/optim.py) reads param_roles()/matrix_names(); param_specs()
    # is the table its replacement reads. Until then these two are derived from it.
    def param_roles(self) -> dict[str, str]:
        """name -> muon | embed | head | scalar (gates and lambdas are Adam "scalar"s)."""
        kinds = {"attn": "muon", "mlp": "muon", "embed": "embed", "value_embed": "embed",
                 "bigram_embed": "embed", "lm_head": "head"}
        return {s.name: kinds.get(s.label, "scalar") for s in self.param_specs()}

    def matrix_names(self, name: str, param: torch.Tensor) -> list[str]:
        if name == "attn_bank":  # the current optimizer splits on the last two dims: a (4d, d) qkvo per layer
            return [f"blocks.{layer}.attn.qkvo" for layer in self.attn_layers]
        spec = next(s for s in self.param_specs() if s.name == name)
        return [m.name for m in spec.matrices]

    def param_specs(self) -> list[ParamSpec]:
        d = self.model_dim
        attn = tuple(MatrixSpec(f"blocks.{layer}.attn.{p}", f"attn_{p}") for layer in self.attn_layers for p in "qkvo")
        mlp = []
        for layer in range(self.num_layers + 1):
            pad = layer == self.num_layers
            mlp.append(MatrixSpec(f"blocks.{layer}.mlp.fc", "pad" if pad else "mlp_fc"))
            mlp.append(MatrixSpec(f"blocks.{layer}.mlp.proj", "pad" if pad else "mlp_proj"))
        specs = {
            "attn_bank": ParamSpec("attn_bank", "attn", (d, d), attn),
            # c_proj is stored (in, out) = (4d, d), as the forward uses it (h @ c_proj): the
            # optimizer sees it in that orientation, as the fork's does
            "mlp_bank": ParamSpec("mlp_bank", "mlp", (4 * d, d), tuple(mlp)),
        }
        adam = {"smear_gate.weight": "smear_gate", "skip_gate.weight": "skip_gate", "value_embeds": "value_embed",
                "attn_gate_bank": "attn_gate_bank", "ve_gate_bank": "ve_gate_bank", "lm_head": "lm_head",
                "embed.weight": "embed", "bigram_embed.weight": "bigram_embed", "x0_lambdas": "x0_lambdas",
                "scalars": "scalars"}
        out = []
        for name, _ in self.named_parameters():
            out.append(specs[name] if name in specs else ParamSpec(name, adam[name]))
        return out


def mtp_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, cap: bool = True) -> torch.Tensor:
    """Per-position loss sum_k w_k * CE(z_i, targets[i+k]) over the k with i+k < T, in fp32
    (the fork's FusedSoftcappedCrossEntropy; its gradient is the same through autograd)."""
    z = logits.float()
    z = softcap(z) if cap else z
    lse = torch.logsumexp(z, dim=-1)
    T = z.size(0)
    losses = torch.zeros(T, dtype=torch.float32, device=z.device)
    for k in range(weights.numel()):
        if k >= T:
            break
        zt = z[: T - k].gather(1, targets[k:, None]).squeeze(1)
        losses = losses + F.pad(weights[k].float() * (lse[: T - k] - zt), (0, k))
    return losses

