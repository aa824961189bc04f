"""Declaring a sweep: a TOML file and/or flags -> the list of runs, each validated as the
trainer will see it before anything starts.

A sweep file (sweeps/*.toml):

    name = "spectral_lr"              # the sweep id's prefix
    [defaults]                        # shared by every run: config fields + launcher keys
    preset = "speedrun"
    nproc = 8
    seeds = [0]
    lr_muls = [1.0, 1.52, 1.73, 1.0]

    [[runs]]                          # named runs
    tag = "baseline_std_0"
    script = "train_gpt.py"
    baseline = true                   # the reference of the summary's delta column

    [[grids]]                         # cartesian products; each run's tag is tag_<value>
    tag = "spectral_lr"
    script = "train_gpt_muon_new.py"
    [grids.axes]
    spectral_lr_mul = [0.02, 0.05, 0.1, 0.2, 0.3]

Launcher keys (allowed in [defaults], [[runs]] and [[grids]]): script, nproc, seeds, tag,
baseline. Every other key is a config field of harness.config.Config; the launcher owns
run_id, seed (use `seeds`), log_dir and resume.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from base import UserError
from harness.config import RUN_ID_PATTERN, field_names, load_config, parse_value, script_overrides, validate

LAUNCHER_KEYS = ("script", "nproc", "seeds", "tag", "baseline")
OWNED_FIELDS = ("run_id", "seed", "log_dir", "resume")
DEFAULT_SCRIPT = "train_gpt.py"
DEFAULT_MAX_RUNS = 200
RUN_ID_MAX = 200


# ------------------------------------------------------------------------------------------
# Values as flags


def value_text(value: Any) -> str:
    """A TOML/python value as the trainer's flag text: lists comma-separated, bools 0/1."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(value_text(v) for v in value)
    if isinstance(value, float):
        return repr(value) if not value.is_integer() or abs(value) >= 1e16 else str(int(value))
    return str(value)


def short_text(value: Any) -> str:
    """A value as it appears in run ids and tags: lists joined with '-', 1.0 -> 1."""
    if isinstance(value, (list, tuple)):
        return "-".join(short_text(v) for v in value)
    if isinstance(value, float):
        return format(value, "g")
    return value_text(value)


def canonical(name: str, value: Any, where: str) -> Any:
    """Parse a value the way the trainer will (unknown field or wrong type: UserError naming `where`)."""
    if name not in field_names():
        raise UserError(f"{where}: unknown config field {name!r} (see `python train_gpt.py --help`)")
    return parse_value(name, value_text(value), where)


# ------------------------------------------------------------------------------------------
# Declared entries


@dataclass
class Entry:
    """One [[runs]] item or one [[grids]] item (axes non-empty), with defaults not yet applied."""

    where: str
    fields: dict[str, Any] = field(default_factory=dict)
    launcher: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class SweepSpec:
    name: str = "sweep"
    source: str = "flags"
    defaults: Entry = field(default_factory=lambda: Entry("[defaults]"))
    entries: list[Entry] = field(default_factory=list)


def _split(table: Mapping[str, Any], where: str, allow_axes: bool = False) -> Entry:
    if not isinstance(table, Mapping):
        raise UserError(f"{where}: must be a table of key = value")
    entry = Entry(where)
    for key, value in table.items():
        if key == "axes" and allow_axes:
            if not isinstance(value, Mapping) or not value:
                raise UserError(f"{where}.axes: must be a non-empty table of field = [values]")
            for name, values in value.items():
                entry.axes[name] = _axis_values(name, values, f"{where}.axes")
        elif key in LAUNCHER_KEYS:
            entry.launcher[key] = value
        elif key in OWNED_FIELDS:
            hint = "use seeds = [...]" if key == "seed" else "the launcher sets it"
            raise UserError(f"{where}: {key!r} cannot be set in a sweep ({hint})")
        else:
            entry.fields[key] = canonical(key, value, where)
    return entry


def _axis_values(name: str, values: Any, where: str) -> list[Any]:
    if name in LAUNCHER_KEYS and name not in ("script", "nproc"):
        raise UserError(f"{where}: {name!r} cannot be a grid axis (allowed: config fields, script, nproc)")
    if name in OWNED_FIELDS:
        raise UserError(f"{where}: {name!r} cannot be a grid axis" + (" (use seeds)" if name == "seed" else ""))
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: {name} must be a non-empty list of values")
    if name in ("script", "nproc"):
        return list(values)
    return [canonical(name, v, where) for v in values]


def load_sweep_file(path: str | os.PathLike) -> SweepSpec:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: no such sweep file") from None
    except IsADirectoryError:
        raise UserError(f"{p}: is a directory, not a sweep file (give a .toml file, e.g. sweeps/tiny_ord.toml)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not a UTF-8 text file (byte {e.start}: {e.object[e.start:e.start + 1]!r});"
                        " a sweep file is TOML, which is UTF-8") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read the sweep file ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - {"name", "defaults", "runs", "grids"})
    if unknown:
        raise UserError(f"{p}: unknown top-level key {unknown[0]!r} (allowed: name, defaults, runs, grids)")
    spec = SweepSpec(name=str(data.get("name") or p.stem), source=str(p))
    spec.defaults = _split(data.get("defaults", {}), f"{p} [defaults]")
    for i, run in enumerate(data.get("runs", [])):
        spec.entries.append(_split(run, f"{p} [[runs]] #{i + 1}"))
    for i, grid in enumerate(data.get("grids", [])):
        entry = _split(grid, f"{p} [[grids]] #{i + 1}", allow_axes=True)
        if not entry.axes:
            raise UserError(f"{entry.where}: a grid needs an [grids.axes] table of field = [values]")
        spec.entries.append(entry)
    return spec


def parse_assignment(text: str, where: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise UserError(f"{where}: {text!r} is not FIELD=VALUE")
    return name.strip(), value.strip()


def parse_grid_flag(text: str) -> tuple[str, list[Any]]:
    """`--grid FIELD=V1,V2,...`; for list fields each value's items are separated by ':'
    (`--grid batch_sizes=128:128:128:128,256:256:256:256`)."""
    name, values = parse_assignment(text, "--grid")
    items = [v.strip() for v in values.split(",")]
    if not values or any(not v for v in items):
        raise UserError(f"--grid {text!r}: empty value (write FIELD=V1,V2,...)")
    if name in ("script", "nproc"):
        return name, [int(v) if name == "nproc" and v.isdigit() else v for v in items]
    items = [v.replace(":", ",") for v in items]
    return name, _axis_values(name, items, f"--grid {name}")


def apply_flags(
    spec: SweepSpec,
    *,
    sets: Sequence[str] = (),
    grids: Sequence[str] = (),
    seeds: str | None = None,
    script: str | None = None,
    tag: str | None = None,
    baselines: Sequence[str] = (),
    preset: str | None = None,
    nproc: int | None = None,
    name: str | None = None,
) -> SweepSpec:
    """Flags on top of a file (or of nothing): --set/--preset/--nproc/--seeds change the
    defaults, --grid adds one grid (all --grid flags together), --baseline adds baseline runs."""
    if name:
        spec.name = name
    for text in sets:
        key, value = parse_assignment(text, "--set")
        if key in LAUNCHER_KEYS or key in OWNED_FIELDS:
            raise UserError(f"--set {key}: not a settable config field (use --{key} or seeds)")
        spec.defaults.fields[key] = canonical(key, value, f"--set {key}")
    if preset:
        spec.defaults.fields["preset"] = canonical("preset", preset, "--preset")
    if nproc is not None:
        spec.defaults.launcher["nproc"] = nproc
    if seeds is not None:
        spec.defaults.launcher["seeds"] = _parse_seeds(seeds)
    if grids:
        entry = Entry("--grid")
        for text in grids:
            key, values = parse_grid_flag(text)
            if key in entry.axes:
                raise UserError(f"--grid {key}: given twice")
            entry.axes[key] = values
        if script:
            entry.launcher["script"] = script
        if tag:
            entry.launcher["tag"] = tag
        spec.entries.append(entry)
    elif script or tag:
        entry = Entry("--script/--tag")
        if script:
            entry.launcher["script"] = script
        if tag:
            entry.launcher["tag"] = tag
        spec.entries.append(entry)
    for i, base in enumerate(baselines):
        entry = Entry(f"--baseline {base}", launcher={"script": base, "baseline": True,
                                                        "tag": "baseline" if len(baselines) == 1 else f"baseline_{Path(base).stem}"})
        spec.entries.insert(i, entry)
    return spec


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r}: not a comma-separated list of integers") from None
    return seeds


# ------------------------------------------------------------------------------------------
# Expansion


@dataclass
class RunPlan:
    """One run of the sweep, fully resolved."""

    key: str  # tag + seed: the run's identity across resumes
    tag: str
    seed: int
    script: str
    nproc: int
    baseline: bool
    fields: dict[str, Any]  # every config field the launcher passes (not run_id/tag/seed/log_dir)
    swept: dict[str, Any]  # the grid values of this run

    def flags(self, run_id: str, log_dir: str, resume: str | None = None) -> list[str]:
        out = ["--preset", value_text(self.fields["preset"])] if "preset" in self.fields else []
        out += ["--run_id", run_id, "--tag", self.tag, "--seed", str(self.seed), "--log_dir", log_dir]
        for name, value in self.fields.items():
            if name != "preset":
                out += [f"--{name}", value_text(value)]
        if resume:
            out += ["--resume", resume]
        return out


def grid_size(spec: SweepSpec) -> int:
    n = 0
    default_seeds = len(spec.defaults.launcher.get("seeds", [0]))
    for e in spec.entries:
        seeds = len(e.launcher.get("seeds", [])) or default_seeds
        n += math.prod(len(v) for v in e.axes.values()) * seeds
    return n


def _check_launcher(entry: Entry, launcher: dict[str, Any], repo_root: Path) -> None:
    where = entry.where
    script = launcher.get("script", DEFAULT_SCRIPT)
    if not isinstance(script, str) or not script.endswith(".py") or not (repo_root / script).is_file():
        raise UserError(f"{where}: script={script!r} is not a training script in {repo_root}")
    nproc = launcher.get("nproc", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise UserError(f"{where}: nproc={nproc!r} must be an integer >= 1")
    seeds = launcher.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise UserError(f"{where}: seeds={seeds!r} must be a non-empty list of integers >= 0")
    if not isinstance(launcher.get("baseline", False), bool):
        raise UserError(f"{where}: baseline must be true or false")


def expand(spec: SweepSpec, repo_root: str | os.PathLike, max_runs: int = DEFAULT_MAX_RUNS) -> list[RunPlan]:
    """Every run of the sweep (named runs, then grids in order, seeds innermost)."""
    repo_root = Path(repo_root)
    if not spec.entries:
        raise UserError("nothing to run: give a sweep file with [[runs]]/[[grids]], or --grid/--script/--baseline")
    n = grid_size(spec)
    if n > max_runs:
        raise UserError(f"the sweep expands to {n} runs, more than --max_runs {max_runs} (raise --max_runs to allow it)")
    plans: list[RunPlan] = []
    for entry in spec.entries:
        launcher = {**spec.defaults.launcher, **entry.launcher}
        _check_launcher(entry, launcher, repo_root)
        names = list(entry.axes)
        for combo in itertools.product(*(entry.axes[k] for k in names)) if names else [()]:
            swept = dict(zip(names, combo))
            run_launcher = dict(launcher)
            for k in ("script", "nproc"):
                if k in swept:
                    run_launcher[k] = swept[k]
            _check_launcher(entry, run_launcher, repo_root)
            fields = {**spec.defaults.fields, **entry.fields, **{k: v for k, v in swept.items() if k not in ("script", "nproc")}}
            tag = _tag(entry, run_launcher, swept)
            for seed in run_launcher.get("seeds", [0]):
                plans.append(RunPlan(
                    key=f"{tag}@seed{seed}", tag=tag, seed=seed, script=run_launcher.get("script", DEFAULT_SCRIPT),
                    nproc=run_launcher.get("nproc", 1), baseline=run_launcher.get("baseline", False),
                    fields=fields, swept=swept,
                ))
    seen: dict[str, RunPlan] = {}
    for p in plans:
        if p.key in seen:
            raise UserError(f"two runs share tag {p.tag!r} and seed {p.seed}: give them distinct tags")
        seen[p.key] = p
    return plans


def _tag(entry: Entry, launcher: dict[str, Any], swept: dict[str, Any]) -> str:
    base = launcher.get("tag")
    if base is not None and (not isinstance(base, str) or not base):
        raise UserError(f"{entry.where}: tag={base!r} must be a non-empty string")
    if not swept:
        tag = base or Path(launcher.get("script", DEFAULT_SCRIPT)).stem
    elif len(swept) == 1:
        (name, value), = swept.items()
        tag = f"{base or name}_{short_text(value)}"
    else:
        tag = (base + "_" if base else "") + "_".join(f"{k}={short_text(v)}" for k, v in swept.items())
    if not RUN_ID_PATTERN.match(tag) or ".." in tag:
        raise UserError(f"{entry.where}: tag {tag!r} is invalid: letters, digits and . _ = + , @ - only (no '/', no '..')")
    return tag


# ------------------------------------------------------------------------------------------
# Run ids and validation


def timestamp(t: float | None = None) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if t is None else t))


def resolved_config(plan: RunPlan, log_dir: str, env: Mapping[str, str] | None = None):
    """The Config the trainer will build from this run's flags (preset, env and flags)."""
    try:
        return load_config(plan.flags("", log_dir), env=os.environ if env is None else env,
                           overrides={"script": Path(plan.script).name, **script_overrides(plan.script)})
    except UserError as e:
        raise UserError(f"run {plan.tag} seed {plan.seed}: {e}") from None


def run_id_for(plan: RunPlan, stamp: str, with_seed: bool, cfg=None) -> str:
    """`lrmul-1-1.52-1.73-1-cd0.55-<tag>[-s<seed>]-<stamp>`: the schedule first (as resolved in
    `cfg`, else as set by the sweep), so runs of one schedule sort together; the seed only where
    the sweep has several."""
    f = plan.fields if cfg is None else {"lr_muls": cfg.lr_muls, "cooldown_frac": cfg.cooldown_frac}
    parts = []
    if "lr_muls" in f:
        parts.append(f"lrmul-{short_text(f['lr_muls'])}")
    if "cooldown_frac" in f:
        parts.append(f"cd{short_text(f['cooldown_frac'])}")
    parts.append(plan.tag)
    if with_seed:
        parts.append(f"s{plan.seed}")
    parts.append(stamp)
    return "-".join(parts)


def validate_run(plan: RunPlan, run_id: str, log_dir: str, env: Mapping[str, str] | None = None, nodes: int = 1) -> None:
    """Exactly what the trainer will check at start-up (flags over env over preset), plus the
    batch arithmetic of its world size, so a bad run fails here, before the first run starts."""
    where = f"run {plan.tag} seed {plan.seed}"
    if len(run_id) > RUN_ID_MAX:
        raise UserError(f"{where}: run id {run_id!r} is longer than {RUN_ID_MAX} characters (shorten the tag)")
    try:
        cfg = load_config(plan.flags(run_id, log_dir), env=os.environ if env is None else env,
                          overrides={"script": Path(plan.script).name, **script_overrides(plan.script)})
        validate(cfg, world_size=plan.nproc * nodes)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
