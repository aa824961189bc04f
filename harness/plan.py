"""What a run will do, fixed before its first step (harness/trainer.py's main builds it).

resolve_plan validates the config and resolves everything the run depends on: the trackers it
can start, the compact vocabulary (its id table and the padded vocab_size), the fingerprint of
the shards, the checkpoint `--resume` names (loaded and checked on every rank), the run id, and
the per-step schedule. The result is a frozen RunPlan; the config it holds is a new Config with
the resolved run_id and vocab_size: the one given is never changed after validation.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from base import UserError
from data.shards import compact_vocab, find_shards, fingerprint, fingerprint_changes
from harness import checkpoint as ckpt_io
from harness import dist as hdist
from harness.config import Config, validate
from harness.schedule import Schedule, StepRecord


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from, as loaded on this rank."""
    path: Path
    checkpoint: dict[str, Any]


@dataclass(frozen=True)
class RunPlan:
    cfg: Config  # validated, with the resolved run_id (and vocab_size under compact_vocab)
    token_map: np.ndarray | None  # compact_vocab: GPT-2 id -> model id; None keeps the ids
    data: dict[str, list[dict]]  # the shards' fingerprint, saved in checkpoints
    resume: Resume | None
    schedule: Schedule
    steps: tuple[StepRecord, ...]  # one per training step

    @property
    def total(self) -> int:
        return len(self.steps)


def resolve_plan(cfg: Config, info: hdist.DistInfo) -> RunPlan:
    """The plan of a run on every rank (collective: every rank calls it). Bad input raises UserError."""
    validate(cfg, world_size=info.world_size)
    if cfg.trackers:  # a missing tracker package stops every rank before any work
        from harness.trackers import check_available

        check_available(cfg.trackers)
    token_map, cfg = resolve_vocab(cfg)
    data = data_fingerprint(cfg)
    resume = load_resume(cfg, info, data) if cfg.resume else None
    if resume is not None:
        cfg = dataclasses.replace(cfg, run_id=resume.checkpoint["run_id"])
    elif not cfg.run_id:
        cfg = dataclasses.replace(cfg, run_id=hdist.broadcast_object(default_run_id(cfg)))
    schedule = Schedule.from_config(cfg)
    return RunPlan(cfg=cfg, token_map=token_map, data=data, resume=resume, schedule=schedule,
                   steps=schedule.steps())


def default_run_id(cfg: Config) -> str:
    base = cfg.tag or (Path(cfg.script).stem if cfg.script else "run")
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def resolve_vocab(cfg: Config) -> tuple[np.ndarray | None, Config]:
    """With compact_vocab: the id table of the train+val shards (GPT-2 id -> model id), and a copy
    of cfg whose vocab_size is the ids they use, padded to a multiple of 128 (what the config line
    then records). Without: (None, cfg)."""
    if not cfg.compact_vocab:
        return None, cfg
    table, used = compact_vocab(find_shards(cfg.train_files, "train") + find_shards(cfg.val_files, "val"))
    return table, dataclasses.replace(cfg, vocab_size=max(128, math.ceil(used / 128) * 128))


def data_fingerprint(cfg: Config) -> dict[str, list[dict]]:
    """The cheap fingerprint of the train and val shards (data.shards.fingerprint) that
    checkpoints record, so a resume on changed data is refused instead of going on silently."""
    return {"train": fingerprint(find_shards(cfg.train_files, "train")),
            "val": fingerprint(find_shards(cfg.val_files, "val"))}


def _check_data(ckpt: dict[str, Any], data: dict[str, list[dict]], path: Path) -> None:
    saved = ckpt.get("data")
    if not isinstance(saved, dict):
        return  # a checkpoint from before fingerprints
    changes = [c for split in ("train", "val") for c in fingerprint_changes(saved.get(split) or [], data[split], split)]
    if changes:
        more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
        raise UserError(f"{path}: the data changed since this checkpoint was written: {'; '.join(changes[:3])}{more};"
                        " resuming would continue on other tokens (restore those shards, or start a new run)")


def load_resume(cfg: Config, info: hdist.DistInfo, data: dict[str, list[dict]]) -> Resume:
    """The checkpoint `--resume` names, loaded on every rank and checked against this run's
    config before anything is written. Rank 0 picks the file (\"latest\" looks at the directory)
    and every rank loads that one; a run without --run_id takes the checkpoint's."""
    loaded: dict[str, Any] = {}

    def pick() -> str:
        path, ckpt = ckpt_io.resolve(cfg)
        _check_data(ckpt, data, path)  # first: with compact_vocab, changed data also changes vocab_size
        ckpt_io.check_compatible(ckpt, cfg, path)
        loaded[str(path)] = ckpt
        return str(path)

    name = hdist.on_main_agreed(info, pick)
    error = None
    if name not in loaded:
        try:
            loaded[name] = ckpt_io.load(name)
            _check_data(loaded[name], data, Path(name))
            ckpt_io.check_compatible(loaded[name], cfg, Path(name))
        except UserError as e:
            error = str(e)
    hdist.all_agree_or_raise(info, error)
    ckpt = loaded[name]
    if ckpt["world_size"] != info.world_size and info.is_main:
        print(f"note: {name} was written at world size {ckpt['world_size']}, resuming at {info.world_size}:"
              " the Muon state is re-sharded; losses match to float tolerance, not bit for bit",
              file=sys.stderr, flush=True)
    return Resume(Path(name), ckpt)
