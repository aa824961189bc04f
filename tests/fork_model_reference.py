"""The fork's own model and data code, taken from ../shared/reference/fork/train_gpt.py at test time.

The file is parsed with `ast` and only the named top-level definitions are executed, in a
namespace where the CUDA-only pieces are this module's CPU stand-ins, each written from the
fork's documented semantics:
- `flash_attn_varlen_func` (FA3): causal attention per document of cu_seqlens, keys j with
  i - j <= window_size[0], softmax scale as given; computed document by document.
- `FusedLinearReLUSquareFunction` (Triton): relu(x @ W1.T)^2 @ W2.
- `FusedSoftcappedCrossEntropy` (Triton): per row i, sum over k of w_k * CE(23*sigmoid((z+5)/7.5),
  target[i+k]) for i+k < rows and w_k > 0.
- `args`, `device`, `dist.get_world_size`, `grad_accum_steps`, `world_size`, `grad_scale`,
  `get_kernel`; `F.linear` casts its weight to the input's dtype (the fork casts the gate banks
  to bf16, which on GPU matches its bf16 activations; in an fp32 test it would be a dtype error).
One source transformation: the key offset `k[:, 1:, ..] = k[:, :-1, ..]` copies overlapping
memory; the fork always runs under torch.compile, whose functional graph reads the source before
writing (a shift), while eager CPU copies front to back and smears position 0 down the sequence.
The source of that one statement is cloned, which is what the compiled fork computes.
"""

from __future__ import annotations

import ast
import math
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as torch_F

FORK_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "fork"
FORK_TRAIN = FORK_DIR / "train_gpt.py"
_LOADED: list = []
SKIP_REASON = f"the fork's reference code is absent ({FORK_TRAIN} not found; ../shared is not checked out)"

MODEL_DEFS = ("norm", "CastedLinearT", "Yarn", "AttnArgs", "flash_attn_interface", "CausalSelfAttention", "MLP",
              "Block", "next_multiple_of_n", "ForwardScheduleConfig", "GPT")
DATA_DEFS = ("BOS_ID", "Shard", "get_bigram_hash", "next_multiple_of_n")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                           window_size):
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
    left = window_size[0]
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if b <= a:
            continue
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # (H, n, D)
        scores = (qs @ ks.transpose(1, 2)) * softmax_scale
        n = b - a
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        allowed = (j <= i) & ((i - j <= left) if left >= 0 else True)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


class FusedLinearReLUSquareFunction:
    @staticmethod
    def apply(x, W1, W2):
        return torch_F.relu(x @ W1.T).square() @ W2


class FusedSoftcappedCrossEntropy:
    @staticmethod
    def apply(logits, targets, mtp_weights, A=23.0, B=5.0, C=7.5):
        z = A * torch.sigmoid((logits.float() + B) / C)
        n = z.size(0)
        losses = torch.zeros(n)
        for kk, w in enumerate(mtp_weights.tolist()):
            if w > 0 and kk < n:
                ce = torch_F.cross_entropy(z[: n - kk], targets[kk:], reduction="none")
                losses = losses + torch_F.pad(mtp_weights[kk] * ce, (0, kk))
        return losses


def _linear(input, weight, bias=None):
    return torch_F.linear(input, weight.to(input.dtype), bias)


class _KeyOffsetClone(ast.NodeTransformer):
    """`k[...] = k[...]` (a slice copy of a tensor onto itself) -> `k[...] = k[...].clone()`."""

    def visit_Assign(self, node):
        t, v = node.targets[0], node.value
        if (isinstance(t, ast.Subscript) and isinstance(v, ast.Subscript) and isinstance(t.value, ast.Name)
                and isinstance(v.value, ast.Name) and t.value.id == v.value.id):
            node.value = ast.Call(func=ast.Attribute(value=v, attr="clone", ctx=ast.Load()), args=[], keywords=[])
            self.count = getattr(self, "count", 0) + 1
        return node


def load(names, *, extra: dict | None = None, bigram_vocab_size: int = 251, train_max_seq_len: int = 2048,
         val_batch_size: int = 4096):
    """A namespace holding the fork's definitions `names` (with the stand-ins above)."""
    tree = ast.parse(FORK_TRAIN.read_text(), filename=str(FORK_TRAIN))
    body = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            body.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            body.append(node)
    found = {n.name if hasattr(n, "name") else n.targets[0].id for n in body}
    missing = set(names) - found
    assert not missing, f"{FORK_TRAIN}: definitions not found: {sorted(missing)}"
    fixer = _KeyOffsetClone()
    module = ast.fix_missing_locations(fixer.visit(ast.Module(body=body, type_ignores=[])))
    if "CausalSelfAttention" in names:
        assert getattr(fixer, "count", 0) == 1, "expected exactly one key-offset slice copy in the fork's attention"
    F_proxy = types.SimpleNamespace(**{n: getattr(torch_F, n) for n in dir(torch_F) if not n.startswith("_")})
    F_proxy.linear = _linear
    ns = dict(
        torch=torch, nn=nn, F=F_proxy, Tensor=torch.Tensor, math=math, os=os, dataclass=dataclass,
        threading=__import__("threading"), np=__import__("numpy"), Path=Path,
        args=types.SimpleNamespace(bigram_vocab_size=bigram_vocab_size, train_max_seq_len=train_max_seq_len,
                                   val_batch_size=val_batch_size),
        device=torch.device("cpu"), dist=types.SimpleNamespace(get_world_size=lambda: 1),
        grad_accum_steps=1, world_size=1, grad_scale=1.0,
        get_kernel=lambda name: types.SimpleNamespace(
            flash_attn_interface=types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)),
        FusedLinearReLUSquareFunction=FusedLinearReLUSquareFunction,
        FusedSoftcappedCrossEntropy=FusedSoftcappedCrossEntropy,
    )
    # dataclasses look their module up in sys.modules: give the namespace a real module
    mod = types.ModuleType(f"fork_train_gpt_{len(_LOADED)}")
    mod.__dict__.update(ns, **(extra or {}))
    sys.modules[mod.__name__] = mod
    _LOADED.append(mod)
    ns = mod.__dict__
    exec(compile(module, str(FORK_TRAIN), "exec"), ns)
    return types.SimpleNamespace(**{n: ns[n] for n in names})
