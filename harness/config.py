"""Every knob of a run in one dataclass: presets, then environment variables, then flags.

Sources, lowest to highest priority: the preset (`--preset NAME` or `PRESET=NAME`), environment
variables named after the field in UPPER_SNAKE case (lists comma-separated), command-line flags
`--field_name value`. Everything is validated before any work starts; a bad value raises
UserError with one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from base import UserError
from base.cli import ArgumentParser

# Fields that live in the environment of torchrun or the shell; never read as config.
_RESERVED_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+,@-]*$")


@dataclass
class Config:
    # --- identity -------------------------------------------------------------------------
    preset: str = "tiny"  # named set of defaults: tiny (CPU minutes) | classic (GPT-2 + AdamW, the CPU baseline) | micro (the tests') | speedrun (the fork's 8xH100 run)
    run_id: str = ""  # the run's name (log and checkpoint file names); empty: from tag/script and the time
    tag: str = ""  # a human label; readers group by it (never by parsing the run id)
    seed: int = 0  # seed of the model init and the data order
    script: str = ""  # the entry script that ran (set by the entry point)
    log_dir: str = "logs"  # folder of the text run log (logs/<run_id>.txt)

    # --- data -----------------------------------------------------------------------------
    train_files: str = "data/local/local_train_*.bin"  # glob of the training token shards
    val_files: str = "data/local/local_val_*.bin"  # glob of the validation token shards
    val_tokens: int = 32768  # tokens per validation (over all ranks)
    align_bos: bool = False  # start every training sequence at a document start (BOS)
    # how training windows are picked: sequential (consecutive windows through the shards, as
    # modded-nanogpt) | random (each at a uniformly random offset, nanoGPT's get_batch; seeded by
    # seed and the batch number, so a resumed run draws the same windows)
    sampling: str = "random"
    # renumber the ids that occur in the train+val shards to 0..V-1 and set vocab_size to V
    # padded to 128: the same text and task with a smaller head (data.shards; on the local
    # corpus 22,784 rows instead of 50,304). Off in the classic and speedrun presets.
    compact_vocab: bool = True

    # --- model ----------------------------------------------------------------------------
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 128
    num_layers: int = 4  # transformer blocks
    model_dim: int = 256  # residual stream width
    num_heads: int = 4  # attention heads (head_dim = model_dim / num_heads)
    mlp_ratio: int = 4  # MLP hidden width over model_dim
    seq_len: int = 256  # tokens per training sequence
    window_size: int = 0  # sliding-window attention span in tokens; 0 = full causal
    rope: bool = True  # rotary position embeddings on q and k
    rope_base: float = 10000.0  # RoPE frequency base
    qk_norm: bool = True  # RMS-normalise q and k before attention
    logit_softcap: float = 15.0  # tanh soft-cap of the logits, softcap * tanh(z / softcap); 0 = off
    value_embeds: bool = False  # three vocabulary-sized tables: off in the CPU preset for speed
    unet_skips: bool = True  # U-net skip connections from the first half of the blocks to the second
    # which model: gpt (harness/model.py, the fields above) | classic (GPT-2 as nanoGPT:
    # harness/classic_model.py; learned positions over seq_len, LayerNorm, GELU, tied head; uses
    # num_layers/model_dim/num_heads/mlp_ratio/vocab_size) | speedrun (the fork's GPT,
    # harness/speedrun_model.py: num_layers/model_dim/num_heads/vocab_size above, seq_len = the
    # document cut, and the fields below; its trainer is harness/speedrun_train.py)
    model: str = "gpt"
    bigram_vocab_size: int = 251520  # speedrun: bigram hash embedding rows (the fork's 50304*5)
    micro_batches: int = 8  # speedrun: world_size x grad accumulation per step (the fork's 8 GPUs)
    val_batch_size: int = 2097152  # speedrun: validation tokens per step over all ranks (the fork's)
    window_block: int = 128  # speedrun: attention windows are counted in blocks of this many tokens
    compile: str = "auto"  # auto (on with CUDA) | on | off
    # speedrun: before the clock, run the step at the fork's warm-up steps (every batch/window/MTP
    # shape: compilation and autotuning), then restore weights, optimizer, loader and RNG exactly
    warmup: bool = False
    dtype: str = "auto"  # activation dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32

    # --- batch, schedule and validation ---------------------------------------------------
    # tokens per step over all ranks, per batch-size stage (4 stages)
    batch_sizes: list[int] = field(default_factory=lambda: [2048, 4096, 4096, 4096])
    lr_muls: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # LR multiplier per batch-size stage
    num_scheduled_iterations: int = 48  # steps of the LR schedule (with its cooldown)
    num_extension_iterations: int = 6  # extra steps after it at the final LR multiplier
    cooldown_frac: float = 0.5  # fraction of the scheduled steps over which the LR cools down
    lr_decay_final: float = 0.1  # LR multiplier at the end of the cooldown
    lr_decay_shape: str = "linear"  # shape of the LR cooldown: linear (the fork) | cosine (nanoGPT)
    lr_warmup_steps: int = 0  # linear LR warm-up over the first N steps (nanoGPT's (s+1)/(N+1)); 0 = none
    device_batch_tokens: int = 2048  # tokens per forward pass on one rank; more means grad accumulation
    val_loss_every: int = 27  # validate every N steps (0: only at the start and the end)
    val_loss_last_steps: int = 0  # in the last N steps, validate every val_loss_every_last steps
    val_loss_every_last: int = 0  # validation interval in the last val_loss_last_steps steps
    grad_clip: float = 0.0  # clip the global norm of the averaged gradients to this; 0 = off

    # --- optimizer (the fork's rules: docs/REFERENCE.md "Optimizer"; harness/optim.py) ----------
    # muon: NorMuon on the hidden matrices + Adam on the rest (harness/optim.py) | adamw: AdamW on
    # every parameter as nanoGPT (harness/adamw.py: adam_lr, adam_wd, adam_eps, *.beta1/*.beta2 of
    # adam_overrides; decay on tensors of 2+ dims; grad_clip on the mean loss's gradient)
    optimizer: str = "muon"
    muon_lr: float = 0.05  # Muon's base learning rate
    muon_momentum: float = 0.95  # Muon's Nesterov momentum after warm-up
    muon_momentum_start: float = 0.85  # Muon's momentum at step 0 (and at the end of its cooldown)
    muon_momentum_warmup_steps: int = 300  # steps of the momentum's linear warm-up
    muon_momentum_cooldown_steps: int = 50  # last steps over which the momentum goes back down
    # decoupled decay by wd * lr * lr_eff (proportional to the LR squared, as the fork)
    muon_wd: float = 0.0
    cautious_wd: bool = False  # decay only where the update and the weight agree in sign
    # the MLP output projection's LR factor on top of the shape factor (the fork's 2x: 4x in all)
    muon_lr_mul_mlp_proj: float = 2.0
    normuon: bool = True  # NorMuon: per-neuron second-moment normalisation of the orthogonalized update
    normuon_beta2: float = 0.95  # NorMuon's second-moment decay
    ns_method: str = "polar_express"  # orthogonalization: polar_express | quintic (Newton-Schulz)
    ns_steps: int = 5  # orthogonalization iterations
    ns_dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32
    # Adam: base LR, eps and weight decay; per-label betas and LR / WD multipliers from the fork's
    # table (harness/optim.py ADAM_TABLE), changed by adam_overrides "LABEL.KEY=V,..." with KEY one
    # of lr_mul, wd_mul, beta1, beta2 and LABEL a parameter label or * for all. The CPU default
    # keeps the tiny recipe that predates the fork's table (embedding LR 0.3, betas 0.8/0.95, no
    # decay, every step); the speedrun preset is the fork's.
    adam_lr: float = 0.008  # Adam's base learning rate (x each label's lr_mul)
    adam_eps: float = 1e-10  # Adam's eps (added to sqrt(v) before the bias correction, as the fork)
    adam_wd: float = 0.0  # Adam's base weight decay (x each label's wd_mul; cautious, x lr^2)
    # changes to the fork's Adam table: LABEL.KEY=V,... (KEY lr_mul|wd_mul|beta1|beta2, LABEL or *)
    adam_overrides: dict[str, float] = field(
        default_factory=lambda: {"embed.lr_mul": 37.5, "*.beta1": 0.8, "*.beta2": 0.95})
    adam_every: int = 1  # 2: Adam steps on odd steps with two steps' gradients summed (the fork); 1: every step
    tied_embed: bool = False  # embed and head tied until the first (odd) step of embed_split_stage
    embed_split_stage: int = 2  # batch-size stage at whose first odd step tied_embed unties

    # --- ORD (train_gpt_muon_new.py) ------------------------------------------------------
    ord: bool = False  # set by train_gpt_muon_new.py
    # s, ORD's coefficient; None = ORD off (train_gpt.py). The ORD script defaults it to 1.0.
    spectral_lr_mul: float | None = None
    spectral_lr_mul_attn: float | None = None  # s for the attention matrices (default: spectral_lr_mul)
    spectral_lr_mul_mlp: float | None = None  # s for the MLP matrices (default: spectral_lr_mul)
    spectral_proj_eps: float = 1e-12  # eps in rho = <G,W> / (||W||^2 + eps)
    # interpolated: Polar(G - s G_par) (the fork); projected: Polar(G - G_par) whatever s
    ord_form: str = "interpolated"
    # fork: G_par in the fork's gradient units (sum loss x grad_scale); mean: in mean-loss units
    ord_units: str = "fork"
    ord_placement: str = "after_norm"  # add s G_par after NorMuon (the fork) or before it
    ord_reproject: bool = False  # project Polar's output onto W's orthogonal complement too

    # --- diagnostics ----------------------------------------------------------------------
    diag_every: int = 0  # spectral diagnostics of the Muon matrices every N steps (diag lines); 0 = off
    diag_sample: int = 0  # 0 = every Muon matrix; N = a fixed random sample of N matrices
    diag_topk: int = 8  # k of the top-k singular subspaces compared in the alignment metric
    diag_embed_head: bool = False  # also measure the embedding and the head
    diag_spectra: bool = False  # also write full singular-value spectra to logs/<run_id>.spectra.npz

    # --- checkpoints ----------------------------------------------------------------------
    save_every: int = 0  # write a checkpoint every N steps (0: off)
    save_final: bool = False  # write a checkpoint at the end
    keep_last: int = 2  # checkpoints kept per run (older ones removed)
    checkpoint_dir: str = "checkpoints"  # folder of checkpoints (<checkpoint_dir>/<run_id>/step_N.pt)
    resume: str = ""  # resume from a checkpoint: PATH, or latest (the newest of this run id)

    # --- faults and guards (issue 19) -----------------------------------------------------
    # process-group timeout of every collective, in seconds; 0 = auto: 300 on CPU, 1800 on
    # CUDA (where torch.compile on the first steps is slow). A rank that does not answer in
    # time ends the run with a line naming it.
    dist_timeout_s: float = 0.0
    # divergence rule: a run whose val loss is above diverge_ratio x its step-0 val loss at
    # diverge_patience validations in a row ends as status:diverged (0 = rule off). A
    # non-finite loss ends it at once, whatever these say.
    diverge_ratio: float = 1.2
    diverge_patience: int = 2  # validations in a row above diverge_ratio x the first that end the run

    # --- experiment trackers (optional; the text log stays the source of truth) ------------
    # also send the log's step/val/diag/status records to these (comma-separated): tensorboard | trackio | wandb (offline); empty = none
    trackers: list[str] = field(default_factory=list)
    tracker_dir: str = ""  # folder of the trackers' files (<dir>/tensorboard/<run_id>, ...); empty = <log_dir>/trackers
    tracker_project: str = "muon-harness"  # project name of the run in trackio and wandb

    # --- derived helpers ------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def total_iterations(self) -> int:
        return self.num_scheduled_iterations + self.num_extension_iterations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # A CPU run of a few minutes on the local corpus (Python stdlib sources).
    "tiny": {},
    # The classic baseline: GPT-2 as nanoGPT trains it (learned positions, LayerNorm, GELU, tied
    # head; AdamW 1e-3 with betas 0.9/0.95, weight decay 0.1, eps 1e-8, clip 1.0, warm-up then
    # cosine decay to 0.1x; block 256, batch 8 x 256 tokens at random offsets) at the tiny
    # preset's size and data.
    "classic": dict(
        model="classic",
        optimizer="adamw",
        compact_vocab=False,  # GPT-2's vocabulary, as nanoGPT
        batch_sizes=[2048, 2048, 2048, 2048],
        num_scheduled_iterations=200,
        num_extension_iterations=0,
        cooldown_frac=1.0,
        lr_decay_shape="cosine",
        lr_warmup_steps=20,
        adam_lr=1e-3,
        adam_wd=0.1,
        adam_eps=1e-8,
        adam_overrides={"*.beta1": 0.9, "*.beta2": 0.95},
        grad_clip=1.0,
        val_loss_every=25,
    ),
    # The tests' model: a step in milliseconds on CPU, GPT-2's vocabulary and consecutive
    # windows kept: the tests' numbers (ln 50304 at step 0, data order) are computed for them.
    "micro": dict(
        num_layers=2,
        model_dim=32,
        num_heads=2,
        seq_len=16,
        batch_sizes=[32, 32, 32, 32],
        device_batch_tokens=32,
        val_tokens=64,
        num_scheduled_iterations=30,
        num_extension_iterations=0,
        val_loss_every=10,
        compact_vocab=False,
        sampling="sequential",
    ),
    # The 8xH100 FineWeb10B run of the ORD experiment (docs/REFERENCE.md).
    "speedrun": dict(
        train_files="data/fineweb10B/fineweb_train_*.bin",
        val_files="data/fineweb10B/fineweb_val_*.bin",
        val_tokens=10485760,
        model="speedrun",  # the fork's GPT: 11 layers, 6 heads of 128, bigram vocab 251520
        compact_vocab=False,  # the fork's 50304 ids
        sampling="sequential",  # the fork's loader: consecutive windows
        value_embeds=True,
        num_layers=11,
        model_dim=768,
        num_heads=6,
        seq_len=2048,
        batch_sizes=[131072, 262144, 393216, 393216],
        lr_muls=[1.0, 1.52, 1.73, 1.0],
        num_scheduled_iterations=1560,
        num_extension_iterations=40,
        cooldown_frac=0.55,
        device_batch_tokens=16384,
        val_loss_every=50,
        muon_lr=0.023,
        muon_wd=1.2,
        cautious_wd=True,
        adam_overrides={},
        adam_wd=0.005,
        adam_every=2,
        tied_embed=True,
        warmup=True,
    ),
}


# ------------------------------------------------------------------------------------------
# Field typing and parsing


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type, optional) for `T`, `T | None`, `list[T]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_scalar(name: str, tp: Any, text: str, source: str) -> Any:
    text = text.strip()
    try:
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            # accept 1e6-style and 1_000 forms when they are whole numbers
            value = float(text.replace("_", "")) if any(c in text for c in "eE.") else int(text.replace("_", ""))
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                value = int(value)
            return value
        if tp is float:
            return float(text)
        return text
    except ValueError:
        kind = {bool: "a boolean (1/0/true/false)", int: "an integer", float: "a number"}.get(tp, "a string")
        raise UserError(f"{source}: {name}={text!r} is not {kind}") from None


def parse_value(name: str, text: str, source: str) -> Any:
    """Parse the text form of field `name` (as in env vars and flags)."""
    types_ = _field_types()
    if name not in types_:
        raise UserError(f"{source}: unknown config field {name!r}")
    tp, optional = _base_type(types_[name])
    if optional and text.strip().lower() in ("", "none", "null"):
        return None
    if typing.get_origin(tp) is dict:
        return _parse_mapping(name, tp, text, source)
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        parts = text.split(",")
        if not text.strip() and _empty_list_default(name):
            return []  # e.g. --trackers "": none
        if not text.strip() or any(not p.strip() for p in parts):
            raise UserError(f"{source}: {name}={text!r} is not a comma-separated list of {elem.__name__} (empty item)")
        return [_parse_scalar(name, elem, p, source) for p in parts]
    return _parse_scalar(name, tp, text, source)


def _empty_list_default(name: str) -> bool:
    f = next(f for f in dataclasses.fields(Config) if f.name == name)
    return f.default_factory is not dataclasses.MISSING and f.default_factory() == []


def _parse_mapping(name: str, tp: Any, text: str, source: str) -> dict[str, Any]:
    """`KEY=V,KEY=V` (an empty text is the empty mapping)."""
    _, elem = typing.get_args(tp)
    out: dict[str, Any] = {}
    for item in (t for t in text.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{source}: {name}={text!r} is not a comma-separated list of KEY=VALUE ({item!r})")
        out[key.strip()] = _parse_scalar(name, elem, value, source)
    return out


def _coerce(name: str, value: Any, source: str) -> Any:
    """Accept python values (from presets, TOML sweeps, tests) of the right type, or their text form."""
    if isinstance(value, str):
        return parse_value(name, value, source)
    tp, optional = _base_type(_field_types()[name])
    if value is None and optional:
        return None
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {name}={value!r} has the wrong type (expected a table of KEY = VALUE)")
        _, elem = typing.get_args(tp)
        return {str(k): _coerce_scalar(name, elem, v, source) for k, v in value.items()}
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (elem,) = typing.get_args(tp)
        return [_coerce_scalar(name, elem, v, source) for v in value]
    return _coerce_scalar(name, tp, value, source)


def _coerce_scalar(name: str, tp: Any, value: Any, source: str) -> Any:
    if isinstance(value, str):
        return _parse_scalar(name, tp, value, source)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str:
        return str(value)
    raise UserError(f"{source}: {name}={value!r} has the wrong type (expected {tp.__name__})")


# ------------------------------------------------------------------------------------------
# Validation


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise UserError(f"config: {name}={value!r} is invalid: {allowed}")


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Check every field; with world_size, also the batch arithmetic of this launch."""
    _check(cfg.preset in PRESETS, "preset", cfg.preset, f"one of {', '.join(sorted(PRESETS))}")
    if cfg.run_id:
        _check(
            bool(RUN_ID_PATTERN.match(cfg.run_id)) and ".." not in cfg.run_id and len(cfg.run_id) <= 200,
            "run_id",
            cfg.run_id,
            "letters, digits and . _ = + , @ - only (no '/', no '..'), at most 200 characters",
        )
    if cfg.tag:
        _check(bool(RUN_ID_PATTERN.match(cfg.tag)) and ".." not in cfg.tag, "tag", cfg.tag,
               "letters, digits and . _ = + , @ - only (no '/', no '..')")
    for name in ("val_tokens", "vocab_size", "num_layers", "model_dim", "num_heads", "mlp_ratio", "seq_len",
                 "num_scheduled_iterations", "device_batch_tokens", "ns_steps", "diag_topk", "keep_last"):
        _check(getattr(cfg, name) > 0, name, getattr(cfg, name), "must be > 0")
    for name in ("num_extension_iterations", "lr_warmup_steps", "val_loss_every", "val_loss_last_steps", "val_loss_every_last",
                 "window_size", "diag_every", "diag_sample", "save_every", "seed", "diverge_patience"):
        _check(getattr(cfg, name) >= 0, name, getattr(cfg, name), "must be >= 0")
    _check(cfg.seed < 2 ** 32, "seed", cfg.seed, "must be in 0..4294967295 (numpy's seed range)")
    _check(math.isfinite(cfg.rope_base) and cfg.rope_base > 0, "rope_base", cfg.rope_base, "must be finite and > 0")
    _check(math.isfinite(cfg.adam_eps) and cfg.adam_eps > 0, "adam_eps", cfg.adam_eps,
           "must be finite and > 0 (it keeps Adam's division finite)")
    _check(math.isfinite(cfg.dist_timeout_s) and cfg.dist_timeout_s >= 0, "dist_timeout_s", cfg.dist_timeout_s,
           "must be finite and >= 0 (0 = auto: 300 s on CPU, 1800 s on CUDA)")
    _check(cfg.diverge_ratio == 0 or (math.isfinite(cfg.diverge_ratio) and cfg.diverge_ratio > 1), "diverge_ratio",
           cfg.diverge_ratio, "0 (rule off) or a finite number > 1")
    _check(cfg.model_dim % cfg.num_heads == 0, "num_heads", cfg.num_heads,
           f"must divide model_dim={cfg.model_dim}")
    _check(cfg.head_dim % 2 == 0, "num_heads", cfg.num_heads, "model_dim/num_heads must be even (RoPE)")
    _check(cfg.vocab_size <= 65536, "vocab_size", cfg.vocab_size, "at most 65536 (shards hold uint16 ids)")
    _check(cfg.compile in ("auto", "on", "off"), "compile", cfg.compile, "auto, on or off")
    _check(cfg.model in ("gpt", "classic", "speedrun"), "model", cfg.model, "gpt, classic or speedrun")
    _check(cfg.optimizer in ("muon", "adamw"), "optimizer", cfg.optimizer, "muon or adamw")
    _check(cfg.model != "classic" or cfg.optimizer == "adamw", "optimizer", cfg.optimizer,
           "adamw with model=classic (its parameters have no Muon table)")
    _check(cfg.model != "speedrun" or cfg.optimizer == "muon", "optimizer", cfg.optimizer,
           "muon with model=speedrun (the fork's optimizer)")
    _check(cfg.optimizer == "muon" or not cfg.ord, "optimizer", cfg.optimizer,
           "muon for train_gpt_muon_new.py (ORD is a change inside Muon)")
    _check(cfg.optimizer == "muon" or cfg.diag_every == 0, "diag_every", cfg.diag_every,
           "0 with optimizer=adamw (the diagnostics measure Muon's matrices)")
    _check(cfg.sampling in ("sequential", "random"), "sampling", cfg.sampling, "sequential or random")
    _check(cfg.sampling == "sequential" or not cfg.align_bos, "sampling", cfg.sampling,
           "sequential with align_bos (random windows start anywhere)")
    _check(cfg.sampling == "sequential" or cfg.model != "speedrun", "sampling", cfg.sampling,
           "sequential with model=speedrun (the fork's document-packed batches)")
    _check(cfg.lr_decay_shape in ("linear", "cosine"), "lr_decay_shape", cfg.lr_decay_shape, "linear or cosine")
    _check(not cfg.warmup or cfg.model == "speedrun", "warmup", cfg.warmup,
           "only with model=speedrun (pass --warmup 0 with model=gpt)")
    _check(cfg.dtype in ("auto", "bfloat16", "float32"), "dtype", cfg.dtype, "auto, bfloat16 or float32")
    _check(cfg.ns_dtype in ("auto", "bfloat16", "float16", "float32"), "ns_dtype", cfg.ns_dtype,
           "auto, bfloat16, float16 or float32")
    _check(cfg.ns_method in ("polar_express", "quintic"), "ns_method", cfg.ns_method, "polar_express or quintic")
    _validate_ord(cfg)
    _validate_trackers(cfg)
    n_stages = 4
    _check(len(cfg.batch_sizes) == n_stages, "batch_sizes", cfg.batch_sizes,
           "four values: tokens per step for the three scheduled stages and the extension")
    _check(len(cfg.lr_muls) == n_stages, "lr_muls", cfg.lr_muls,
           "four values: LR multiplier of the three scheduled stages and the extension")
    _check(all(b > 0 for b in cfg.batch_sizes), "batch_sizes", cfg.batch_sizes, "every value must be > 0")
    _check(all(b % cfg.seq_len == 0 for b in cfg.batch_sizes), "batch_sizes", cfg.batch_sizes,
           f"every value must be a multiple of seq_len={cfg.seq_len}")
    _check(all(math.isfinite(m) and m > 0 for m in cfg.lr_muls), "lr_muls", cfg.lr_muls,
           "every value must be finite and > 0")
    _check(0.0 <= cfg.cooldown_frac <= 1.0, "cooldown_frac", cfg.cooldown_frac, "must be in [0, 1]")
    _check(math.isfinite(cfg.lr_decay_final) and cfg.lr_decay_final >= 0, "lr_decay_final", cfg.lr_decay_final,
           "must be finite and >= 0")
    _check(cfg.device_batch_tokens % cfg.seq_len == 0, "device_batch_tokens", cfg.device_batch_tokens,
           f"must be a multiple of seq_len={cfg.seq_len}")
    for name in ("muon_lr", "adam_lr", "muon_lr_mul_mlp_proj"):
        v = getattr(cfg, name)
        _check(math.isfinite(v) and v >= 0, name, v, "must be finite and >= 0")
    _check(cfg.adam_every in (1, 2), "adam_every", cfg.adam_every, "1 (every step) or 2 (odd steps, the fork)")
    _check(0 <= cfg.embed_split_stage <= 3, "embed_split_stage", cfg.embed_split_stage, "a stage: 0, 1, 2 or 3")
    _validate_adam_overrides(cfg.adam_overrides)
    for name in ("muon_momentum", "muon_momentum_start", "normuon_beta2"):
        v = getattr(cfg, name)
        _check(0.0 <= v < 1.0, name, v, "must be in [0, 1)")
    for name in ("muon_wd", "adam_wd", "grad_clip", "logit_softcap"):
        v = getattr(cfg, name)
        _check(math.isfinite(v) and v >= 0, name, v, "must be finite and >= 0")
    if world_size is not None:
        per_step = world_size * cfg.seq_len
        for b in cfg.batch_sizes:
            _check(b % per_step == 0, "batch_sizes", cfg.batch_sizes,
                   f"every global batch must be divisible by world_size x seq_len = {world_size} x {cfg.seq_len}"
                   f" = {per_step} (got {b})")
        _check(cfg.val_tokens % per_step == 0, "val_tokens", cfg.val_tokens,
               f"must be divisible by world_size x seq_len = {per_step}")
    return cfg


ORD_FIELDS = ("spectral_lr_mul", "spectral_lr_mul_attn", "spectral_lr_mul_mlp", "spectral_proj_eps", "ord_form",
              "ord_units", "ord_placement", "ord_reproject")
ADAM_OVERRIDE_KEYS = ("lr_mul", "wd_mul", "beta1", "beta2")


def _validate_ord(cfg: Config) -> None:
    if not cfg.ord:
        # ORD's options belong to train_gpt_muon_new.py: a standard run that names one is a mistake
        for name in ORD_FIELDS:
            default = Config.__dataclass_fields__[name].default
            _check(getattr(cfg, name) == default, name, getattr(cfg, name),
                   "an ORD option of train_gpt_muon_new.py; train_gpt.py runs standard Muon")
        return
    for name in ("spectral_lr_mul", "spectral_lr_mul_attn", "spectral_lr_mul_mlp"):
        v = getattr(cfg, name)
        if v is not None:
            _check(math.isfinite(v) and v >= 0, name, v, "must be finite and >= 0")
    _check(cfg.spectral_lr_mul is not None, "spectral_lr_mul", None, "a number >= 0 with ORD on")
    _check(math.isfinite(cfg.spectral_proj_eps) and cfg.spectral_proj_eps >= 0, "spectral_proj_eps",
           cfg.spectral_proj_eps, "must be finite and >= 0")
    _check(cfg.ord_form in ("interpolated", "projected"), "ord_form", cfg.ord_form, "interpolated or projected")
    _check(cfg.ord_units in ("fork", "mean"), "ord_units", cfg.ord_units, "fork or mean")
    _check(cfg.ord_placement in ("after_norm", "before_norm"), "ord_placement", cfg.ord_placement,
           "after_norm or before_norm")


def _validate_trackers(cfg: Config) -> None:
    from harness.trackers import TRACKERS

    for name in cfg.trackers:
        _check(name in TRACKERS, "trackers", ",".join(cfg.trackers), f"each one of {', '.join(TRACKERS)}")
    _check(len(set(cfg.trackers)) == len(cfg.trackers), "trackers", ",".join(cfg.trackers), "each tracker once")
    _check(bool(RUN_ID_PATTERN.match(cfg.tracker_project)) and ".." not in cfg.tracker_project, "tracker_project",
           cfg.tracker_project, "letters, digits and . _ = + , @ - only (no '/', no '..')")


def _validate_adam_overrides(overrides: Mapping[str, float]) -> None:
    from harness.params import ADAM_LABELS

    for key, value in overrides.items():
        label, _, what = key.partition(".")
        _check(label in (*ADAM_LABELS, "*") and what in ADAM_OVERRIDE_KEYS, "adam_overrides", key,
               f"keys are LABEL.KEY with LABEL one of *, {', '.join(ADAM_LABELS)} and KEY one of"
               f" {', '.join(ADAM_OVERRIDE_KEYS)}")
        if what.startswith("beta"):
            _check(0.0 <= value < 1.0, "adam_overrides", f"{key}={value}", "betas must be in [0, 1)")
        else:
            _check(math.isfinite(value) and value >= 0, "adam_overrides", f"{key}={value}", "must be finite and >= 0")


# ------------------------------------------------------------------------------------------
# Loading


def script_overrides(script: str) -> dict[str, Any]:
    """What an entry script fixes in the config (the launcher validates a run the same way)."""
    return {"ord": True} if Path(script).name == "train_gpt_muon_new.py" else {}


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def env_name(name: str) -> str:
    return name.upper()


# Fixed by the entry script (train_gpt.py, train_gpt_muon_new.py): neither flags nor env vars.
ENTRY_FIELDS = ("script", "ord")


def config_env(env: Mapping[str, str], ord_on: bool, quiet: bool = True) -> dict[str, str]:
    """The environment variables that set config fields for this run ({NAME: text}): a field's
    UPPER_SNAKE name, less torchrun's variables, PRESET (read first, on its own) and the entry
    script's fields. ORD variables count only for the ORD script: as the fork's train_gpt.py,
    one shell drives both scripts, so an ORD variable is not a standard run's business (a note
    says so unless quiet; a flag is, and is refused in validate)."""
    out = {}
    for name in field_names():
        key = env_name(name)
        if key in _RESERVED_ENV or name == "preset" or name in ENTRY_FIELDS or key not in env:
            continue
        if name in ORD_FIELDS and not ord_on:
            if not quiet:
                print(f"note: env {key} ignored: train_gpt.py runs standard Muon", file=sys.stderr)
            continue
        out[key] = env[key]
    return out


def field_docs() -> dict[str, str]:
    """Each field's help, from the dataclass itself (the one source): the comment on the field's
    line, else the comment lines right above it (section rules `# ---` excluded)."""
    return {name: doc for name, (doc, _) in _field_comments().items()}


def _field_comments() -> dict[str, tuple[str, str]]:
    """{field: (help, section)} read from this file's Config class: its comments and its
    `# --- section ---` rules."""
    import ast
    import io
    import tokenize

    text = Path(__file__).read_text()
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    cls = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "Config")
    out: dict[str, tuple[str, str]] = {}
    section, last = "", cls.lineno
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign):
            continue
        for ln in range(last, node.lineno):
            if ln in comments and comments[ln].startswith("---"):
                section = comments[ln].strip("- ")
        above, line = [], node.lineno - 1
        while line in comments and line not in code_lines and not comments[line].startswith("---"):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[ln] for ln in range(node.lineno, node.end_lineno + 1) if ln in comments]
        # a comment on the field's line is its own; a block above may speak for a group
        out[node.target.id] = (" ".join(trailing or above).strip(), section)
        last = node.end_lineno + 1
    return out


def _default_text(name: str) -> str:
    f = next(f for f in dataclasses.fields(Config) if f.name == name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    text = f"default {format_value(default)}"
    for preset, values in PRESETS.items():
        if name in values and values[name] != default:
            text += f"; {preset} preset {format_value(values[name])}"
    return text


def format_value(value: Any) -> str:
    """A value as its flag text (lists and dicts comma-separated, booleans 0|1)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value) or '""'
    if isinstance(value, dict):
        return ",".join(f"{k}={format_value(v)}" for k, v in value.items()) or '""'
    if value is None or value == "":
        return '""' if value == "" else "none"
    return str(value)


SCRIPT_DESCRIPTIONS = {
    "train_gpt.py": "Train a GPT with NorMuon on the hidden matrices and Adam on the rest (the standard run).",
    "train_gpt_muon_new.py": "The standard run with Orthogonal-Radial Decomposition inside Muon: rho = <G,W>/||W||^2,"
                             " G_par = rho W, orthogonalize G - s G_par, NorMuon, then add s G_par"
                             " (s = --spectral_lr_mul, 1.0 by default here).",
}


def build_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """The flags of every config field, grouped by the dataclass's sections, each with its help
    and default (from the dataclass and the presets)."""
    parser = ArgumentParser(
        prog=prog, allow_abbrev=False, usage="%(prog)s [--preset NAME] [--FIELD VALUE ...]",
        description=description or SCRIPT_DESCRIPTIONS.get(prog or "", SCRIPT_DESCRIPTIONS["train_gpt.py"]),
        epilog="Sources, lowest to highest priority: the preset (--preset or PRESET), environment variables"
               " named after a field in UPPER_SNAKE case (e.g. SEED=1; printed at start-up and recorded in"
               " the log's env line as config_env), then flags. Lists are comma-separated; a boolean flag"
               " alone means 1.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    comments = _field_comments()
    for name, tp in _field_types().items():
        if name in ENTRY_FIELDS:
            continue
        doc, section = comments.get(name, ("", ""))
        hidden = name in ORD_FIELDS and prog == "train_gpt.py"  # refused there: not offered
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section or "other"))
        base, _ = _base_type(tp)
        help_text = f"{doc or name.replace('_', ' ')} ({_default_text(name)})".replace("%", "%%")
        if base is bool:
            # `--flag` alone means true; `--flag 0` also works (for sweeps that pass values)
            group.add_argument(f"--{name}", nargs="?", const="1", default=None, metavar="0|1",
                               help=argparse.SUPPRESS if hidden else help_text)
        else:
            group.add_argument(f"--{name}", default=None, metavar=name.upper(),
                               help=argparse.SUPPRESS if hidden else help_text)
    return parser


def load_config(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    prog: str | None = None,
) -> Config:
    """Preset <- env vars <- flags <- overrides (e.g. what an entry script fixes, like `ord`)."""
    env = os.environ if env is None else env
    parser = build_parser(prog)
    args, unknown = parser.parse_known_args(list(argv) if argv is not None else None)
    if unknown:
        raise UserError(f"command line: unknown argument {unknown[0]!r} (see --help for the config fields)")
    flag_values = {k: v for k, v in vars(args).items() if v is not None}

    preset = flag_values.get("preset") or env.get("PRESET") or Config.preset
    if preset not in PRESETS:
        raise UserError(f"config: preset={preset!r} is unknown: one of {', '.join(sorted(PRESETS))}")
    values: dict[str, Any] = {"preset": preset}
    for name, value in PRESETS[preset].items():
        values[name] = _coerce(name, value, f"preset {preset}")
    ord_on = bool((overrides or {}).get("ord"))
    for key, text in config_env(env, ord_on, quiet=False).items():
        values[key.lower()] = parse_value(key.lower(), text, f"env {key}")
    for name, text in flag_values.items():
        if name != "preset":
            values[name] = parse_value(name, text, f"flag --{name}")
    for name, value in (overrides or {}).items():
        if name not in field_names():
            raise UserError(f"overrides: unknown config field {name!r}")
        values[name] = _coerce(name, value, "overrides")
    if values.get("ord") and values.get("spectral_lr_mul") is None:
        values["spectral_lr_mul"] = 1.0  # the ORD script's default, as the fork's SPECTRAL_LR_MUL
    return validate(Config(**values))


def config_from_dict(d: Mapping[str, Any], source: str = "config") -> Config:
    """Rebuild a Config from its to_dict() form (checkpoints, logs); unknown keys are an error."""
    unknown = sorted(set(d) - set(field_names()))
    if unknown:
        raise UserError(f"{source}: unknown config field {unknown[0]!r}")
    return Config(**{k: _coerce(k, v, source) for k, v in d.items()})
