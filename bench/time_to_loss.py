"""Time to a loss on CPU: the classic GPT-2 + AdamW recipe against the tiny preset, side by side.

    python bench/time_to_loss.py [--threads 1] [--classic "--flag v ..."] [--tiny "--flag v ..." ...]

Both run at once (real train_gpt.py processes, one rank each, --threads torch threads each),
each pinned to its own set of cores where the machine has enough (else both share them), so
both see the same machine load. With --tiny given several times (variants of the tiny run, for
tuning), the variants run one after another beside the one classic run, each against it. Same shards, same validation tokens (the presets' 32,768 first
val tokens), same seed. Prints the classic run's final val loss, the training time each needs to
reach it (interpolated between validations: harness.speedrun_stats.time_to_loss), their ratio
tiny / classic, and each one's training tokens/s. Training time is the trainer's train_time
(validation excluded; torch.compile's compilation, when on, included). The logs stay in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from base.cli import ArgumentParser
from harness.logs.format import RunLog, read_log
from harness.speedrun_stats import time_to_loss

ROOT = Path(__file__).resolve().parents[1]


def _cores(n_runs: int, threads: int) -> list[set[int] | None]:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < n_runs * threads:
        return [None] * n_runs
    return [set(cores[i * threads:(i + 1) * threads]) for i in range(n_runs)]


def start(name: str, preset: str, extra: list[str], out: Path, threads: int, cores: set[int] | None,
          cache: Path) -> subprocess.Popen:
    cmd = [sys.executable, "train_gpt.py", "--preset", preset, "--run_id", name, "--log_dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": str(cache / name)}
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    print(f"start {name}: {shlex.join(cmd)}" + (f" (cores {sorted(cores)})" if cores else ""), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, preexec_fn=pin, stdout=(out / f"{name}.out").open("w"),
                            stderr=subprocess.STDOUT)


def tokens_per_s(log: RunLog) -> float:
    tokens = sum(int(r.get("batch_size", 0)) for r in log.train_steps)
    ms = log.train_steps[-1].train_time_ms
    return tokens / (ms / 1000)


def vocab_of(log: RunLog) -> str:
    cfg = log.config or {}
    return f"{cfg.get('vocab_size')} ({'compact' if cfg.get('compact_vocab') else 'GPT-2'})"


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--classic", default="", help="extra trainer flags for the classic run, one string")
    ap.add_argument("--tiny", action="append", default=None,
                    help="extra trainer flags for the tiny run, one string; repeat for variants run in turn")
    ap.add_argument("--out", default="", help="folder for the logs and the JSON summary (default: a new temp folder)")
    return ap


def main() -> int:
    args = build_parser().parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="time_to_loss_"))
    out.mkdir(parents=True, exist_ok=True)
    variants = args.tiny or [""]
    tiny_names = ["tiny"] + [f"tiny{i + 1}" for i in range(1, len(variants))]
    runs = {"classic": ("classic", shlex.split(args.classic)),
            **{name: ("tiny", shlex.split(flags)) for name, flags in zip(tiny_names, variants)}}
    load_before = os.getloadavg()[0]
    t0 = time.time()
    classic_cores, tiny_cores = _cores(2, args.threads)
    classic = start("classic", "classic", runs["classic"][1], out, args.threads, classic_cores, out / "inductor")
    failed = []
    for name in tiny_names:  # in turn, beside the classic run
        if start(name, "tiny", runs[name][1], out, args.threads, tiny_cores, out / "inductor").wait() != 0:
            failed.append(name)
    if classic.wait() != 0:
        failed.append("classic")
    if failed:
        print(f"error: {', '.join(failed)} failed: see {out}/<name>.out", file=sys.stderr)
        return 1
    wall = time.time() - t0
    logs = {name: read_log(out / f"{name}.txt") for name in runs}
    target = logs["classic"].final_val_loss
    times = {name: time_to_loss(log, target) for name, log in logs.items()}
    summary = {
        "target_val_loss": target, "load_before": load_before, "load_after": os.getloadavg()[0],
        "wall_s": wall, "threads": args.threads,
        "runs": {name: {"preset": runs[name][0], "flags": runs[name][1], "vocab": vocab_of(log),
                        "final_val_loss": log.final_val_loss, "steps": log.last_step,
                        "train_time_s": log.train_steps[-1].train_time_ms / 1000,
                        "time_to_target_s": None if times[name] is None else times[name] / 1000,
                        "tokens_per_s": tokens_per_s(log)} for name, log in logs.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ntime to loss, CPU, {args.threads} thread(s) per run, load {load_before:.1f} before /"
          f" {summary['load_after']:.1f} after, wall {wall:.0f} s; logs in {out}")
    print(f"target: the classic run's final val loss {target:.4f}")
    print(f"{'run':8} {'vocab':>16} {'steps':>6} {'final val':>10} {'train s':>8} {'to target s':>12} {'tokens/s':>9}")
    for name, r in summary["runs"].items():
        hit = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        print(f"{name:8} {r['vocab']:>16} {r['steps']:>6} {r['final_val_loss']:>10.4f} {r['train_time_s']:>8.1f}"
              f" {hit:>12} {r['tokens_per_s']:>9.0f}")
    c = summary["runs"]["classic"]
    for name in tiny_names:
        t = summary["runs"][name]
        ratio = f"n/a ({name} never reached it)" if t["time_to_target_s"] is None else \
            f"{t['time_to_target_s'] / c['time_to_target_s']:.2f}"
        print(f"{name} ({shlex.join(t['flags']) or 'the preset'}): time to the classic's final loss, / classic's:"
              f" {ratio} (goal <= 0.5); tokens/s / classic's: {t['tokens_per_s'] / c['tokens_per_s']:.2f} (goal >= 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
