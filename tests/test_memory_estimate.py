"""harness/memory_estimate.py: the meta-device estimate against a real (CPU, reduced-size) speedrun
trainer's tensors."""

from __future__ import annotations

import math

from harness import dist as hdist
from harness.config import load_config
from harness.memory_estimate import (H100_BYTES, build_meta, estimate, optimizer_bytes, parameter_bytes_by_dtype,
                                     total_bytes)
from harness.speedrun_train import SpeedrunTrainer
from harness.plan import resolve_plan
from train_utils import REDUCED


def test_parameter_and_optimizer_bytes_match_a_real_trainer(shards_dir):
    cfg = load_config([*REDUCED, "--train_files", str(shards_dir / "local_train_*.bin"),
                       "--val_files", str(shards_dir / "local_val_*.bin"), "--warmup", "0"], env={})
    info = hdist.init()
    t = SpeedrunTrainer(resolve_plan(cfg, info), info)
    t.setup()
    cfg = t.cfg  # the plan's config, with the compact vocab_size resolved
    meta_model, meta_opt = build_meta(cfg, world_size=1)
    assert next(meta_model.parameters()).is_meta
    real_params = sum(p.nbytes for p in t.model.parameters())
    assert sum(parameter_bytes_by_dtype(meta_model).values()) == real_params
    real_opt = {"muon momentum": sum(g.momentum.nbytes for g in t.opt.muon.groups),
                "normuon v": sum(g.second_moment.nbytes for g in t.opt.muon.groups),
                "adam moments": sum(e.exp_avg.nbytes + e.exp_avg_sq.nbytes for e in t.opt.adam.entries)}
    assert optimizer_bytes(meta_opt) == real_opt
    items = {i.name: i.bytes for i in estimate(cfg, world_size=1)}
    assert items["parameters"] == items["gradients"] == real_params
    # at 8 ranks each holds ceil(n/8) matrices of every Muon shape group
    _, opt8 = build_meta(cfg, world_size=8)
    want = sum(math.ceil(len(g.refs) / 8) * math.prod(g.shape) * 4 for g in t.opt.muon.groups)
    assert optimizer_bytes(opt8)["muon momentum"] == want
    # and ceil(R/8) of the R rows of every Adam parameter (at 8 ranks the scalars vector is padded
    # to a multiple of the world size, the fork's layout: take the shapes from the 8-rank model)
    rows = sum(math.ceil(e.param.shape[0] / 8) * math.prod(e.param.shape[1:]) for e in opt8.adam.entries)
    assert optimizer_bytes(opt8)["adam moments"] == 2 * 4 * rows
    assert optimizer_bytes(opt8)["adam moments"] < real_opt["adam moments"] / 4


def test_speedrun_preset_estimate_rows_and_total():
    cfg = load_config(["--preset", "speedrun"], env={})
    items = estimate(cfg, world_size=8)
    names = [i.name for i in items]
    assert names == ["parameters", "gradients", "muon momentum", "normuon v", "adam moments", "step buffers",
                     "activations", "activations_bf16"]
    b = {i.name: i.bytes for i in items}
    assert b["activations_bf16"] < b["activations"]
    assert total_bytes(items) == sum(v for k, v in b.items() if k != "activations_bf16")
    assert 0 < total_bytes(items) and H100_BYTES == 80e9


def test_meta_forward_saves_what_a_real_cpu_forward_saves():
    """The activation count on the meta device (by tensor identity) against the same forward on
    real CPU tensors (by storage address), at a small size: same tensors, same bytes."""
    import torch

    from harness.memory_estimate import is_attention_square, saved_tensors
    from harness.speedrun_model import SpeedrunGPT

    kw = dict(vocab_size=256, model_dim=48, num_heads=4, head_dim=12, bigram_vocab_size=97, max_seq_len=128)
    torch.manual_seed(0)
    real = SpeedrunGPT(**kw)
    with torch.device("meta"):
        meta = SpeedrunGPT(**kw)
    T, windows = 128, (16, 48)
    on_cpu = saved_tensors(real, T, 3, windows, device="cpu")
    on_meta = saved_tensors(meta, T, 3, windows)

    def summary(ts):
        return sorted((tuple(t.shape), str(t.dtype)) for t in ts if not is_attention_square(t, T))

    assert summary(on_meta) == summary(on_cpu)
    assert sum(t.nbytes for t in on_meta) == sum(t.nbytes for t in on_cpu) > 0
