"""GPU memory per rank of a speedrun-model run, estimated without a GPU: the model and the real
optimizers (harness/optim.py) are built on the meta device, so every tensor has its true shape and
dtype and no storage.

Items (bytes per rank):
  parameters     every parameter, whole on every rank (by dtype: ours are float32; autocast casts)
  gradients      p.grad, same shape and dtype as the parameter, whole on every rank
  muon momentum  ShardedMuon's float32 momentum: this rank's share (ceil(n/W) matrices per shape)
  normuon v      NorMuon's float32 second moment, (m, 1) or (1, n) per owned matrix
  adam moments   LabelledAdam's float32 exp_avg and exp_avg_sq: this rank's rows (ceil(R/W) of
                 every parameter's R rows)
  step buffers   at the optimizer step: Muon's padded float32 stack of the gradients and the
                 reduce-scatter output; Adam's float32 rows of each mean gradient (the
                 reduce-scatter's output; the parameter itself is all-gathered into), and for a
                 parameter whose rows W does not divide, its zero-padded gradient, padded rows
                 and padded all-gather output
  activations    what autograd saves in one micro-batch's forward, parameters themselves excluded (the largest over the batch
                 stages: tokens = batch_size / micro_batches, the stage's MTP weights and windows),
                 counted by saved-tensor hooks on a meta-device forward, each tensor once. Two
                 corrections, because the meta forward takes the model's CPU path: the (T, T)
                 attention weights that the CPU's SDPA math path saves are dropped, and the output
                 and log-sum-exp that flex attention saves on CUDA are added instead; floating
                 tensors are counted at their traced dtype (float32: autocast does not run on
                 meta) in `activations` and at 2 bytes in `activations_bf16` (CUDA's bf16 autocast
                 keeps matmul outputs in bf16; float32 softcap/CE tensors stay float32 there, so
                 the truth lies between the two).
Not counted: the CUDA caching allocator's fragmentation, torch.compile's workspaces, NCCL buffers,
the CUDA context (~0.5 GB), validation (no_grad, smaller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.config import Config
from harness.dist import DistInfo

H100_BYTES = 80 * 10 ** 9  # "80 GB" as sold; nvidia-smi shows 81559 MiB (85.5e9 B) on an H100 SXM


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: int
    note: str = ""


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_meta(cfg: Config, world_size: int, device: torch.device | str = "meta"):
    """(model, Optimizers) as SpeedrunTrainer builds them, for rank 0 of `world_size`."""
    from harness.optim import Optimizers
    from harness.speedrun_model import SpeedrunFeatures, SpeedrunGPT

    device = torch.device(device)
    max_len = max(max(cfg.batch_sizes), cfg.val_batch_size) // cfg.micro_batches
    with torch.device(device):
        model = SpeedrunGPT(vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, model_dim=cfg.model_dim,
                            num_heads=cfg.num_heads, head_dim=cfg.head_dim, bigram_vocab_size=cfg.bigram_vocab_size,
                            max_seq_len=max_len, features=SpeedrunFeatures(), scalars_pad_world_size=world_size,
                            grad_scale=2 * world_size / cfg.micro_batches)
    info = DistInfo(0, world_size, 0, device, None if world_size == 1 else "nccl")
    opt = Optimizers(model, cfg, info)
    return model, opt


def parameter_bytes_by_dtype(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


def optimizer_bytes(opt) -> dict[str, int]:
    """The optimizer state this rank holds, from the real optimizer's tensors."""
    return {
        "muon momentum": _nbytes(g.momentum for g in opt.muon.groups),
        "normuon v": _nbytes(g.second_moment for g in opt.muon.groups),
        "adam moments": _nbytes(t for e in opt.adam.entries for t in (e.exp_avg, e.exp_avg_sq)),
    }


def step_buffer_bytes(opt) -> int:
    muon = sum((g.padded + g.per_rank) * math.prod(g.shape) * 4 for g in opt.muon.groups)
    # untied: the embedding is reduced too
    adam = sum(e.exp_avg.numel() * (2 * e.world_size + 2 if e.padded else 1) for e in opt.adam.entries) * 4
    return muon + adam


def saved_tensors(model, tokens: int, mtp: int, windows: tuple[int, int], device="meta") -> list[torch.Tensor]:
    """The tensors autograd saves in one training forward of `tokens` packed tokens (one document),
    each storage once: on meta by the base tensor's identity (meta tensors have no storage
    address), elsewhere by the storage's address."""
    from harness.speedrun_model import ForwardArgs

    T, dev = tokens, torch.device(device)
    seen: dict = {}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        key = id(base) if base.is_meta else base.untyped_storage().data_ptr()
        if key not in seen or base.numel() > seen[key].numel():
            seen[key] = base
        return t

    x = torch.zeros(T, dtype=torch.int32, device=dev)
    y = torch.zeros(T, dtype=torch.int64, device=dev)
    cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
    bigram = torch.zeros(T, dtype=torch.int32, device=dev)
    args = ForwardArgs(torch.ones(mtp, device=dev), windows[0], windows[1])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y, cu, bigram, args)
    return list(seen.values())


def is_attention_square(t: torch.Tensor, tokens: int) -> bool:
    """The (.., T, T) attention weights / masks of the CPU's SDPA math path (2T for paired heads)."""
    s = tuple(t.shape)
    return len(s) >= 2 and s[-1] == s[-2] and s[-1] in (tokens, 2 * tokens)


def activation_bytes(model, tokens: int, mtp: int, windows: tuple[int, int]) -> tuple[int, int]:
    """(bytes at the traced dtype, bytes with floating tensors at 2 bytes) that one training
    forward of `tokens` packed tokens saves for backward, from a meta-device forward, with the
    CPU attention's (T, T) tensors swapped for what flex attention saves on CUDA."""
    T = tokens
    params = {id(p) for p in model.parameters()}  # saved weights (and views of them) are counted above
    traced = bf16 = 0
    for t in saved_tensors(model, T, mtp, windows):
        if is_attention_square(t, T) or id(t) in params:
            continue
        n = t.numel()
        traced += n * t.element_size()
        bf16 += n * (2 if t.is_floating_point() and t.element_size() > 2 else t.element_size())
    # flex attention on CUDA saves its output (T, H, D) and log-sum-exp (H, T) per attention call
    H, D = model.num_heads, model.head_dim
    n_attn = len(model.attn_layers)
    traced += n_attn * (T * H * D * 4 + H * T * 4)
    bf16 += n_attn * (T * H * D * 2 + H * T * 4)
    return traced, bf16


def estimate(cfg: Config, world_size: int = 8) -> list[MemoryItem]:
    """The rows of the estimate for one rank of `world_size` (see the module docstring)."""
    from harness.speedrun_schedule import FORK_STAGES

    model, opt = build_meta(cfg, world_size)
    by_dtype = parameter_bytes_by_dtype(model)
    params = sum(by_dtype.values())
    items = [MemoryItem("parameters", params, ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in by_dtype.items())),
             MemoryItem("gradients", params, "same dtype as the parameters, whole")]
    for name, b in optimizer_bytes(opt).items():
        note = f"float32, 1/{world_size} share"
        items.append(MemoryItem(name, b, note))
    items.append(MemoryItem("step buffers", step_buffer_bytes(opt), "Muon stack + reduce-scatter out,"
                                                                       " Adam gradient rows (+ padded copies)"))
    best = None
    for k, tokens_global in enumerate(cfg.batch_sizes):
        tokens = tokens_global // cfg.micro_batches
        stage = FORK_STAGES[min(k, len(FORK_STAGES) - 1)]
        windows = (stage.windows[0] * cfg.window_block, stage.windows[1] * cfg.window_block)
        traced, bf16 = activation_bytes(model, tokens, len(stage.mtp_start), windows)
        if best is None or traced > best[1]:
            best = (k, traced, bf16, tokens)
    k, traced, bf16, tokens = best
    items.append(MemoryItem("activations", traced, f"stage {k}: {tokens} tokens/micro-batch, float32 as traced"))
    items.append(MemoryItem("activations_bf16", bf16, "the same with floating tensors at 2 bytes (not summed)"))
    return items


def total_bytes(items: list[MemoryItem]) -> int:
    return sum(i.bytes for i in items if i.name != "activations_bf16")
