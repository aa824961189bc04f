"""Checkpoints: what a run needs to continue bit for bit, written so that a crash never leaves
one that loads wrongly.

Where: `<checkpoint_dir>/<run_id>/step_<N>.pt`, one file per saved step; the last `keep_last`
are kept. "latest" is the newest of them that loads and checks.

One file, gathered on rank 0 (not one file per rank). The sharded Muon state (momentum and the
NorMuon second moment: each rank holds its share of the matrices) is all-gathered at save time,
which costs one all-gather of the Muon momentum per save, small next to the steps between saves.
In return a checkpoint is a single `os.replace`d file, so it is either all there or not there
(no manifest, no partial set of shards to detect), and it holds the state in matrix order
without padding, so it loads at any world size: each rank takes its own share on load.
The model and Adam state are identical on every rank (Adam is all-reduced, not sharded), so
rank 0's copy is the whole of it. RNG states are saved per rank.

Contents (only tensors and plain containers, so `torch.load(weights_only=True)` reads it):
format/version, run_id, step, world_size, the config (`Config.to_dict()`), the RunState,
model, optimizer (whole Muon state + Adam), the loader position (batches consumed, not the
prefetched one) and the RNG states of torch, numpy and python's random (and CUDA's).

On resume the saved config must equal this run's, except the fields in MAY_DIFFER_ON_RESUME
(where checkpoints and logs go, how often to save or validate, diagnostics, compilation): those
change what a run records, never what it trains. Any other difference, a model of another
shape, a truncated or corrupt file or a missing path stops the run with one line naming the
file and what differs, before the log is touched.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from base import UserError, atomic_write
from harness import dist as hdist
from harness.config import Config, field_names

FORMAT = "harness-checkpoint"
VERSION = 1
STEP_FILE_RE = re.compile(r"^step_(\d+)\.pt$")

# Fields that change what a run records or how it runs, never the numbers it trains: a resumed
# run may set them differently. Everything else must match the checkpoint.
MAY_DIFFER_ON_RESUME = frozenset({
    "resume", "save_every", "save_final", "keep_last", "checkpoint_dir", "log_dir",
    "val_loss_every", "val_loss_last_steps", "val_loss_every_last",
    "diag_every", "diag_sample", "diag_topk", "diag_embed_head", "diag_spectra",
    "compile", "warmup", "dist_timeout_s", "diverge_ratio", "diverge_patience",
    "trackers", "tracker_dir", "tracker_project",
})
# run_id is checked on its own (a missing --run_id adopts the checkpoint's)
_NOT_COMPARED = MAY_DIFFER_ON_RESUME | {"run_id"}
_REQUIRED = ("run_id", "step", "world_size", "config", "run_state", "model", "optim", "loader", "rng")


# ------------------------------------------------------------------------------------------
# Paths


def run_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint_dir) / cfg.run_id


def step_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the step_<N>.pt files in directory, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = STEP_FILE_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


# ------------------------------------------------------------------------------------------
# RNG states as tensors and plain values


def rng_state(device: torch.device) -> dict[str, Any]:
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------
# Saving


def build_state(cfg: Config, info: hdist.DistInfo, *, step: int, model: torch.nn.Module, opt,
                loader, run_state: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The checkpoint contents. A collective (the Muon state and RNG states are gathered):
    every rank calls it; rank 0 gets the dict, the others None."""
    optim = opt.state_dict()
    rngs = hdist.all_gather_object(rng_state(info.device))
    if not info.is_main:
        return None
    return {
        "format": FORMAT,
        "version": VERSION,
        "run_id": cfg.run_id,
        "step": int(step),
        "world_size": info.world_size,
        "config": cfg.to_dict(),
        "run_state": dict(run_state),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optim": optim,
        "loader": loader.state_dict(),
        "rng": rngs,
        **({"data": data} if data is not None else {}),  # the shards' fingerprint (data.shards)
    }


def write_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename it over `path`: a process
    killed at any moment leaves either no file or the complete one under that name.

    No fsync: it tripled the save time here (the write waits for the disk instead of the page
    cache) and guards only against a machine crash, after which a torn file fails load()'s
    CRC-32 check and `latest` falls back to the previous checkpoint (keep_last >= 2)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints, and temp files of crashed saves."""
    for _, p in list_checkpoints(directory)[:-keep_last]:
        p.unlink(missing_ok=True)
    for pattern in (".step_*.pt.*.tmp", ".step_*.pt.tmp*"):  # base.atomic_write's; before it, `.NAME.tmpPID`
        for p in directory.glob(pattern):
            p.unlink(missing_ok=True)


def save(cfg: Config, info: hdist.DistInfo, *, step: int, model, opt, loader,
         run_state: dict[str, Any], data: dict[str, Any] | None = None) -> Path:
    """Write `<checkpoint_dir>/<run_id>/step_<step>.pt` and prune to keep_last. Every rank calls
    it; rank 0 writes; all return once the file is in place."""
    path = step_path(run_dir(cfg), step)
    state = build_state(cfg, info, step=step, model=model, opt=opt, loader=loader, run_state=run_state, data=data)
    error = None
    if state is not None:
        try:
            write_atomic(state, path)
            prune(path.parent, cfg.keep_last)
        except (OSError, RuntimeError) as e:
            # torch's zip writer reports a full disk as a RuntimeError ("file write failed")
            try:
                free = f"; {shutil.disk_usage(path.parent).free} bytes free there"
            except OSError:
                free = ""
            error = (f"{path}: cannot write checkpoint ({_short(e)}{free}); the earlier checkpoints are kept"
                     " (free some space, then --resume latest)")
    hdist.all_agree_or_raise(info, error)
    return path


# ------------------------------------------------------------------------------------------
# Loading and checking


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:160]


def _damaged_record(path: Path) -> str | None:
    """The first record of the checkpoint (a zip archive) whose CRC-32 does not match, or None.
    torch.load does not check them, so a flipped bit in tensor data would load silently."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"(archive: {_short(e)})"


def load(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read and check a checkpoint file: weights_only (no arbitrary pickles), the structure,
    and (verify) every record's CRC-32, checked in a thread while torch.load reads the file
    (zlib's crc32 releases the GIL), so the check costs little wall time."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise UserError(f"{path}: not a checkpoint file")
    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-crc") as pool:
        damaged = pool.submit(_damaged_record, path) if verify else None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - zip, pickle and weights_only errors all mean the same here
            raise UserError(f"{path}: cannot read checkpoint (truncated or corrupt?): {_short(e)}") from None
        bad = damaged.result() if damaged else None
    if bad:
        raise UserError(f"{path}: checkpoint is corrupt: record {bad} fails its CRC-32 check")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint of this harness (no format={FORMAT!r} marker)")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt.get('version')!r}; this harness reads version {VERSION}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise UserError(f"{path}: checkpoint is incomplete: no {', '.join(missing)}")
    if not isinstance(ckpt["step"], int) or not isinstance(ckpt["config"], dict):
        raise UserError(f"{path}: checkpoint is corrupt: step or config has the wrong type")
    return ckpt


def config_mismatches(saved: dict[str, Any], cfg: Config) -> list[str]:
    """`field=saved (checkpoint) vs now` for each field that must match and does not. A field
    unknown to the checkpoint (added since) matches when it is at its default here."""
    now = cfg.to_dict()
    defaults = Config().to_dict()
    out = []
    for name in field_names() + sorted(set(saved) - set(now)):
        if name in _NOT_COMPARED:
            continue
        if name not in now:
            out.append(f"{name}={saved[name]!r} in the checkpoint is not a config field of this version")
            continue
        was = saved.get(name, defaults[name])
        if was != now[name]:
            out.append(f"{name}={was!r} in the checkpoint, {now[name]!r} now")
    return out


def check_compatible(ckpt: dict[str, Any], cfg: Config, path: Path, model: torch.nn.Module | None = None) -> None:
    """UserError naming the file and every mismatching field (config) or tensor (model shape)."""
    if cfg.run_id and ckpt["run_id"] != cfg.run_id:
        raise UserError(f"{path}: checkpoint of run_id {ckpt['run_id']!r}, not {cfg.run_id!r}"
                        f" (pass --run_id {ckpt['run_id']} or omit --run_id)")
    bad = config_mismatches(ckpt["config"], cfg)
    if bad:
        raise UserError(f"{path}: checkpoint is from another config: {'; '.join(bad)}"
                        f" (fields that may differ on resume: {', '.join(sorted(MAY_DIFFER_ON_RESUME))})")
    if model is not None:
        check_model_shape(ckpt["model"], model, path)


def check_model_shape(saved: dict[str, Any], model: torch.nn.Module, path: Path) -> None:
    here = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = []
    for k in sorted(set(here) | set(saved)):
        t = saved.get(k)
        if k not in saved:
            bad.append(f"{k} missing from the checkpoint")
        elif k not in here:
            bad.append(f"{k} in the checkpoint is not in this model")
        elif not isinstance(t, torch.Tensor) or tuple(t.shape) != here[k]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            bad.append(f"{k} is {shape} in the checkpoint, {here[k]} here")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UserError(f"{path}: checkpoint model has another shape: {'; '.join(bad[:3])}{more}")


def resolve(cfg: Config) -> tuple[Path, dict[str, Any]]:
    """The checkpoint `--resume` names, loaded and checked: `latest` (the newest valid one of
    cfg.run_id; older ones are tried when a newer one is damaged), a run's checkpoint directory
    (the same, within it) or a step file."""
    spec = cfg.resume
    if spec == "latest":
        if not cfg.run_id:
            raise UserError("--resume latest needs the run id: pass --run_id RUN_ID (or RUN_ID=...),"
                            f" the run whose checkpoints are in {cfg.checkpoint_dir}/<run_id>/")
        return _newest_valid(run_dir(cfg))
    path = Path(spec)
    if path.is_dir():
        return _newest_valid(path)
    return path, load(path)


def _newest_valid(directory: Path) -> tuple[Path, dict[str, Any]]:
    found = list_checkpoints(directory)
    if not found:
        raise UserError(f"{directory}: no checkpoint to resume from (no step_<N>.pt files)")
    errors = []
    for _, p in reversed(found):
        try:
            return p, load(p)
        except UserError as e:
            errors.append(str(e))
            print(f"warning: skipping damaged checkpoint: {e}", file=sys.stderr, flush=True)
    raise UserError(f"{directory}: no valid checkpoint among {len(found)}: {errors[0]}")


# ------------------------------------------------------------------------------------------
# Restoring


def restore(ckpt: dict[str, Any], path: Path, *, model: torch.nn.Module, opt, loader,
            info: hdist.DistInfo) -> dict[str, Any]:
    """Load model, optimizer, loader and RNG states (this rank's share); returns the saved
    RunState fields. Call after the model, optimizer and loader are built."""
    check_model_shape(ckpt["model"], model, path)
    try:
        with torch.no_grad():
            model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        loader.load_state_dict(ckpt["loader"])
        rngs = ckpt["rng"]
        # the same world size gets each rank its own RNG state back; another one, rank 0's
        rng = rngs[info.rank] if len(rngs) == info.world_size else rngs[0]
        set_rng_state(rng, info.device)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise UserError(f"{path}: checkpoint state does not fit this run: {_short(e)}") from None
    return dict(ckpt["run_state"])
