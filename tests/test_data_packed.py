"""The fork's data path (data/packed.py) on a hand-built shard of known documents, and against the
fork's own Shard.next_batch and get_bigram_hash where ../shared is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fork_model_reference as fr
from base import UserError
from data.packed import BOS_ID, PackedTrainLoader, bigram_hash, pack_spans, packed_val_batches
from data.shards import write_shard

DOC_LENS = [4, 6, 3, 10, 5, 4, 7, 3]  # each starts with BOS; doc k holds 100k+1, 100k+2, ...


def _tokens() -> np.ndarray:
    out = []
    for k, n in enumerate(DOC_LENS):
        out += [BOS_ID] + [100 * k + j for j in range(1, n)]
    return np.array(out)


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "train_000.bin"
    write_shard(path, _tokens())
    return path


def _docs(*spans):
    t = _tokens()
    return np.concatenate([t[a:b] for a, b in spans])


def test_training_batches_by_hand(shard):
    loader = PackedTrainLoader([shard], num_tokens=8, max_seq_len=6, bigram_vocab_size=1000)
    # (document spans of the batch's n+1 tokens, cumulative lengths)
    expect = [
        ([(0, 4), (4, 9)], [4, 8]),  # doc 1 cut to what the batch needs
        ([(10, 13), (13, 19)], [3, 8]),  # doc 3 cut at max_seq_len=6; its rest is skipped
        ([(23, 28), (28, 32)], [5, 8]),
        ([(32, 38), (39, 42)], [6, 8]),  # doc 6 cut at max_seq_len
        ([(0, 4), (4, 9)], [4, 8]),  # the shard is used up: the files start again
    ]
    for spans, cum in expect:
        b = loader.next_batch()
        buf = _docs(*spans)
        assert b.inputs.tolist() == buf[:-1].tolist() and b.inputs.dtype == torch.int32
        assert b.targets.tolist() == buf[1:].tolist() and b.targets.dtype == torch.int64
        assert b.cum_lengths.tolist() == [0] + cum + [8] * (128 - 3)  # padded to max_num_docs
        assert b.inputs[0] == BOS_ID
        assert b.bigram.tolist() == bigram_hash(b.inputs, 1000).tolist()


def test_ranks_and_grad_accum_split_a_step_as_the_fork(shard):
    one = PackedTrainLoader([shard], num_tokens=8, max_seq_len=6)
    seq = [one.next_batch() for _ in range(4)]
    # world size 2: each rank packs 8 of a 16-token step, rank 1 right after rank 0's documents
    r0 = PackedTrainLoader([shard], num_tokens=16, max_seq_len=6, world_size=2, rank=0)
    r1 = PackedTrainLoader([shard], num_tokens=16, max_seq_len=6, world_size=2, rank=1)
    for k in range(2):
        assert r0.next_batch().inputs.tolist() == seq[2 * k].inputs.tolist()
        assert r1.next_batch().inputs.tolist() == seq[2 * k + 1].inputs.tolist()
    # gradient accumulation: micro-batches of num_tokens // grad_accum
    acc = PackedTrainLoader([shard], num_tokens=16, max_seq_len=6, grad_accum=2)
    assert [acc.next_batch().inputs.tolist() for _ in range(2)] == [s.inputs.tolist() for s in seq[:2]]
    acc.set_sizes(32, 6, 4)  # the fork's .send((num_tokens, max_seq_len, grad_accum))
    assert acc.next_batch().inputs.tolist() == seq[2].inputs.tolist()


def test_validation_windows_are_contiguous_with_bos_boundaries(shard):
    t = _tokens()
    got = {r: list(packed_val_batches([shard], val_tokens=32, val_batch_size=16, world_size=2, rank=r,
                                      bigram_vocab_size=1000)) for r in (0, 1)}
    for r in (0, 1):
        assert len(got[r]) == 2
        for m, b in enumerate(got[r]):
            a = 16 * m + 8 * r
            assert b.inputs.tolist() == t[a:a + 8].tolist() and b.targets.tolist() == t[a + 1:a + 9].tolist()
    # rank 1's first window, tokens 8..15: BOS at 10 and 13 -> boundaries 2 and 5
    assert got[1][0].cum_lengths[:5].tolist() == [0, 2, 5, 8, 8]
    # rank 0's first window starts with a BOS: a zero-length first document, as the fork
    assert got[0][0].cum_lengths[:4].tolist() == [0, 0, 4, 8]


def test_bad_sizes_are_one_clear_line(shard):
    with pytest.raises(UserError, match=r"num_tokens=10 must be divisible by world_size x grad_accum = 1 x 4"):
        PackedTrainLoader([shard], num_tokens=10, max_seq_len=6, grad_accum=4)
    with pytest.raises(UserError, match=r"holds 65 tokens of documents"):
        PackedTrainLoader([shard], num_tokens=64, max_seq_len=64).next_batch()
    with pytest.raises(UserError, match=r"hold fewer than val_tokens=64"):
        list(packed_val_batches([shard], val_tokens=64, val_batch_size=32))


@pytest.mark.skipif(not fr.FORK_TRAIN.exists(), reason=fr.SKIP_REASON)
def test_spans_and_bigram_hash_match_the_forks():
    fork = fr.load(fr.DATA_DEFS, bigram_vocab_size=50304 * 5)
    g = np.random.default_rng(0)
    lens = g.integers(2, 60, size=300)
    toks = np.concatenate([np.r_[BOS_ID, g.integers(0, 50257, size=n - 1)] for n in lens])
    bos = np.flatnonzero(toks == BOS_ID)
    for world_size, n_local, max_len in ((1, 64, 16), (2, 96, 32), (3, 40, 128)):
        shard = fork.Shard(torch.from_numpy(toks.astype(np.int32)), world_size)
        shard._loader_thread.join()
        i = 0
        for _ in range(5):
            s, e = shard.next_batch(n_local, max_len)
            ours = pack_spans(bos, len(toks), i, world_size, n_local, max_len)
            assert ours is not None
            assert [list(map(int, x)) for x in s] == ours[0] and [list(map(int, x)) for x in e] == ours[1]
            i = ours[2]
            assert i == shard.i
    x = torch.from_numpy(toks[:500].astype(np.int32))
    ours = bigram_hash(x, 50304 * 5)
    assert ours.tolist() == fork.get_bigram_hash(x).tolist()
    assert ours.dtype == torch.int32 and 0 <= ours.min() and ours.max() <= 50304 * 5 - 1
