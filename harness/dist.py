"""Process group set-up and the collectives the harness uses, in one place.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU; a plain `python
train_gpt.py` is world size 1 and makes no collective calls at all. Where gloo lacks an
operation (all_reduce AVG) the fallback lives here, not at the call sites.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from base import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


CPU_TIMEOUT_S = 300.0  # dist_timeout_s=0 (auto) on CPU
CUDA_TIMEOUT_S = 1800.0  # and on CUDA, where torch.compile makes the first steps slow

_monitor_group = None  # a second gloo group, to ask which rank stopped answering
_timeout_s = 0.0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise UserError(f"env {name}={text!r} is not an integer (torchrun sets it)") from None


def init(timeout_s: float = 0.0) -> DistInfo:
    """Read torchrun's variables and join the process group. timeout_s (0 = auto: CPU_TIMEOUT_S
    or CUDA_TIMEOUT_S) bounds every collective: a rank that stops answering ends the run after
    it instead of after torch's default of 30 minutes (see unresponsive_ranks)."""
    global _monitor_group, _timeout_s
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"env RANK={rank} WORLD_SIZE={world_size}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    if world_size > 1 and not dist.is_initialized() and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise UserError(f"env WORLD_SIZE={world_size} but no MASTER_ADDR/MASTER_PORT: start several processes with"
                        f" `torchrun --nproc_per_node={world_size} SCRIPT`, or unset WORLD_SIZE for one process")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return DistInfo(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    _timeout_s = timeout_s or (CUDA_TIMEOUT_S if device.type == "cuda" else CPU_TIMEOUT_S)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=_timeout_s), **kwargs)
        _monitor_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_timeout_s))
    return DistInfo(rank, world_size, local_rank, device, backend)


def is_timeout(e: BaseException) -> bool:
    """Whether e is a collective that ran past the process-group timeout."""
    return isinstance(e, RuntimeError) and bool(re.search(r"timed? ?out|timeout", str(e), re.IGNORECASE))


def unresponsive_ranks(wait_s: float = 10.0) -> list[int] | None:
    """After a timed-out collective: the ranks that do not reach a monitored barrier within
    wait_s (every live rank calls this from its error path), or None when it cannot tell."""
    if _monitor_group is None or not dist.is_initialized():
        return None
    try:
        dist.monitored_barrier(group=_monitor_group, timeout=datetime.timedelta(seconds=wait_s), wait_all_ranks=True)
    except RuntimeError as e:
        m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        if m:
            return [int(r) for r in re.findall(r"\d+", m.group(1))]
        m = re.search(r"[Rr]ank (\d+)", str(e))
        return [int(m.group(1))] if m else None
    return []


def timeout_s() -> float:
    return _timeout_s


def shutdown(info: DistInfo) -> None:
    global _monitor_group
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _monitor_group = None


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In place mean over ranks (gloo has no AVG for all_reduce: SUM then divide)."""
    if _is_dist():
        if dist.get_backend() == "nccl":
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(dist.get_world_size())
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In place sum over ranks."""
    if _is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_async(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start an in-place mean over ranks; returns a function that waits and returns t."""
    if not _is_dist():
        return lambda: t
    if dist.get_backend() == "nccl":
        work = dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True)
        return lambda: (work.wait(), t)[1]
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)
    n = dist.get_world_size()
    return lambda: (work.wait(), t.div_(n))[1]


def reduce_scatter_mean_async(out: torch.Tensor, inp: torch.Tensor) -> Callable[[], torch.Tensor]:
    """out <- this rank's contiguous share of the mean of inp over ranks (dim 0 split). On gloo,
    SUM then a division of the share: the same bits as its AVG, which divides the whole input."""
    if not _is_dist():
        out.copy_(inp)
        return lambda: out
    if dist.get_backend() == "nccl":
        work = dist.reduce_scatter_tensor(out, inp.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
        return lambda: (work.wait(), out)[1]
    work = dist.reduce_scatter_tensor(out, inp.contiguous(), op=dist.ReduceOp.SUM, async_op=True)
    n = dist.get_world_size()
    return lambda: (work.wait(), out.div_(n))[1]


def all_gather_async(out: torch.Tensor, inp: torch.Tensor) -> Callable[[], torch.Tensor]:
    """out (world*n, ...) <- concatenation of every rank's inp (n, ...)."""
    if not _is_dist():
        out.copy_(inp)
        return lambda: out
    work = dist.all_gather_into_tensor(out, inp.contiguous(), async_op=True)
    return lambda: (work.wait(), out)[1]


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place broadcast. gloo sends a non-contiguous tensor's raw memory, so go through a copy."""
    if _is_dist():
        if t.is_contiguous():
            dist.broadcast(t, src)
        else:
            buf = t.contiguous()
            dist.broadcast(buf, src)
            t.copy_(buf)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order (pickled over the wire: small objects only)."""
    if not _is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _is_dist():
        dist.barrier()


def on_main_agreed(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and hand its result to every rank. A UserError raised there is
    raised on every rank, so all of them stop with the same one-line message instead of the
    others hanging in the next collective."""
    result: Any = None
    error: str | None = None
    if info.is_main:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UserError(error)
    return result


def all_agree_or_raise(info: DistInfo, error: str | None) -> None:
    """Every rank passes its own error (or None); if any rank failed, all raise the first."""
    if not _is_dist():
        if error:
            raise UserError(error)
        return
    errors: list[Any] = [None] * info.world_size
    dist.all_gather_object(errors, error)
    for e in errors:
        if e:
            raise UserError(e)
