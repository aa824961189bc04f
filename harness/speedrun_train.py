"""The training loop for `model=speedrun` (the fork's GPT): harness/trainer.py's loop, with the
fork's data path, per-step forward schedule and loss units.

Per step (the fork's order): the forward schedule advances (YaRN on a long-window change; MTP
weights; windows), validation runs if due (the final one with the 20-block long window), then
`micro_batches // world_size` micro-batches of `batch_size // micro_batches` packed tokens each
(B = 1, BOS-aligned documents, data/packed.py).

Loss units, as the fork: the model's training loss is the SUM over the micro-batch's tokens of
the MTP-weighted soft-capped CE; each micro-batch backpropagates `loss * grad_scale` with
grad_scale = 2 / grad_accum, and the optimizer averages the gradients over ranks. So a gradient
here is the fork's gradient, whatever the world size. The logged train_loss is the per-token
mean of that weighted loss over the step (not the eval CE: MTP terms add to it in stages 1-2).

The optimizer (harness/optim.py) does the rest as the fork: embed/head tied until the split step
(the embedding starts as head.T), the per-label Adam settings, odd-step Adam, and Muon on the
q, k, v, o and MLP matrices of the model's parameter table.
"""

from __future__ import annotations

import time

import torch

from base import UserError
from data.packed import PackedTrainLoader, packed_val_batches
from data.shards import find_shards, read_header
from harness import dist as hdist
from harness.checkpoint import rng_state, set_rng_state
from harness.config import Config
from harness.optim import Optimizers
from harness.schedule import StepRecord
from harness.speedrun_model import SpeedrunFeatures, SpeedrunGPT
from harness.speedrun_schedule import ForwardSchedule, ForwardState
from harness.trainer import Trainer, _autocast, _sync, grad_unit, seed_everything


def _clone_tree(obj):
    """A deep copy of nested dicts/lists/tuples of tensors (state dicts on CPU share storage with
    the live tensors: a snapshot must not)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tree(v) for v in obj)
    return obj


def warmup_steps(schedule: ForwardSchedule) -> list[int]:
    """The fork's warm-up sample: steps 0, 1, 2 and every stage start +-1 (each batch size,
    window pair and MTP length the run will meet, and the odd/even Adam cadence around them),
    within the run."""
    starts = [start for start, _ in schedule.boundaries[1:]]
    steps = {0, 1, 2} | {s + d for s in starts for d in (-1, 0, 1)}
    return sorted(s for s in steps if 0 <= s < schedule.total)


def check_config(cfg: Config, world_size: int) -> None:
    """The speedrun model's own fields and batch arithmetic: one line naming field/value/allowed."""
    def check(cond, name, value, allowed):
        if not cond:
            raise UserError(f"config: {name}={value!r} is invalid: {allowed}")

    check(cfg.bigram_vocab_size >= 2, "bigram_vocab_size", cfg.bigram_vocab_size, "must be >= 2")
    check(cfg.window_block >= 1, "window_block", cfg.window_block, "must be >= 1")
    check(cfg.micro_batches >= 1 and cfg.micro_batches % world_size == 0, "micro_batches", cfg.micro_batches,
          f"must be a positive multiple of world_size={world_size}")
    check(cfg.num_scheduled_iterations >= 3, "num_scheduled_iterations", cfg.num_scheduled_iterations,
          "must be >= 3 with model=speedrun (three stages)")
    check(cfg.head_dim % 4 == 0, "num_heads", cfg.num_heads,
          f"model_dim/num_heads = {cfg.head_dim} must be a multiple of 4 with model=speedrun (half-truncated RoPE)")
    check(cfg.num_heads % 2 == 0, "num_heads", cfg.num_heads, "must be even with model=speedrun (paired heads)")
    check(cfg.model_dim >= 12, "model_dim", cfg.model_dim, "must be >= 12 with model=speedrun (gate inputs)")
    check(cfg.num_layers == 11, "num_layers", cfg.num_layers,
          "must be 11 with model=speedrun (the fork's layer layout; shrink model_dim instead)")
    check(cfg.diag_every == 0, "diag_every", cfg.diag_every, "must be 0 with model=speedrun (not wired yet)")
    check(cfg.val_batch_size > 0 and cfg.val_batch_size % cfg.micro_batches == 0, "val_batch_size",
          cfg.val_batch_size, f"must be a positive multiple of micro_batches={cfg.micro_batches}")
    check(cfg.val_tokens % cfg.val_batch_size == 0, "val_tokens", cfg.val_tokens,
          f"must be a multiple of val_batch_size={cfg.val_batch_size}")
    check(all(b % cfg.micro_batches == 0 for b in cfg.batch_sizes), "batch_sizes", cfg.batch_sizes,
          f"every value must be a multiple of micro_batches={cfg.micro_batches}")


class SpeedrunTrainer(Trainer):
    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        check_config(cfg, info.world_size)
        train_files, val_files = find_shards(cfg.train_files), find_shards(cfg.val_files)
        for f in train_files + val_files:
            read_header(f)
        self.val_files = val_files
        seed_everything(cfg.seed)
        self.grad_accum = cfg.micro_batches // info.world_size
        self.grad_scale = 2 / self.grad_accum  # the fork's: same gradient magnitude at any world size
        # RoPE tables cover the longest packed stream: a training or a validation micro-batch
        max_len = max(max(cfg.batch_sizes), cfg.val_batch_size) // cfg.micro_batches
        model = SpeedrunGPT(vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, model_dim=cfg.model_dim,
                            num_heads=cfg.num_heads, head_dim=cfg.head_dim, bigram_vocab_size=cfg.bigram_vocab_size,
                            max_seq_len=max_len, features=SpeedrunFeatures(), scalars_pad_world_size=info.world_size,
                            grad_scale=self.grad_scale).to(self.device)
        for p in model.parameters():
            hdist.broadcast_(p.data)
        self.model = model
        self.opt = Optimizers(model, cfg, info, split_step=self.schedule.split_step(cfg.embed_split_stage))
        self.opt.attach_backward_hooks()
        self.diag = None
        use_compile = cfg.compile == "on" or (cfg.compile == "auto" and self.device.type == "cuda")
        self.forward = torch.compile(model) if use_compile else model
        self.fwd_schedule = ForwardSchedule(cfg.num_scheduled_iterations, cfg.num_extension_iterations,
                                            cfg.window_block)
        self.fwd_state = ForwardState(self.fwd_schedule, model, self.device)
        self._fwd_args = (None, None)
        self.loader = PackedTrainLoader(train_files, num_tokens=cfg.batch_sizes[0], max_seq_len=cfg.seq_len,
                                        grad_accum=self.grad_accum, rank=info.rank, world_size=info.world_size,
                                        bigram_vocab_size=cfg.bigram_vocab_size, vocab_size=self.data_vocab)
        next(iter(self._val_iter()), None)  # a too-short val shard fails now

    # --- warm-up (the fork's "Warmup kernels"): compile and autotune every shape off the clock ---
    def run(self) -> int:
        if self.cfg.warmup:
            self.warmup()
        return super().run()

    def warmup(self) -> list[int]:
        """Run the training step (and one validation forward) at each of the fork's warm-up steps,
        so compilation and autotuning happen before the timer starts, then put back exactly what
        they changed: weights, optimizer state (Muon momentum / second moment, Adam moments, step
        counts, tie, pending gradients), loader position and sizes, RNG states, the RoPE tables and
        the forward-schedule cache. The timed run is then the run without warm-up, bit for bit."""
        steps = warmup_steps(self.fwd_schedule)
        saved = dict(model=_clone_tree(self.model.state_dict()), opt=_clone_tree(self.opt.state_dict()),
                     loader=_clone_tree(self.loader.state_dict()), rng=rng_state(self.device),
                     adam_stepped=self.opt._adam_stepped)
        _sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad()
        for p in self.model.parameters():
            p.grad = None
        for step in steps:
            args = self.forward_args(step)
            self.model.eval()
            with torch.no_grad(), _autocast(self.cfg, self.device):
                b = next(iter(self._val_iter()), None)
                if b is not None:
                    self.forward(*self._inputs(b), args)
            self.model.train()
            self.train_step(self.plan.steps[step], collect_stats=False)
        _sync(self.device)
        self.warmup_s = time.perf_counter() - t0
        for p in self.model.parameters():
            p.grad = None
        with torch.no_grad():
            self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])  # also puts back (or clears) Adam's pending gradients
        self.opt._adam_stepped = saved["adam_stepped"]
        self.loader.load_state_dict(saved["loader"])
        set_rng_state(saved["rng"], self.device)
        self.fwd_state.reset()
        self._fwd_args = (None, None)
        self.ord_stats = {}
        if self.log:
            self.log.write(f"warmup: steps {steps} in {self.warmup_s * 1000:.0f}ms (off the clock; state restored)")
        return steps

    def _val_iter(self):
        return packed_val_batches(self.val_files, val_tokens=self.cfg.val_tokens, val_batch_size=self.cfg.val_batch_size,
                                  grad_accum=self.grad_accum, rank=self.info.rank, world_size=self.info.world_size,
                                  bigram_vocab_size=self.cfg.bigram_vocab_size)

    def forward_args(self, step: int):
        if self._fwd_args[0] != step:
            self._fwd_args = (step, self.fwd_state.advance(step))
        return self._fwd_args[1]

    def _inputs(self, b):
        b = b.to(self.device)
        x, y = b.inputs, b.targets
        if self.token_map is not None:
            x, y = self.token_map[x.long()].to(torch.int32), self.token_map[y]
        return x, y, b.cum_lengths, b.bigram

    @torch.no_grad()
    def validate(self) -> float:
        args = self.forward_args(self.state.step)
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        with _autocast(self.cfg, self.device):
            for b in self._val_iter():
                total += self.forward(*self._inputs(b), args).double()
                n += 1
        self.model.train()
        loss = torch.stack([total / max(n, 1)]).float()
        return float(hdist.all_reduce_mean_(loss).item())

    def train_step(self, record: StepRecord, collect_stats: bool) -> float:
        cfg, step = self.cfg, record.step
        args = self.forward_args(step)
        sizes = (record.batch_tokens, cfg.seq_len, self.grad_accum)
        if self.loader.sizes != sizes:
            self.loader.set_sizes(*sizes)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        for i in range(self.grad_accum):
            x, y, cu, bigram = self._inputs(self.loader.next_batch())
            self.opt.set_sync(i == self.grad_accum - 1)
            with _autocast(cfg, self.device):
                loss = self.forward(x, y, cu, bigram, args)
            (loss * self.grad_scale).backward()
            loss_sum += loss.detach().double()
            tokens += x.numel()
        # the gradients are the fork's already; unit_scale converts for ord_units=mean
        _, self.ord_stats = self.opt.step(step, record.lr_mul, record.muon_momentum,
                                          unit_scale=grad_unit(record.batch_tokens),
                                          collect_stats=collect_stats, clip=cfg.grad_clip)
        self.opt.zero_grad()
        per_token = (loss_sum / tokens).float().reshape(1)
        return float(hdist.all_reduce_mean_(per_token).item())
