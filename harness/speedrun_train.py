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

import torch

from base import UserError
from data.packed import PackedTrainLoader, packed_val_batches
from data.shards import find_shards, read_header
from harness import dist as hdist
from harness.config import Config
from harness.optim import Optimizers
from harness.speedrun_model import SpeedrunFeatures, SpeedrunGPT
from harness.speedrun_schedule import ForwardSchedule, ForwardState
from harness.trainer import Trainer, _autocast, grad_unit, seed_everything


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

    def train_step(self, step: int, collect_stats: bool) -> float:
        cfg = self.cfg
        args = self.forward_args(step)
        sizes = (self.schedule.batch_size(step), cfg.seq_len, self.grad_accum)
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
        _, self.ord_stats = self.opt.step(step, self.schedule.lr_mul(step), self.schedule.muon_momentum(step),
                                          unit_scale=grad_unit(self.schedule.batch_size(step)),
                                          collect_stats=collect_stats, clip=cfg.grad_clip)
        self.opt.zero_grad()
        per_token = (loss_sum / tokens).float().reshape(1)
        return float(hdist.all_reduce_mean_(per_token).item())
