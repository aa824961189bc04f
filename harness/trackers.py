"""Experiment-tracker sinks: TensorBoard, trackio and Weights & Biases (offline), all optional
and off by default (`--trackers tensorboard,trackio,wandb`).

The text log stays the source of truth: a tracker is fed the records of the lines the run log
has just written (RunLogWriter.listeners, rank 0 only), parsed back with the log's own patterns,
so a tracker's scalars are the log's values at the log's steps, under the log's keys
(`train_loss`, `val_loss`, `train_time` and `step_avg` in ms, `lr_mul`, `batch_size`; diag
lines as `diag/<layer>/<metric>`). Nothing leaves the machine: TensorBoard writes event files,
trackio its local SQLite store (TRACKIO_DIR), wandb an offline run directory (`wandb sync` it
later if you want it online).

A missing package stops the run before training with one line (UserError, exit 2). A tracker
that fails during the run is dropped with one warning on stderr; the run and its text log go on.

`logs_to_tensorboard` writes event files from existing text logs (plot_loss.py --to_tensorboard).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from base import UserError
from harness.logs.format import DiagRecord, Record, RunLog, StatusRecord, StepRecord, find_logs, read_log

TRACKERS = ("tensorboard", "trackio", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
SUBDIRS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def missing_package(name: str) -> str | None:
    """The package tracker `name` needs when it is not installed, else None."""
    pkg = PACKAGES[name]
    try:
        found = importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else pkg


def check_available(trackers: Iterable[str]) -> None:
    """UserError (one line) for the first tracker whose package is not installed."""
    for name in trackers:
        pkg = missing_package(name)
        if pkg:
            raise UserError(f"--trackers {name} needs the {pkg} package: pip install {pkg}"
                            " (or pip install -r requirements-trackers.txt)")


def tracker_root(cfg: Any) -> Path:
    return Path(cfg.tracker_dir) if cfg.tracker_dir else Path(cfg.log_dir) / "trackers"


def _scalars(values: dict[str, float | str]) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, float)}


def _step_scalars(rec: StepRecord) -> dict[str, float]:
    return _scalars(rec.values)


def _diag_scalars(rec: DiagRecord) -> dict[str, float]:
    return {f"diag/{rec.layer}/{k}": v for k, v in _scalars(rec.values).items()}


# ------------------------------------------------------------------------------------------
# Sinks


class Sink:
    """One tracker backend. Each method may raise; TrackerSet drops a sink that does."""

    name = "sink"

    def step(self, rec: StepRecord) -> None:
        raise NotImplementedError

    def diag(self, rec: DiagRecord) -> None:
        raise NotImplementedError

    def status(self, rec: StatusRecord) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def record(self, rec: Record) -> None:
        if isinstance(rec, StepRecord):
            self.step(rec)
        elif isinstance(rec, DiagRecord):
            self.diag(rec)
        elif isinstance(rec, StatusRecord):
            self.status(rec)


class TensorBoardSink(Sink):
    """Event files in `directory` (one folder per run: `tensorboard --logdir <its parent>`)."""

    name = "tensorboard"

    def __init__(self, directory: str | os.PathLike, purge_step: int | None = None,
                 config: dict[str, Any] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.directory = Path(directory)
        # a resumed run redoes the steps after its checkpoint: TensorBoard drops the old ones
        self.writer = SummaryWriter(log_dir=str(self.directory), purge_step=purge_step, flush_secs=10)
        if config is not None:
            import json

            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def step(self, rec: StepRecord) -> None:
        for key, value in _step_scalars(rec).items():
            self.writer.add_scalar(key, value, rec.step)

    def diag(self, rec: DiagRecord) -> None:
        for key, value in _diag_scalars(rec).items():
            self.writer.add_scalar(key, value, rec.step)

    def status(self, rec: StatusRecord) -> None:
        step = rec.values.get("step")
        step = int(step) if isinstance(step, float) and math.isfinite(step) else 0
        text = " ".join([f"status:{rec.status}"] + [f"{k}:{v}" for k, v in rec.values.items()])
        self.writer.add_text("status", text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioSink(Sink):
    """trackio's local store: `<directory>/<project>.db` (TRACKIO_DIR; `trackio show`). A
    resumed run continues the same trackio run (same name)."""

    name = "trackio"

    def __init__(self, directory: str | os.PathLike, project: str, run_name: str,
                 config: dict[str, Any] | None = None, group: str | None = None, resume: bool = False):
        # trackio reads TRACKIO_DIR when it is first imported; local only: a Space, server or
        # bucket named in the environment is not used from here (`trackio sync` publishes later)
        os.environ["TRACKIO_DIR"] = str(Path(directory).resolve())
        for key in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID"):
            os.environ.pop(key, None)
        import trackio

        if Path(trackio.utils.TRACKIO_DIR).resolve() != Path(directory).resolve():
            raise RuntimeError(f"trackio was imported before with TRACKIO_DIR={trackio.utils.TRACKIO_DIR}")
        self.trackio = trackio
        with contextlib.redirect_stdout(sys.stderr):  # its banner; stdout echoes the log's lines
            self.run = trackio.init(project=project, name=run_name, group=group or None, config=config,
                                    resume="allow" if resume else "never", embed=False,
                                    auto_log_gpu=False, auto_log_cpu=False)

    def step(self, rec: StepRecord) -> None:
        self.run.log(_step_scalars(rec), step=rec.step)

    def diag(self, rec: DiagRecord) -> None:
        self.run.log(_diag_scalars(rec), step=rec.step)

    def status(self, rec: StatusRecord) -> None:
        pass  # the run ends with close(); the outcome is in the text log

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            if self.trackio.context_vars.current_run.get() is self.run:
                self.trackio.finish()  # also clears trackio's current run (else its atexit finishes it again)
            else:
                self.run.finish()


class WandbSink(Sink):
    """A Weights & Biases run in offline mode: `<directory>/wandb/offline-run-*` (never online
    from here; `wandb sync` uploads it later). Every metric is plotted against `step` (the
    log's), so diag lines logged after their step's train line are kept. A resumed run is a new
    offline run of the same name."""

    name = "wandb"

    def __init__(self, directory: str | os.PathLike, project: str, run_name: str,
                 config: dict[str, Any] | None = None, group: str | None = None):
        # nothing leaves the machine: offline mode, and no error reports / telemetry of its own
        # (read when wandb starts its service process, at the first init)
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_ERROR_REPORTING"] = "false"
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(mode="offline", silent=True, console="off", x_disable_stats=True,
                                  disable_git=True, save_code=False)
        self.run = wandb.init(project=project, name=run_name, group=group or None, config=config,
                              dir=str(directory), mode="offline", settings=settings, reinit="create_new")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def step(self, rec: StepRecord) -> None:
        self.run.log({"step": rec.step, **_step_scalars(rec)})

    def diag(self, rec: DiagRecord) -> None:
        self.run.log({"step": rec.step, **_diag_scalars(rec)})

    def status(self, rec: StatusRecord) -> None:
        self.run.summary["status"] = rec.status
        for key, value in rec.values.items():
            self.run.summary[key] = value

    def close(self) -> None:
        code = 0 if self.run.summary.get("status") in (None, "finished", "preempted") else 1
        self.run.finish(exit_code=code)


# ------------------------------------------------------------------------------------------
# The fan-out attached to the run log


class TrackerSet:
    """The sinks of one run, as a RunLogWriter listener: a sink that raises is closed (quietly),
    dropped with one warning on stderr, and never called again."""

    def __init__(self, sinks: Iterable[Sink] = (), warn=None):
        self.sinks: list[Sink] = list(sinks)
        self.dropped: dict[str, str] = {}
        self._warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def record(self, rec: Record) -> None:
        for sink in list(self.sinks):
            try:
                sink.record(rec)
            except Exception as e:  # noqa: BLE001 - a tracker never takes the run down
                self._drop(sink, e)

    def _drop(self, sink: Sink, e: BaseException) -> None:
        self.sinks.remove(sink)
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        self.dropped[sink.name] = why
        self._warn(f"warning: tracker {sink.name} failed ({why}); it is dropped, the run and its text log go on")
        try:
            sink.close()
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                self._warn(f"warning: tracker {sink.name} failed to close ({why}); the text log is complete")


def open_sinks(cfg: Any, config: dict[str, Any] | None = None, resumed_step: int | None = None) -> TrackerSet:
    """The sinks of cfg.trackers for this run (rank 0). A tracker that cannot start is a
    UserError (before the first step), naming it and where it writes."""
    check_available(cfg.trackers)
    root = tracker_root(cfg)
    sinks: list[Sink] = []
    try:
        for name in cfg.trackers:
            where = root / SUBDIRS[name]  # wandb puts its own wandb/ folder in the dir it is given
            try:
                if name == "tensorboard":
                    purge = resumed_step + 1 if resumed_step is not None else None
                    sinks.append(TensorBoardSink(where / cfg.run_id, purge_step=purge, config=config))
                elif name == "trackio":
                    sinks.append(TrackioSink(where, cfg.tracker_project, cfg.run_id, config=config,
                                             group=cfg.tag, resume=resumed_step is not None))
                elif name == "wandb":
                    sinks.append(WandbSink(root, cfg.tracker_project, cfg.run_id, config=config, group=cfg.tag))
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001
                why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                raise UserError(f"--trackers {name}: cannot start the tracker in {where} ({why});"
                                " pass --tracker_dir DIR with a writable directory, or drop it from --trackers") from None
    except BaseException:
        TrackerSet(sinks).close()
        raise
    return TrackerSet(sinks)


# ------------------------------------------------------------------------------------------
# Text logs -> TensorBoard after the fact


def feed(sink: Sink, log: RunLog) -> int:
    """Give a parsed log's records to a sink in step order; returns how many."""
    steps = sorted(log.train_steps + log.val_steps, key=lambda r: (r.step, "val_loss" not in r.values))
    n = 0
    for rec in steps:
        sink.step(rec)
        n += 1
    for d in log.diags:
        sink.diag(d)
        n += 1
    if log.status is not None:
        fields = dict(log.status_fields)
        fields.setdefault("step", float(log.last_step or 0))
        sink.status(StatusRecord(log.status, fields))
    return n


def logs_to_tensorboard(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """TensorBoard event files from existing text logs (files or folders of them), one folder
    per run under out_dir (`<out_dir>/<run name>`), whatever wrote the logs (modded-nanogpt's
    included). Returns the folders written."""
    if missing_package("tensorboard"):
        raise UserError("--to_tensorboard needs the tensorboard package: pip install tensorboard")
    out = Path(out_dir)
    written = []
    for path in find_logs(paths):
        log = read_log(path)
        if not (log.train_steps or log.val_steps):
            continue
        where = out / (log.name or Path(path).stem)
        sink = TensorBoardSink(where, config=log.config)
        try:
            feed(sink, log)
        finally:
            sink.close()
        written.append(where)
    return written
