"""Whether Triton runs its interpreter (kernels on CPU tensors): read by the dispatch in
newton_schulz.py and by the kernels in triton_kernels.py, which import this module and not
each other's."""

from __future__ import annotations

import os


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET is set the way Triton itself reads it (then kernels run on CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
