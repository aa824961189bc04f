"""The distributed token loader: global batches cut from the shard stream, one slice per rank.

A global batch of T tokens is N = T // seq_len sequences. Sequence i is a window of seq_len + 1
tokens of the stream (inputs: the first seq_len, targets: the same shifted by one). Rank r of W
gets sequences [r*N/W, (r+1)*N/W), so the union over ranks is the same N sequences whatever the
world size; fewer ranks means gradient accumulation upstream, not different data.

Window placement within one shard, starting at the loader's position ``pos``:
- plain: window i starts at ``pos + i*seq_len`` (consecutive; a window's last target is the
  next window's first input, as in modded-nanogpt), and the next batch starts at ``pos + N*seq_len``;
- ``align_bos``: window 0 starts at the first BOS at or after ``pos``, window i+1 at the first BOS
  at or after ``start_i + seq_len``. A window packs its document and the ones after it; the
  document that crosses the window's end is cut there and the rest of it is skipped (it never
  starts a window), so a document longer than seq_len is truncated to its first seq_len + 1
  tokens. The next batch searches from ``start_{N-1} + seq_len``.
A batch never spans shards: when the rest of a shard cannot hold all N windows the loader
moves to the next shard (after the last one, back to the first).

Each rank computes the window starts of the whole batch (cheap index arithmetic on the BOS
positions, found once per shard with np.flatnonzero) but reads only its own windows from the
memmap. The next batch is read in a background thread, speculatively for the same batch size;
a call with another size discards it. On CUDA the batch lands in pinned memory and is copied
with non_blocking=True.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from base import UserError
from data.shards import check_vocab, find_shards, open_shard
from data.tokenizer import EOT


def _resolve_files(files) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        return find_shards(files)
    paths = [Path(f) for f in files]
    if not paths:
        raise UserError("no shard files given to the loader; create shards with `python -m data.prepare_corpus`")
    return paths


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 tensor of ``host`` (any integer array) on ``device``; pinned + non_blocking for CUDA."""
    if device.type == "cuda":
        pinned = torch.empty(host.shape, dtype=torch.int64, pin_memory=True)
        np.copyto(pinned.numpy(), host, casting="unsafe")
        return pinned.to(device, non_blocking=True)
    return torch.from_numpy(host.astype(np.int64))


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise UserError(f"{name}={value!r}: must be a positive integer")


class DistributedTokenLoader:
    """This rank's slice of consecutive global batches from token shards (see the module doc)."""

    def __init__(
        self,
        files,
        *,
        seq_len: int,
        rank: int,
        world_size: int,
        vocab_size: int,
        align_bos: bool = False,
        device="cpu",
        prefetch: bool = True,
        bos_id: int = EOT,
        sampling: str = "sequential",
        seed: int = 0,
    ):
        _check_positive("seq_len", seq_len)
        _check_positive("world_size", world_size)
        _check_positive("vocab_size", vocab_size)
        if not 0 <= rank < world_size:
            raise UserError(f"rank={rank}: must be in 0..{world_size - 1} for world_size={world_size}")
        self.files = _resolve_files(files)
        self.seq_len, self.rank, self.world_size = int(seq_len), int(rank), int(world_size)
        self.vocab_size, self.align_bos, self.bos_id = int(vocab_size), bool(align_bos), int(bos_id)
        self.device = torch.device(device)
        if sampling not in ("sequential", "random"):
            raise UserError(f"sampling={sampling!r}: sequential or random")
        if sampling == "random" and self.align_bos:
            raise UserError("sampling=random picks windows at any offset: it cannot also align them to BOS")
        self.sampling, self.seed = sampling, int(seed)
        self._batches = 0  # batches handed out: random sampling's position
        if sampling == "random":  # window starts each shard holds: random sampling's weights
            self._room = np.array([max(0, len(open_shard(f)) - self.seq_len) for f in self.files], dtype=np.int64)
            if self._room.sum() == 0:
                raise UserError(f"{self.files[0]}: no shard holds one window of {self.seq_len + 1} tokens")
        self._shard_index, self._pos = 0, 0  # where the next batch handed out starts
        self._open: dict[int, tuple] = {}  # sequential: at most the current and the next shard; random: every shard used
        self._checked: set[int] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="token-prefetch") if prefetch else None
        self._pending: tuple[int, int, int, Future] | None = None  # (tokens, shard, pos, future)

    # ---- shards -----------------------------------------------------------------------------
    def _shard(self, i: int):
        """(tokens memmap, BOS positions, BOS successors) of shard i; vocabulary checked on first open.

        With align_bos, ``succ[j]`` is the index of the first BOS at or after ``bos[j] + seq_len``
        (len(bos) if none): the start of the window after one starting at ``bos[j]``. It is
        computed once per shard, so placing a batch's windows is a short chain of list lookups.
        """
        with self._lock:
            if i not in self._open:
                # a plain ndarray view of the memmap: slicing it skips np.memmap's per-slice bookkeeping
                tokens = open_shard(self.files[i]).view(np.ndarray)
                if i not in self._checked:
                    check_vocab(tokens, self.vocab_size, self.files[i])
                    self._checked.add(i)
                bos = succ = None
                if self.align_bos:
                    bos = np.flatnonzero(tokens == self.bos_id)
                    succ = np.searchsorted(bos, bos + self.seq_len).tolist()
                # sequential reading keeps the current and the next shard; random windows come
                # from any shard, so their memmaps stay open rather than being reopened per window
                for j in list(self._open) if self.sampling == "sequential" else []:
                    if j != self._shard_index:
                        del self._open[j]
                self._open[i] = (tokens, bos, succ)
            return self._open[i]

    # ---- window placement -------------------------------------------------------------------
    def _starts(self, i: int, pos: int, n: int) -> np.ndarray | None:
        """Start of each of the n windows of a batch beginning at ``pos`` in shard i, or None if
        the shard's rest cannot hold them."""
        tokens, bos, succ = self._shard(i)
        L = self.seq_len
        if not self.align_bos:
            if pos + n * L + 1 > len(tokens):
                return None
            return pos + L * np.arange(n, dtype=np.int64)
        j, nb, chain = int(np.searchsorted(bos, pos)), len(bos), [0] * n
        for k in range(n):
            if j >= nb:
                return None
            chain[k] = j
            j = succ[j]
        starts = bos[chain]
        if starts[-1] + L + 1 > len(tokens):  # starts increase: only the last window can overrun
            return None
        return starts

    def _locate(self, shard: int, pos: int, n: int) -> tuple[int, np.ndarray]:
        starts = self._starts(shard, pos, n)
        if starts is None and pos > 0:  # the rest of this shard is too short: next shard
            shard, pos = (shard + 1) % len(self.files), 0
            starts = self._starts(shard, 0, n)
        if starts is None:  # a whole shard cannot hold one batch
            tokens, bos, _ = self._shard(shard)
            need = f"{n} windows of {self.seq_len + 1} tokens" + (" each starting at a BOS token" if self.align_bos else "")
            extra = f" and {len(bos)} BOS tokens (id {self.bos_id})" if self.align_bos else ""
            raise UserError(
                f"{self.files[shard]}: shard has {len(tokens)} tokens{extra}, too few for one global "
                f"batch of {n * self.seq_len} tokens ({need}); use a smaller batch or bigger shards"
            )
        return shard, starts

    def _read(self, shard: int, pos: int, tokens_per_batch: int):
        """Pure: (inputs, targets, next shard, next pos) for the batch starting at (shard, pos)."""
        n = tokens_per_batch // self.seq_len
        per_rank = n // self.world_size
        shard, starts = self._locate(shard, pos, n)
        tokens = self._shard(shard)[0]
        L = self.seq_len
        first = self.rank * per_rank
        if not self.align_bos:
            # this rank's windows are one contiguous run of tokens: read it once
            a = int(starts[first])
            t = _to_device(tokens[a : a + per_rank * L + 1], self.device)
            inputs, targets = t[:-1].view(per_rank, L), t[1:].view(per_rank, L)
        elif self.device.type == "cuda":
            # gather the windows into pinned memory, one H2D copy, split on the GPU
            host = torch.empty((per_rank, L + 1), dtype=torch.int64, pin_memory=True)
            h = host.numpy()
            for k, s in enumerate(starts[first : first + per_rank].tolist()):
                h[k] = tokens[s : s + L + 1]
            t = host.to(self.device, non_blocking=True)
            inputs, targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        else:
            x, y = np.empty((per_rank, L), dtype=np.int64), np.empty((per_rank, L), dtype=np.int64)
            for k, s in enumerate(starts[first : first + per_rank].tolist()):
                x[k] = tokens[s : s + L]
                y[k] = tokens[s + 1 : s + L + 1]
            inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
        return inputs, targets, shard, int(starts[-1]) + L

    def _read_random(self, batch: int, tokens_per_batch: int):
        """nanoGPT's get_batch over shards: each window of global batch number `batch` starts at
        a uniformly random token (shards weighted by how many starts they hold), drawn from a
        generator seeded by (seed, batch): every rank draws the same windows and takes its own,
        and a resumed run draws what the uninterrupted one would."""
        L, n = self.seq_len, tokens_per_batch // self.seq_len
        per_rank = n // self.world_size
        rng = np.random.default_rng([self.seed, batch])
        shards = rng.choice(len(self.files), size=n, p=self._room / self._room.sum())
        starts = rng.integers(0, self._room[shards])  # start in [0, len - L - 1]: the target fits
        x, y = np.empty((per_rank, L), dtype=np.int64), np.empty((per_rank, L), dtype=np.int64)
        first = self.rank * per_rank
        for k in range(per_rank):
            tokens = self._shard(int(shards[first + k]))[0]
            s = int(starts[first + k])
            x[k], y[k] = tokens[s:s + L], tokens[s + 1:s + L + 1]
        return _to_device(x, self.device), _to_device(y, self.device)

    # ---- public API ---------------------------------------------------------------------------
    def _validate_batch(self, global_batch_tokens: int) -> None:
        unit = self.world_size * self.seq_len
        if (
            not isinstance(global_batch_tokens, (int, np.integer))
            or global_batch_tokens < unit
            or global_batch_tokens % unit
        ):
            raise UserError(
                f"global batch of {global_batch_tokens} tokens is not a positive multiple of "
                f"world_size*seq_len = {self.world_size}*{self.seq_len} = {unit}"
            )

    def _take_pending(self, tokens_per_batch: int):
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        size, shard, pos, fut = pending
        try:
            result = fut.result()  # also when discarding: nothing may run behind our back
        except UserError:
            if (size, shard, pos) == (tokens_per_batch, self._shard_index, self._pos):
                raise
            return None
        if (size, shard, pos) != (tokens_per_batch, self._shard_index, self._pos):
            return None
        return result

    def next_batch(self, global_batch_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets): int64 (global_batch_tokens // (world_size*seq_len), seq_len) on device."""
        self._validate_batch(global_batch_tokens)
        global_batch_tokens = int(global_batch_tokens)
        if self.sampling == "random":
            self._batches += 1
            return self._read_random(self._batches - 1, global_batch_tokens)
        result = self._take_pending(global_batch_tokens)
        if result is None:
            result = self._read(self._shard_index, self._pos, global_batch_tokens)
        inputs, targets, self._shard_index, self._pos = result
        if self._pool is not None:
            shard, pos = self._shard_index, self._pos
            fut = self._pool.submit(self._read, shard, pos, global_batch_tokens)
            self._pending = (global_batch_tokens, shard, pos, fut)
        return inputs, targets

    def state_dict(self) -> dict:
        """Where the next batch starts; plain ints (torch.load(weights_only=True) reads it)."""
        return {"shard_index": self._shard_index, "position": self._pos, "num_shards": len(self.files),
                "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        try:
            shard, pos, num = int(state["shard_index"]), int(state["position"]), int(state["num_shards"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"loader state {state!r}: needs integer shard_index, position, num_shards") from None
        if num != len(self.files) or not 0 <= shard < num or pos < 0:
            raise UserError(
                f"loader state {state!r} does not fit these {len(self.files)} shards "
                f"(shard_index must be in 0..{len(self.files) - 1}, num_shards {len(self.files)})"
            )
        self._take_pending(-1)  # drop any speculative batch
        self._shard_index, self._pos = shard, pos
        self._batches = int(state.get("batches", 0))

    def close(self) -> None:
        self._take_pending(-1)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


class ValidationLoader:
    """This rank's slices of the first ``val_tokens`` tokens of the val stream, in global batches
    of ``batch_tokens`` (the last batch may be smaller), always the same tokens.

    The val stream is the val shards one after another; windows are consecutive (window i starts
    at ``i*seq_len``), which covers each of the val_tokens targets exactly once.
    """

    def __init__(
        self,
        files,
        *,
        val_tokens: int,
        seq_len: int,
        rank: int,
        world_size: int,
        batch_tokens: int,
        vocab_size: int,
        device="cpu",
    ):
        for name, v in [("val_tokens", val_tokens), ("seq_len", seq_len), ("world_size", world_size), ("batch_tokens", batch_tokens), ("vocab_size", vocab_size)]:
            _check_positive(name, v)
        if not 0 <= rank < world_size:
            raise UserError(f"rank={rank}: must be in 0..{world_size - 1} for world_size={world_size}")
        unit = world_size * seq_len
        if val_tokens % unit:
            raise UserError(
                f"val_tokens={val_tokens} is not divisible by world_size*seq_len = {world_size}*{seq_len} = {unit}"
            )
        if batch_tokens % unit:
            raise UserError(
                f"val batch of {batch_tokens} tokens is not divisible by world_size*seq_len = {world_size}*{seq_len} = {unit}"
            )
        self.files = _resolve_files(files)
        self.val_tokens, self.seq_len, self.rank, self.world_size = int(val_tokens), int(seq_len), int(rank), int(world_size)
        self.batch_tokens, self.device = int(batch_tokens), torch.device(device)
        # Only the part that is used: val_tokens + 1 tokens from the front of the stream.
        self._parts: list[np.ndarray] = []
        have = 0
        for path in self.files:
            if have >= self.val_tokens + 1:
                break
            tokens = open_shard(path)
            part = tokens[: self.val_tokens + 1 - have]
            check_vocab(part, vocab_size, path)
            self._parts.append(part)
            have += len(part)
        if have < self.val_tokens + 1:
            names = ", ".join(str(p) for p in self.files)
            raise UserError(
                f"val shards {names} have {have} tokens, fewer than val_tokens={self.val_tokens} (+1 for the last target)"
            )
        self._offsets = np.cumsum([0] + [len(p) for p in self._parts])

    def __len__(self) -> int:
        return -(-self.val_tokens // self.batch_tokens)

    def _range(self, a: int, b: int) -> np.ndarray:
        """Stream tokens [a, b), possibly across shards."""
        out, i = [], int(np.searchsorted(self._offsets, a, side="right")) - 1
        while a < b:
            part, lo = self._parts[i], int(self._offsets[i])
            take = part[a - lo : min(b - lo, len(part))]
            out.append(take)
            a += len(take)
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __iter__(self):
        L = self.seq_len
        for start in range(0, self.val_tokens, self.batch_tokens):
            size = min(self.batch_tokens, self.val_tokens - start)
            per_rank = size // self.world_size
            a = start + self.rank * per_rank
            t = _to_device(self._range(a, a + per_rank + 1), self.device)
            yield t[:-1].view(per_rank // L, L), t[1:].view(per_rank // L, L)


def val_batches(files, *, val_tokens, seq_len, rank, world_size, batch_tokens, vocab_size, device="cpu"):
    """Iterate this rank's (inputs, targets) validation batches; see ValidationLoader."""
    return iter(
        ValidationLoader(
            files,
            val_tokens=val_tokens,
            seq_len=seq_len,
            rank=rank,
            world_size=world_size,
            batch_tokens=batch_tokens,
            vocab_size=vocab_size,
            device=device,
        )
    )
