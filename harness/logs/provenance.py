"""What a run log records about where it ran: the project sources it executed and the environment.

modded-nanogpt keeps one file so that a log reproduces its run; we keep modules, so the log
carries the source of the entry script and of every project module it imported.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def project_sources(entry_script: str) -> list[tuple[str, str]]:
    """(relative path, text) of the entry script and every imported module under the repo root."""
    paths: list[Path] = [Path(entry_script).resolve()]
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not f:
            continue
        p = Path(f).resolve()
        if (p.suffix == ".py" and ROOT in p.parents and ".venv" not in p.parts and p not in paths
                and p.is_file()):
            paths.append(p)
    out = []
    for p in [paths[0]] + sorted(paths[1:]):
        try:
            rel = str(p.relative_to(ROOT))
        except ValueError:
            rel = str(p)
        out.append((rel, p.read_text(encoding="utf-8", errors="replace")))
    return out


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment(info) -> dict[str, Any]:
    """Versions, device, world size, git commit and dirtiness. `_nvidia_smi` (if present) is the
    raw nvidia-smi output, written to the log as free text."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on CPU
        triton_version = "none"
    if info.device.type == "cuda":
        device = torch.cuda.get_device_name(info.device).replace(" ", "_")
    else:
        device = f"cpu:{platform.processor() or platform.machine()}"
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": device,
        "world_size": info.world_size,
        "backend": info.backend or "none",
        "threads": torch.get_num_threads(),  # intra-op CPU threads per process (OMP_NUM_THREADS)
        "git_commit": commit,
        "git_dirty": "unknown" if status is None else ("1" if status else "0"),
    }
    if shutil.which("nvidia-smi"):
        try:
            env["_nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
    return env
