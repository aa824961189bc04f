"""Run the real train scripts as subprocesses at a very small size, and read their logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.logs.format import RunLog, read_log

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# A model and batch small enough for a step to take a fraction of a second on CPU.
SMALL = [
    "--num_layers", "2", "--model_dim", "64", "--num_heads", "2", "--seq_len", "32",
    "--batch_sizes", "384,384,384,384", "--device_batch_tokens", "96", "--val_tokens", "768",
    "--num_scheduled_iterations", "6", "--num_extension_iterations", "0", "--val_loss_every", "3",
    # GPT-2's ids and consecutive windows, as the micro preset: the numbers these tests check (ln
    # 50304 at step 0, which windows a step reads) are computed for them. The CPU defaults (compact
    # vocabulary, random windows) are run by test_classic, test_data_loader and test_train's own test.
    "--compact_vocab", "0", "--sampling", "sequential",
]

# The speedrun preset at a reduced size: the fork's 11 layers at width 64, compact vocabulary,
# 128-token documents, windows in blocks of 16, 2 micro-batches per step.
REDUCED = [
    "--preset", "speedrun", "--compact_vocab", "1", "--model_dim", "64", "--num_heads", "4",
    "--bigram_vocab_size", "4099", "--seq_len", "128", "--batch_sizes", "256,512,512,512",
    "--micro_batches", "2", "--val_tokens", "1024", "--val_batch_size", "512", "--window_block", "16",
    "--num_scheduled_iterations", "3", "--num_extension_iterations", "1", "--val_loss_every", "0",
    "--compile", "off",
]


def make_small_shards(out_dir: Path) -> Path:
    """Train/val shards from a few hundred standard-library files (a few seconds)."""
    from data.prepare_corpus import prepare_corpus

    prepare_corpus(out_dir=out_dir, max_files=300, val_fraction=0.1, progress=False)
    return out_dir


def run_train(
    tmp_path: Path,
    data_dir: Path,
    *args: str,
    script: str = "train_gpt.py",
    nproc: int = 1,
    run_id: str = "run",
    env: dict | None = None,
    timeout: int = 600,
    small: bool = True,
) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "python"), str(ROOT / script)]
    if nproc > 1:
        cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(ROOT / script)]
    full_args = (SMALL if small else []) + [
        "--log_dir", str(tmp_path / "logs"),
        "--train_files", str(data_dir / "local_train_*.bin"),
        "--val_files", str(data_dir / "local_val_*.bin"),
    ]
    if run_id:
        full_args += ["--run_id", run_id]
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full_env["OMP_NUM_THREADS"] = "1"
    full_env.update(env or {})
    return subprocess.run(cmd + full_args + list(args), cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def log_of(tmp_path: Path, run_id: str = "run") -> RunLog:
    return read_log(tmp_path / "logs" / f"{run_id}.txt")


def losses(log: RunLog) -> list[float]:
    return [r.train_loss for r in log.train_steps] + [r.val_loss for r in log.val_steps]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]
