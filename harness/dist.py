"""Process group set-up and the collectives the harness uses, in one place.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU; a plain `python
train_gpt.py` is world size 1 and makes no collective calls at all. Where gloo lacks an
operation (all_reduce AVG) the fallback lives here, not at the call sites.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from harness.errors import UserError

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


def init() -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return DistInfo(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank, world_size, local_rank, device, backend)


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


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
    """out <- this rank's contiguous share of the mean of inp over ranks (dim 0 split)."""
    if not _is_dist():
        out.copy_(inp)
        return lambda: out
    work = dist.reduce_scatter_tensor(out, inp.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
    return lambda: (work.wait(), out)[1]


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
