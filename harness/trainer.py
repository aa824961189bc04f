"""The training loop shared by train_gpt.py and train_gpt_muon_new.py.

One run: set up the process group, resolve the config into a frozen plan (harness/plan.py:
validated config, vocabulary, data fingerprint, resume checkpoint, one StepRecord per step), open
the run log (rank 0), then walk the plan's steps: validation where due, then the training step.
The global batch is fixed in tokens whatever the world size: each rank gets its share and
accumulates gradients over micro-batches of `device_batch_tokens`. Timing excludes validation (and, on CUDA, is synchronized).

Checkpoints (harness/checkpoint.py): `--save_every N`, `--save_final`, `--resume PATH|latest`
(same run id, same log, a `resumed from step N` line). SIGTERM (Slurm, or torchrun forwarding
it) stops every rank at the end of the current step with a checkpoint, `status:preempted step:N`
in the log and exit code 0 (EXIT_PREEMPTED).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from base import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER_ERROR, UserError, dir_write_error
from data.loader import DistributedTokenLoader, val_batches
from data.shards import find_shards, read_header
from harness import checkpoint as ckpt_io
from harness import dist as hdist
from harness.config import Config, config_env, load_config
from harness.diagnostics import SpectralDiagnostics
from harness.malloc import keep_freed_memory
from harness.build import build_model, build_optimizers
from harness.preemption import StopRequest, hold_for_test
from harness.logs.lock import RunLock
from harness.logs.format import RunLogWriter, log_path
from harness.logs.provenance import environment, project_sources
from harness.plan import RunPlan, resolve_plan
from harness.schedule import StepRecord


@dataclass
class RunState:
    step: int = 0  # training steps done
    train_time_ms: float = 0.0
    last_val_loss: float = float("nan")
    val_step: int = -1  # the step of the last validation (a resumed run does not redo it)
    initial_val_loss: float = float("nan")  # the step-0 val loss, the divergence rule's reference
    val_above: int = 0  # validations in a row above diverge_ratio x initial_val_loss


def grad_unit(batch_tokens: int) -> float:
    """The fork's gradient units over the mean loss's: it sums the loss over each rank's
    micro-batches of B/8 tokens, scales by grad_scale = 2 / grad_accum_steps (8 / world_size
    micro-batches) and averages over ranks, which is B/4 x the gradient of the mean loss at any
    world size (32768, 65536 and 98304 for the speedrun's three batch sizes)."""
    return batch_tokens / 4


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(cfg: Config, device: torch.device):
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    def __init__(self, plan: RunPlan, info: hdist.DistInfo):
        self.plan = plan
        self.cfg = plan.cfg
        self.info = info
        self.device = info.device
        # compact_vocab: GPT-2 id -> model id (harness/plan.py); None keeps the ids as they are
        self.token_map = None if plan.token_map is None else torch.from_numpy(plan.token_map).to(self.device)
        # the shards' ids are checked against this: any uint16 id is in a compact table's range
        self.data_vocab = 2 ** 16 if plan.token_map is not None else plan.cfg.vocab_size
        self.schedule = plan.schedule
        self.log: RunLogWriter | None = None
        self.state = RunState()
        self.resumed_step: int | None = None  # the step of the checkpoint this run resumed from
        self.stop = StopRequest()  # main() installs its SIGTERM/SIGINT handler
        self.ord_stats: dict[str, dict[str, float]] = {}  # the last step's, when collected

    # --- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        train_files = find_shards(cfg.train_files, "train")
        val_files = find_shards(cfg.val_files, "val")
        for f in train_files + val_files:
            read_header(f)  # magic, version and size of every shard, before anything is written
        self.val_files = val_files
        seed_everything(cfg.seed)
        model = build_model(cfg).to(self.device)
        # every rank built the same model from the same seed; broadcast anyway so a rank
        # that somehow differs can never train a different model silently
        for p in model.parameters():
            hdist.broadcast_(p.data)
        if self.device.type == "cuda" and hasattr(model, "set_attention"):
            model.set_attention("flex")
        self.model = model
        self.opt = build_optimizers(model, cfg, info, split_step=self.schedule.split_step(cfg.embed_split_stage))
        self.opt.attach_backward_hooks()
        self.diag = SpectralDiagnostics(cfg, info, self.opt, model) if cfg.diag_every > 0 else None
        use_compile = cfg.compile == "on" or (cfg.compile == "auto" and self.device.type == "cuda")
        self.forward = torch.compile(model) if use_compile else model
        self.loader = DistributedTokenLoader(
            train_files,
            seq_len=cfg.seq_len,
            rank=info.rank,
            world_size=info.world_size,
            vocab_size=self.data_vocab,
            align_bos=cfg.align_bos,
            device=self.device,
            sampling=cfg.sampling,
            seed=cfg.seed,
        )
        self.val_batch_tokens = self._val_batch_tokens()
        # fail on a too-short val shard now, not at the first validation
        next(iter(self._val_iter()), None)

    def _val_batch_tokens(self) -> int:
        cfg, W = self.cfg, self.info.world_size
        per_rank = max(cfg.seq_len, min(cfg.device_batch_tokens, cfg.val_tokens // W))
        per_rank -= per_rank % cfg.seq_len
        while (cfg.val_tokens // W) % per_rank:
            per_rank -= cfg.seq_len
        return per_rank * W

    def _val_iter(self):
        return val_batches(
            self.val_files,
            val_tokens=self.cfg.val_tokens,
            seq_len=self.cfg.seq_len,
            rank=self.info.rank,
            world_size=self.info.world_size,
            batch_tokens=self.val_batch_tokens,
            vocab_size=self.data_vocab,
            device=self.device,
        )

    def _ids(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x, y) if self.token_map is None else (self.token_map[x], self.token_map[y])

    def open_log(self, sources: list[tuple[str, str]]) -> None:
        cfg = self.cfg
        if not self.info.is_main:
            return
        path = log_path(cfg.log_dir, cfg.run_id)
        env = environment(self.info)
        smi = env.pop("_nvidia_smi", None)
        # the config fields this run took from environment variables (none: flags and preset only)
        from_env = config_env(os.environ, cfg.ord)
        env["config_env"] = ",".join(f"{k}={'_'.join(v.split())}" for k, v in from_env.items()) or "none"
        if self.resumed_step is not None and path.exists():
            # the same run goes on in the same log; the parser drops what was logged after the
            # checkpoint. A line cut by the kill is ended first so it cannot swallow ours.
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
            self.log = RunLogWriter(path, cfg.run_id, append=True)
            if cut:
                self.log.raw("")
            self.log.resumed(self.resumed_step)
            self.log.env(env)
            return
        self.log = RunLogWriter(path, cfg.run_id)
        self.log.header(sources, env, self.config_record())
        if smi:
            self.log.raw(smi)
        self.log.write(f"log: {path}")
        if self.resumed_step is not None:  # resumed from a checkpoint whose log is not here
            self.log.resumed(self.resumed_step)

    def attach_trackers(self) -> None:
        """The experiment trackers of --trackers (rank 0), fed by the run log's own records."""
        if self.log is None or not self.cfg.trackers:
            return
        from harness.trackers import open_sinks

        self.log.listeners.append(open_sinks(self.cfg, self.config_record(), self.resumed_step))

    def config_record(self) -> dict[str, Any]:
        record = self.cfg.to_dict()
        record["world_size"] = self.info.world_size
        record["param_assignment"] = self.opt.assignment
        return record

    # --- checkpoints ----------------------------------------------------------------------
    def restore(self, ckpt: dict[str, Any], path: Path) -> None:
        """Continue from a loaded checkpoint (after setup): every rank takes its share."""
        saved = ckpt_io.restore(ckpt, path, model=self.model, opt=self.opt, loader=self.loader, info=self.info)
        self.state = RunState(**saved)
        self.resumed_step = self.state.step

    def save_checkpoint(self) -> Path:
        path = ckpt_io.save(self.cfg, self.info, step=self.state.step, model=self.model, opt=self.opt,
                            loader=self.loader, run_state=dataclasses.asdict(self.state), data=self.plan.data)
        if self.log:
            self.log.write(f"checkpoint: {path}")
        return path

    def _save_due(self, step: int) -> bool:
        cfg = self.cfg
        if step == self.resumed_step:  # that checkpoint exists already
            return False
        periodic = cfg.save_every > 0 and step > 0 and step % cfg.save_every == 0
        return periodic or (cfg.save_final and step == self.plan.total)

    def _preempted(self, step: int) -> int:
        path = self.save_checkpoint() if step != self.resumed_step else None
        if self.log:
            self.log.status("preempted", step=step)
        if self.info.is_main:
            where = path or ckpt_io.step_path(ckpt_io.run_dir(self.cfg), step)
            print(f"preempted at step {step}; checkpoint {where}; continue with"
                  f" --resume latest --run_id {self.cfg.run_id}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED

    # --- steps ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        with _autocast(self.cfg, self.device):
            for x, y in self._val_iter():
                x, y = self._ids(x, y)
                total += self.forward(x, y).double()
                n += 1
        self.model.train()
        loss = torch.stack([total / max(n, 1)]).float()
        return float(hdist.all_reduce_mean_(loss).item())

    def train_step(self, record: StepRecord, collect_stats: bool) -> float:
        cfg, step, batch_tokens = self.cfg, record.step, record.batch_tokens
        x, y = self._ids(*self.loader.next_batch(batch_tokens))
        micro = max(1, cfg.device_batch_tokens // cfg.seq_len)
        chunks = list(zip(x.split(micro), y.split(micro)))
        n_seqs = x.size(0)
        # Gradients in the fork's units: (B / 4) x the gradient of the mean loss (harness/optim.py)
        unit = grad_unit(batch_tokens)
        loss_sum = torch.zeros((), device=self.device)
        for i, (xc, yc) in enumerate(chunks):
            self.opt.set_sync(i == len(chunks) - 1)
            with _autocast(cfg, self.device):
                loss = self.forward(xc, yc)
            # weight by the chunk's share so the accumulated gradient is this rank's mean (x unit)
            (loss * (xc.size(0) / n_seqs * unit)).backward()
            loss_sum += loss.detach() * (xc.size(0) / n_seqs)
        diag = self.diag is not None and self.diag.due(step)
        if diag:
            self.diag.begin(step)
        # clipping (cfg.grad_clip) happens inside, on the averaged gradients
        _, self.ord_stats = self.opt.step(step, record.lr_mul, record.muon_momentum, unit_scale=unit,
                                          collect_stats=collect_stats, clip=cfg.grad_clip)
        if diag:
            self.diag.end(step)  # reads the Adam gradients: before zero_grad
        self.opt.zero_grad()
        return float(hdist.all_reduce_mean_(loss_sum.reshape(1)).item())

    def run(self) -> int:
        """The plan's steps from where the state stands (0, or the resumed step): at each step
        boundary a stop check, validation and checkpoint when due, then the step's training."""
        state = self.state
        for step in range(state.step, self.plan.total):
            code = self._at_boundary(step)
            if code is not None:
                return code
            code = self._train(self.plan.steps[step])
            if code is not None:
                return code
        code = self._at_boundary(self.plan.total)
        if code is not None:
            return code
        if self.log:
            self.log.status("finished", final_val_loss=state.last_val_loss, step=self.plan.total,
                            train_time=f"{state.train_time_ms:.0f}ms")
        return 0

    def _at_boundary(self, step: int) -> int | None:
        """Before training step `step` (or after the last, step == total): the exit code when the
        run stops here (preempted, diverged), else None."""
        state = self.state
        # every rank stops at the same step: the SIGTERM flag is agreed on once per step
        if self.stop.agreed(self.info):
            return self._preempted(step)
        if self._validate_due(step) and state.val_step != step:
            val_loss = self.validate()
            state.val_step = step
            self._log_step(step, self._record_at(step), val_loss=val_loss)
            if not math.isfinite(val_loss):
                return self._diverged(step)
            if self._stays_above_start(step, val_loss):
                return self._diverged(step, val_loss=val_loss)
        if self._save_due(step):
            self.save_checkpoint()
        return None

    def _validate_due(self, step: int) -> bool:
        return step == self.plan.total or self.plan.steps[step].validate_before

    def _record_at(self, step: int) -> StepRecord:
        """The record a validation at `step` logs: the step's own, the last one after the end."""
        return self.plan.steps[min(step, self.plan.total - 1)]

    def _train(self, record: StepRecord) -> int | None:
        """Training step record.step, timed and logged: the exit code when its loss is not finite."""
        state = self.state
        collect = self.cfg.ord and record.validate_before
        _sync(self.device)
        t0 = time.perf_counter()
        train_loss = self.train_step(record, collect_stats=collect)
        _sync(self.device)
        state.train_time_ms += (time.perf_counter() - t0) * 1000
        state.step = record.step + 1
        self._log_step(state.step, record, train_loss=train_loss)
        hold_for_test(state.step, self.stop)  # off unless HARNESS_TEST_HOLD is set
        if collect:
            self._log_ord_stats(record.step)
        if self.diag is not None:
            self._log_diag()
        if not math.isfinite(train_loss):
            return self._diverged(state.step)
        return None

    def _log_step(self, step: int, record: StepRecord, val_loss: float | None = None,
                  train_loss: float | None = None) -> None:
        """A step line: the batch size and LR multiplier are those of `record` (the step trained,
        or the one about to be)."""
        if val_loss is not None:
            self.state.last_val_loss = val_loss
        if not self.log:
            return
        s = self.state
        avg = s.train_time_ms / max(s.step, 1) if s.step else 0.0
        self.log.step(
            step,
            self.plan.total,
            val_loss=val_loss,
            train_loss=train_loss,
            train_time_ms=s.train_time_ms,
            step_avg_ms=avg,
            lr_mul=record.lr_mul,
            batch_size=record.batch_tokens,
        )

    def _log_diag(self) -> None:
        for step, layer, metrics in self.diag.take_records():
            if self.log:
                self.log.diag(step, layer, **metrics)

    def _log_ord_stats(self, step: int) -> None:
        if not self.log:
            return
        for name, stats in self.ord_stats.items():
            self.log.diag(step, name, **stats)

    def _stays_above_start(self, step: int, val_loss: float) -> bool:
        """The divergence rule (diverge_ratio, diverge_patience in the config): the val loss is
        above diverge_ratio x the step-0 val loss at diverge_patience validations in a row. A
        run that learns never gets there (its loss falls below the start within a few steps);
        one whose LR is far too large saturates the logit cap well above it and stays there."""
        cfg, state = self.cfg, self.state
        if step == 0:
            state.initial_val_loss, state.val_above = val_loss, 0
            return False
        if cfg.diverge_ratio <= 0 or cfg.diverge_patience <= 0 or not math.isfinite(state.initial_val_loss):
            return False
        state.val_above = state.val_above + 1 if val_loss > cfg.diverge_ratio * state.initial_val_loss else 0
        return state.val_above >= cfg.diverge_patience

    def _diverged(self, step: int, val_loss: float | None = None) -> int:
        if val_loss is None:
            why, fields = f"loss is not finite at step {step}", {}
        else:
            start = self.state.initial_val_loss
            why = (f"val loss {val_loss:.4f} at step {step} is above {self.cfg.diverge_ratio:g} x the step-0 val loss"
                   f" {start:.4f} at {self.cfg.diverge_patience} validations in a row (diverge_ratio, diverge_patience)")
            fields = {"val_loss": f"{val_loss:.4f}", "initial_val_loss": f"{start:.4f}"}
        if self.log:
            self.log.status("diverged", step=step, **fields)
        if self.info.is_main:
            print(f"error: {why}: diverged", file=sys.stderr)
        return EXIT_DIVERGED


def _print_error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    return "_".join(f"{type(e).__name__}:{e}".split())[:300]


def main(script: str, argv: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None) -> int:
    """Entry point of the train scripts: returns the process exit code."""
    t_start = time.perf_counter()
    script_name = Path(script).name
    try:
        cfg = load_config(argv, overrides={"script": script_name, **(overrides or {})}, prog=script_name)
        info = hdist.init(cfg.dist_timeout_s)
    except UserError as e:
        _print_error(str(e))
        return EXIT_USER_ERROR
    from_env = config_env(os.environ, cfg.ord)
    if from_env and info.is_main:  # a stray SEED or DTYPE in a shell must not change a run unseen
        print(f"note: config from the environment: {' '.join(f'{k}={v}' for k, v in from_env.items())}",
              file=sys.stderr)
    if info.device.type == "cpu":
        keep_freed_memory()
    trainer: Trainer | None = None
    locks: list[RunLock] = []
    stop = StopRequest().install()
    try:
        plan = resolve_plan(cfg, info)  # everything the run depends on, fixed before any work
        hdist.on_main_agreed(info, lambda: locks.append(_claim(plan)))
        if plan.cfg.model == "speedrun":  # the fork's GPT, data path and forward schedule
            from harness.speedrun_train import SpeedrunTrainer as trainer_cls
        else:
            trainer_cls = Trainer
        trainer = trainer_cls(plan, info)
        trainer.stop = stop
        trainer.setup()
        if plan.resume is not None:
            trainer.restore(plan.resume.checkpoint, plan.resume.path)
        trainer.open_log(project_sources(script))
        hdist.on_main_agreed(info, trainer.attach_trackers)  # a tracker that cannot start stops every rank
        code = trainer.run()
    except UserError as e:
        if trainer and trainer.log:
            trainer.log.status("failed", reason=_reason(e), step=trainer.state.step)
        if info.is_main:
            _print_error(str(e))
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        if trainer and trainer.log:
            trainer.log.status("interrupted", step=trainer.state.step)
        code = EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - any crash still ends the log with a status line
        if info.distributed and hdist.is_timeout(e):
            msg = _timeout_message(e)
            if trainer and trainer.log:
                trainer.log.status("failed", reason="_".join(msg.split())[:300], step=trainer.state.step)
            if info.is_main:
                _print_error(msg)
        else:
            if trainer and trainer.log:
                trainer.log.status("failed", reason=_reason(e), step=trainer.state.step)
            traceback.print_exc()
        code = 1
    finally:
        stop.uninstall()
        if trainer and trainer.log:
            if info.is_main:
                if code == 0:  # the one line a user reads at the end (make demo)
                    s = trainer.state
                    print(f"done: val loss {s.last_val_loss:.4f} after {s.step} steps; {s.train_time_ms / 1000:.0f} s"
                          f" of training, {time.perf_counter() - t_start:.0f} s in all", flush=True)
                print(f"run log: {trainer.log.path}", flush=True)
            trainer.log.close()
        for lock in locks:
            lock.release()
    hdist.shutdown(info)
    return code


def _claim(plan: RunPlan) -> RunLock:
    """The checks that only the main rank can make (every rank must agree on their outcome):
    the run id's lock (one run id, one writer), no log to overwrite, a writable checkpoint dir."""
    cfg = plan.cfg
    lock = RunLock(cfg.log_dir, cfg.run_id).acquire()
    try:
        if plan.resume is None:
            _refuse_existing_log(log_path(cfg.log_dir, cfg.run_id))
        if cfg.save_every > 0 or cfg.save_final:
            _check_checkpoint_dir(cfg)  # not at the first save, after the training
    except BaseException:
        lock.release()
        raise
    return lock


def _timeout_message(e: BaseException) -> str:
    ranks = hdist.unresponsive_ranks()
    limit = f"{hdist.timeout_s():g}s"
    if ranks:
        who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} did not answer"
    else:
        who = "a rank did not answer"
    return (f"{who} within the process-group timeout of {limit} (dist_timeout_s; frozen, stopped or"
            f" overloaded?): {' '.join(str(e).split())[:160]}")


def _check_checkpoint_dir(cfg: Config) -> None:
    base = Path(cfg.checkpoint_dir)
    directory = ckpt_io.run_dir(cfg)
    e = dir_write_error(directory)
    if e is not None:
        if any(p.exists() and not p.is_dir() for p in (base, directory)):
            what = "is a file, not a directory"
        else:
            what = f"cannot write there ({e.strerror or e})"
        raise UserError(f"checkpoint_dir={cfg.checkpoint_dir!r}: {what}; checkpoints go to {directory}"
                        " (pass --checkpoint_dir DIR with a writable directory, or save no checkpoints)") from None


def _refuse_existing_log(path: Path) -> None:
    if path.exists():
        raise UserError(
            f"{path}: a run log with this run_id already exists; refusing to overwrite it"
            " (choose another RUN_ID)"
        )
