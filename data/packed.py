"""The fork's data path (the fork's train_gpt.py: Shard, get_bigram_hash,
distributed_data_generator): document-packed micro-batches for the speedrun model (B = 1).

Training (BOS-aligned): a global step of N tokens is `grad_accum` micro-batches of N // grad_accum
tokens; each rank packs N // grad_accum // world_size tokens (+1 for the shifted targets) from
whole documents that start at a BOS. Rank r takes the documents after rank r-1's, in shard order:
each document is cut at `max_seq_len` tokens (the rest of it is skipped) and the last one at what
the batch still needs. The targets drop the first token, so the last document is one token
shorter on the target side; `cum_lengths` = [0, c1, ..., n] padded with n to `max_num_docs`
(next multiple of 128 above n // 300). When a shard has too few documents left for the whole
step (all ranks), the rest of it is skipped and the next shard starts; after the last shard the
files start again (the fork stops there; CPU runs on small corpora need more).

Validation (unaligned): contiguous windows; micro-batch m of rank r reads tokens
[pos + r*n, pos + (r+1)*n + 1) with pos advancing by world_size*n each micro-batch; document
boundaries (`cum_lengths`) are the BOS positions among the inputs, after a leading 0.

The bigram hash inputs: position 0 gets m = bigram_vocab_size - 1, position i the hash
(36313*x[i] XOR 27191*x[i-1]) mod m, where x[0] counts as m (the fork overwrites it first) (a document's BOS hashes with the
previous document's last token, as the fork).

Differences from the fork, on purpose: the fork first indexes BOS positions in the first 6M tokens
of a shard and switches to the full index when a background scan finishes (a race that can make
the first batches of a large shard differ run to run); here the full index is built at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from base import UserError
from data.shards import find_shards, open_shard
from data.tokenizer import EOT

BOS_ID = EOT  # 50256: every document starts with <|endoftext|>
BIGRAM_MUL_CUR, BIGRAM_MUL_PREV = 36313, 27191


def next_multiple(v: int, n: int) -> int:
    return max(n, -(-v // n) * n)


def max_num_docs(num_tokens_local: int) -> int:
    """Length of the padded cum_lengths (the fork: median document ~400 tokens)."""
    return next_multiple(num_tokens_local // 300, 128)


def bigram_hash(x: torch.Tensor, bigram_vocab_size: int) -> torch.Tensor:
    """int32 hash ids of (previous, current) token pairs; position 0 is the reserved last id."""
    mod = bigram_vocab_size - 1
    # int32 on purpose: the fork's products wrap around (27191 * the reserved id overflows), and
    # the ids must be the same as its
    x = x.to(torch.int32)
    prev = x[:-1].clone()
    prev[:1] = mod  # the fork sets x[0] before hashing, so position 1 pairs with the reserved id
    out = torch.empty_like(x)
    out[0] = mod
    out[1:] = torch.bitwise_xor(BIGRAM_MUL_CUR * x[1:], BIGRAM_MUL_PREV * prev) % mod
    return out


def pack_spans(bos_idx: np.ndarray, size: int, i: int, world_size: int, num_tokens_local: int,
               max_seq_len: int) -> tuple[list[list[int]], list[list[int]], int] | None:
    """(starts, ends) of each rank's documents and the next document index, or None when the
    shard has too few documents left (the fork's Shard.next_batch)."""
    n = len(bos_idx)
    starts: list[list[int]] = [[] for _ in range(world_size)]
    ends: list[list[int]] = [[] for _ in range(world_size)]
    for r in range(world_size):
        cur_len = 0
        while cur_len <= num_tokens_local:
            if i >= n:
                return None
            cur = int(bos_idx[i])
            nxt = int(bos_idx[i + 1]) if i + 1 < n else size
            end = min(nxt, cur + max_seq_len, cur + num_tokens_local - cur_len + 1)
            starts[r].append(cur)
            ends[r].append(end)
            cur_len += end - cur
            i += 1
    return starts, ends, i


@dataclass
class PackedBatch:
    inputs: torch.Tensor  # (n,) int32
    targets: torch.Tensor  # (n,) int64
    cum_lengths: torch.Tensor  # (max_num_docs,) int32
    bigram: torch.Tensor  # (n,) int32

    def to(self, device) -> "PackedBatch":
        nb = device.type == "cuda" if isinstance(device, torch.device) else False
        return PackedBatch(*(t.to(device, non_blocking=nb) for t in (self.inputs, self.targets, self.cum_lengths,
                                                                     self.bigram)))


def _files(files) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        return find_shards(files)
    return [Path(f) for f in files]


def _batch(inputs: np.ndarray, targets: np.ndarray, cum: np.ndarray, n: int, bigram_vocab_size: int,
           where: str) -> PackedBatch:
    docs = max_num_docs(n)
    if len(cum) + 1 > docs:
        raise UserError(f"{where}: {len(cum)} documents in a micro-batch of {n} tokens exceed max_num_docs={docs} "
                        "(the fork's n // 300 rounded up to 128); use longer documents or a larger batch")
    cu = np.full(docs, n, dtype=np.int32)
    cu[0] = 0
    cu[1:len(cum) + 1] = cum
    x = torch.from_numpy(inputs.astype(np.int32))
    return PackedBatch(x, torch.from_numpy(targets.astype(np.int64)), torch.from_numpy(cu),
                       bigram_hash(x, bigram_vocab_size))


class PackedTrainLoader:
    """BOS-aligned packed micro-batches for one rank. `next_batch()` gives the next micro-batch;
    `set_sizes(num_tokens, max_seq_len, grad_accum)` changes the sizes (the fork's `.send`)."""

    def __init__(self, files, *, num_tokens: int, max_seq_len: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, bigram_vocab_size: int = 50304 * 5, vocab_size: int | None = None):
        self.files = _files(files)
        self.rank, self.world_size = rank, world_size
        self.bigram_vocab_size, self.vocab_size = bigram_vocab_size, vocab_size
        self.set_sizes(num_tokens, max_seq_len, grad_accum)
        self.file_idx = 0
        self._open(0)

    def set_sizes(self, num_tokens: int, max_seq_len: int, grad_accum: int) -> None:
        for name, v in (("num_tokens", num_tokens), ("max_seq_len", max_seq_len), ("grad_accum", grad_accum)):
            if v < 1:
                raise UserError(f"packed loader: {name}={v} must be >= 1")
        if num_tokens % (self.world_size * grad_accum):
            raise UserError(f"packed loader: num_tokens={num_tokens} must be divisible by world_size x grad_accum"
                            f" = {self.world_size} x {grad_accum}")
        self.num_tokens_local = num_tokens // grad_accum // self.world_size
        self.max_seq_len = max_seq_len
        self.sizes = (num_tokens, max_seq_len, grad_accum)

    def _open(self, idx: int) -> None:
        self.file_idx = idx % len(self.files)
        self.tokens = open_shard(self.files[self.file_idx])
        self.bos_idx = np.flatnonzero(self.tokens == BOS_ID)
        self.doc = 0

    def next_batch(self) -> PackedBatch:
        n = self.num_tokens_local
        for _ in range(2 * len(self.files) + 1):
            spans = pack_spans(self.bos_idx, len(self.tokens), self.doc, self.world_size, n, self.max_seq_len)
            if spans is not None:
                break
            self._open(self.file_idx + 1)
        else:
            raise UserError(f"packed loader: no shard of {self.files[0]} ... holds {n + 1} tokens of documents "
                            f"for {self.world_size} rank(s) (too few BOS={BOS_ID} tokens or too small)")
        starts, ends, self.doc = spans
        s, e = np.asarray(starts[self.rank]), np.asarray(ends[self.rank])
        buf = np.concatenate([self.tokens[a:b] for a, b in zip(s, e)])
        if self.vocab_size is not None and buf.max() >= self.vocab_size:
            raise UserError(f"{self.files[self.file_idx]}: token id {int(buf.max())} >= vocab_size={self.vocab_size}")
        e = e.copy()
        e[-1] -= 1  # the targets are one token shorter: the last document loses its last input
        return _batch(buf[:-1], buf[1:], np.cumsum(e - s), n, self.bigram_vocab_size, str(self.files[self.file_idx]))

    def state_dict(self) -> dict:
        return {"file_idx": self.file_idx, "doc": self.doc, "sizes": self.sizes}

    def load_state_dict(self, state: dict) -> None:
        self.set_sizes(*state["sizes"])
        self._open(state["file_idx"])
        self.doc = state["doc"]


def packed_val_batches(files, *, val_tokens: int, val_batch_size: int, grad_accum: int = 1, rank: int = 0,
                       world_size: int = 1, bigram_vocab_size: int = 50304 * 5):
    """The fork's validation micro-batches for one rank: grad_accum * val_tokens // val_batch_size
    of them, each val_batch_size // grad_accum // world_size tokens of contiguous stream."""
    paths = _files(files)
    if val_batch_size % (world_size * grad_accum) or val_tokens % val_batch_size:
        raise UserError(f"packed validation: val_batch_size={val_batch_size} must divide val_tokens={val_tokens} "
                        f"and be divisible by world_size x grad_accum = {world_size} x {grad_accum}")
    num_tokens = val_batch_size // grad_accum
    n = num_tokens // world_size
    steps = grad_accum * val_tokens // val_batch_size
    file_iter = iter(paths)
    path = next(file_iter)
    tokens, pos = open_shard(path), 0
    for _ in range(steps):
        if pos + num_tokens + 1 >= len(tokens):
            path = next(file_iter, None)
            if path is None:
                raise UserError(f"packed validation: the val shards {paths[0]} ... hold fewer than val_tokens="
                                f"{val_tokens} tokens (+1) in windows of {num_tokens}")
            tokens, pos = open_shard(path), 0
        a = pos + rank * n
        buf = np.asarray(tokens[a:a + n + 1])
        inputs = buf[:-1]
        yield _batch(inputs, buf[1:], np.flatnonzero(inputs == BOS_ID), n, bigram_vocab_size, str(path))
        pos += num_tokens
