import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from base import UserError
from data.loader import DistributedTokenLoader, ValidationLoader, val_batches
from data.shards import write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, VOCAB = 50256, 50257


def _synthetic_shards(d, sizes, seed=0, doc_len=(3, 40)):
    """Shards of documents: each starts with BOS followed by random non-BOS ids."""
    rng = np.random.default_rng(seed)
    arrays, paths = [], []
    for k, n in enumerate(sizes):
        toks = rng.integers(0, BOS, size=n, dtype=np.int64)
        pos = 0
        while pos < n:
            toks[pos] = BOS
            pos += int(rng.integers(*doc_len))
        p = d / f"train_{k:06d}.bin"
        write_shard(p, toks)
        arrays.append(toks)
        paths.append(p)
    return paths, arrays


def _reference_batches(arrays, seq_len, sizes, align_bos):
    """Independent, slow reference: the global batches as lists of windows."""
    s, p, out = 0, 0, []
    for T in sizes:
        n = T // seq_len
        for attempt in range(2):
            shard, wins, search = arrays[s], [], p
            for _ in range(n):
                if align_bos:
                    while search < len(shard) and shard[search] != BOS:
                        search += 1
                start = search
                if start + seq_len + 1 > len(shard):
                    break
                wins.append(shard[start : start + seq_len + 1])
                search = start + seq_len
            if len(wins) == n:
                break
            s, p = (s + 1) % len(arrays), 0
        assert len(wins) == n
        p = search
        out.append(np.stack(wins))
    return out


def _global_batches(paths, seq_len, sizes, world_size, align_bos, prefetch=True):
    loaders = [
        DistributedTokenLoader(paths, seq_len=seq_len, rank=r, world_size=world_size, vocab_size=VOCAB,
                               align_bos=align_bos, prefetch=prefetch)
        for r in range(world_size)
    ]
    out = []
    for T in sizes:
        parts = [ld.next_batch(T) for ld in loaders]
        for x, y in parts:
            assert x.dtype == y.dtype == torch.int64
            assert x.shape == y.shape == (T // (world_size * seq_len), seq_len)
        x = torch.cat([p[0] for p in parts]).numpy()
        y = torch.cat([p[1] for p in parts]).numpy()
        out.append(np.concatenate([x, y[:, -1:]], axis=1))
    for ld in loaders:
        ld.close()
    return out


SIZES = [64, 64, 128, 64, 256, 128, 128, 64, 256, 256, 256, 64]  # tokens; crosses shards and cycles


@pytest.mark.parametrize("align_bos", [False, True])
def test_same_tokens_whatever_world_size(tmp_path, align_bos):
    paths, arrays = _synthetic_shards(tmp_path, [700, 1100, 900])
    seq_len = 16
    expected = _reference_batches(arrays, seq_len, SIZES, align_bos)
    for world in (1, 2, 4):
        got = _global_batches(paths, seq_len, SIZES, world, align_bos)
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(g, e)
    no_prefetch = _global_batches(paths, seq_len, SIZES, 2, align_bos, prefetch=False)
    for e, g in zip(expected, no_prefetch):
        np.testing.assert_array_equal(g, e)


def test_align_bos_windows_start_with_bos_and_truncate_long_docs(tmp_path):
    paths, arrays = _synthetic_shards(tmp_path, [3000], doc_len=(2, 60))
    ld = DistributedTokenLoader(paths, seq_len=32, rank=1, world_size=2, vocab_size=VOCAB, align_bos=True)
    for _ in range(10):
        x, y = ld.next_batch(128)
        assert (x[:, 0] == BOS).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
    plain = DistributedTokenLoader(paths, seq_len=32, rank=0, world_size=1, vocab_size=VOCAB)
    x, _ = plain.next_batch(32 * 20)
    assert not (x[:, 0] == BOS).all()  # the plain loader does not align (sanity of the test data)


def test_targets_are_inputs_shifted(tmp_path):
    paths, arrays = _synthetic_shards(tmp_path, [1000])
    x, y = DistributedTokenLoader(paths, seq_len=8, rank=0, world_size=1, vocab_size=VOCAB).next_batch(64)
    flat = arrays[0][: 65]
    np.testing.assert_array_equal(x.reshape(-1).numpy(), flat[:64])
    np.testing.assert_array_equal(y.reshape(-1).numpy(), flat[1:65])


@pytest.mark.parametrize("align_bos", [False, True])
def test_state_round_trip_resumes_same_batches(tmp_path, align_bos):
    paths, _ = _synthetic_shards(tmp_path, [700, 900])
    kw = dict(seq_len=16, rank=1, world_size=2, vocab_size=VOCAB, align_bos=align_bos)
    a = DistributedTokenLoader(paths, **kw)
    for T in SIZES[:5]:
        a.next_batch(T)
    torch.save(a.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert all(type(v) is int for v in state.values())
    b = DistributedTokenLoader(paths, **kw)
    b.next_batch(64)  # a resumed loader may have moved already: load_state_dict overrides it
    b.load_state_dict(state)
    for T in SIZES[5:]:
        xa, ya = a.next_batch(T)
        xb, yb = b.next_batch(T)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(UserError, match="does not fit these 2 shards"):
        b.load_state_dict({"shard_index": 5, "position": 0, "num_shards": 2})


def test_batch_not_divisible(tmp_path):
    paths, _ = _synthetic_shards(tmp_path, [1000])
    ld = DistributedTokenLoader(paths, seq_len=16, rank=0, world_size=4, vocab_size=VOCAB)
    with pytest.raises(UserError, match=r"global batch of 100 tokens .* world_size\*seq_len = 4\*16 = 64"):
        ld.next_batch(100)


def test_shard_too_small(tmp_path):
    paths, _ = _synthetic_shards(tmp_path, [1000, 50])
    ld = DistributedTokenLoader(paths, seq_len=16, rank=0, world_size=1, vocab_size=VOCAB)
    ld.next_batch(512)
    with pytest.raises(UserError, match=r"train_000001\.bin: shard has 50 tokens, too few for one global batch of 512"):
        ld.next_batch(512)
    with pytest.raises(UserError, match=r"train_000000\.bin: shard has 1000 tokens.*2048"):
        DistributedTokenLoader(paths, seq_len=16, rank=0, world_size=1, vocab_size=VOCAB).next_batch(2048)


def test_vocab_checked_per_shard(tmp_path):
    paths, _ = _synthetic_shards(tmp_path, [1000])
    bad = tmp_path / "train_000001.bin"
    write_shard(bad, np.full(600, 50300))
    ld = DistributedTokenLoader([paths[0], bad], seq_len=16, rank=0, world_size=1, vocab_size=VOCAB, prefetch=False)
    ld.next_batch(512)
    with pytest.raises(UserError, match=r"train_000001\.bin: token id 50300 >= vocab_size 50257"):
        ld.next_batch(512)


def test_missing_and_empty_data_dir(tmp_path):
    kw = dict(seq_len=16, rank=0, world_size=1, vocab_size=VOCAB)
    with pytest.raises(UserError, match="no such shard file or data directory.*prepare_corpus"):
        DistributedTokenLoader(str(tmp_path / "nope"), **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no \.bin shards"):
        DistributedTokenLoader(str(tmp_path / "empty"), **kw)
    with pytest.raises(UserError, match=r"no shards match"):
        DistributedTokenLoader(str(tmp_path / "empty" / "*.bin"), **kw)


def test_batch_size_change_discards_prefetch(tmp_path):
    paths, arrays = _synthetic_shards(tmp_path, [5000])
    ld = DistributedTokenLoader(paths, seq_len=16, rank=0, world_size=1, vocab_size=VOCAB)
    x1, _ = ld.next_batch(64)
    x2, _ = ld.next_batch(128)  # prefetched for 64: discarded
    x3, _ = ld.next_batch(128)
    np.testing.assert_array_equal(torch.cat([x1, x2, x3]).reshape(-1).numpy(), arrays[0][: 64 + 128 + 128])


def _val_all(paths, world, batch, val_tokens=512, seq_len=16):
    parts = [
        list(val_batches(paths, val_tokens=val_tokens, seq_len=seq_len, rank=r, world_size=world,
                         batch_tokens=batch, vocab_size=VOCAB))
        for r in range(world)
    ]
    xs = [torch.cat([parts[r][k][0] for r in range(world)]) for k in range(len(parts[0]))]
    ys = [torch.cat([parts[r][k][1] for r in range(world)]) for k in range(len(parts[0]))]
    return torch.cat(xs).reshape(-1).numpy(), torch.cat(ys).reshape(-1).numpy()


def test_val_batches_same_tokens_across_world_sizes_and_shards(tmp_path):
    paths, arrays = _synthetic_shards(tmp_path, [300, 150, 400])  # val stream crosses two shard ends
    stream = np.concatenate(arrays)
    for world in (1, 2, 4):
        for batch in (64, 128, 192):  # 192 leaves a smaller last batch
            x, y = _val_all(paths, world, batch)
            np.testing.assert_array_equal(x, stream[:512])
            np.testing.assert_array_equal(y, stream[1:513])
    vl = ValidationLoader(paths, val_tokens=512, seq_len=16, rank=0, world_size=2, batch_tokens=192, vocab_size=VOCAB)
    assert len(vl) == 3 and [b[0].shape for b in vl] == [(6, 16), (6, 16), (4, 16)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(vl, vl))  # always the same tokens


def test_val_errors(tmp_path):
    paths, _ = _synthetic_shards(tmp_path, [300])
    kw = dict(seq_len=16, rank=0, world_size=2, batch_tokens=64, vocab_size=VOCAB)
    with pytest.raises(UserError, match=r"val shards .*train_000000\.bin have 300 tokens, fewer than val_tokens=320"):
        ValidationLoader(paths, val_tokens=320, **kw)
    with pytest.raises(UserError, match=r"val_tokens=100 is not divisible by world_size\*seq_len = 2\*16 = 32"):
        ValidationLoader(paths, val_tokens=100, **kw)
    bad = tmp_path / "v.bin"
    write_shard(bad, np.full(400, 60000))
    with pytest.raises(UserError, match=r"v\.bin: token id 60000 >= vocab_size 50257"):
        ValidationLoader([bad], val_tokens=256, **kw)


WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from data.loader import DistributedTokenLoader, val_batches
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    paths, out = sys.argv[1].split(","), sys.argv[2]
    ld = DistributedTokenLoader(paths, seq_len=16, rank=rank, world_size=world, vocab_size=50257, align_bos=True)
    mine = [ld.next_batch(T)[0] for T in [64, 128, 64, 256, 256, 128]]
    mine += [x for x, _ in val_batches(paths, val_tokens=256, seq_len=16, rank=rank, world_size=world,
                                        batch_tokens=128, vocab_size=50257)]
    local = torch.cat(mine).float()  # ids < 2**24: exact in float32, which gloo all-gathers
    gathered = torch.empty(world * local.shape[0], local.shape[1])
    dist.all_gather_into_tensor(gathered, local)
    if rank == 0:
        torch.save(gathered.long(), out)
    dist.destroy_process_group()
    """
)


@pytest.mark.multiprocess
def test_torchrun_gloo_two_ranks_match_one(tmp_path):
    paths, _ = _synthetic_shards(tmp_path, [700, 900])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "gathered.pt"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(script), ",".join(map(str, paths)), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    gathered = torch.load(out, weights_only=True)
    # rank-major gather -> per-batch global order, then compare with one rank doing it all
    one = DistributedTokenLoader(paths, seq_len=16, rank=0, world_size=1, vocab_size=VOCAB, align_bos=True)
    sizes = [64, 128, 64, 256, 256, 128]
    ref = [one.next_batch(T)[0] for T in sizes]
    ref += [x for x, _ in val_batches(paths, val_tokens=256, seq_len=16, rank=0, world_size=1, batch_tokens=128, vocab_size=VOCAB)]
    per_rank = gathered.reshape(2, -1, 16)
    rows, k = [], 0
    for b in ref:
        h = b.shape[0] // 2
        rows.append(torch.cat([per_rank[0, k : k + h], per_rank[1, k : k + h]]))
        k += h
    assert torch.equal(torch.cat(rows), torch.cat(ref))


@pytest.mark.cuda
@pytest.mark.parametrize("align_bos", [False, True])
def test_cuda_matches_cpu(tmp_path, align_bos):
    """CPU twin: test_same_tokens_whatever_world_size. Pinned memory + non_blocking copy path."""
    paths, _ = _synthetic_shards(tmp_path, [700, 900])
    kw = dict(seq_len=16, rank=1, world_size=2, vocab_size=VOCAB, align_bos=align_bos)
    cpu, gpu = DistributedTokenLoader(paths, **kw), DistributedTokenLoader(paths, device="cuda", **kw)
    for T in SIZES:
        (xc, yc), (xg, yg) = cpu.next_batch(T), gpu.next_batch(T)
        assert xg.is_cuda and yg.is_cuda and xg.is_contiguous() and yg.is_contiguous()
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
    vx = [x for x, _ in val_batches(paths, val_tokens=256, seq_len=16, rank=0, world_size=2, batch_tokens=128,
                                    vocab_size=VOCAB, device="cuda")]
    assert all(x.is_cuda for x in vx)


def test_random_sampling_is_seeded_by_batch_number_shared_by_ranks_and_resumable(tmp_path):
    """sampling=random (nanoGPT's get_batch): windows at random offsets, the same global batch on
    every rank (each takes its rows), the same batches after a resume, and a different seed
    draws different windows."""
    files, shards = _synthetic_shards(tmp_path, [5000, 3000])
    kw = dict(seq_len=16, vocab_size=VOCAB, sampling="random")
    one = DistributedTokenLoader(files, rank=0, world_size=1, seed=3, **kw)
    batches = [one.next_batch(128) for _ in range(4)]
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in x.numpy():  # every window is a real run of one shard's tokens
            assert any(np.array_equal(row, s[i:i + 16]) for s in shards for i in np.flatnonzero(s == row[0]))
    assert not torch.equal(batches[0][0], batches[1][0])
    two = [DistributedTokenLoader(files, rank=r, world_size=2, seed=3, **kw) for r in range(2)]
    assert torch.equal(torch.cat([t.next_batch(128)[0] for t in two]), batches[0][0])
    resumed = DistributedTokenLoader(files, rank=0, world_size=1, seed=3, **kw)
    state = DistributedTokenLoader(files, rank=0, world_size=1, seed=3, **kw)
    for _ in range(2):
        state.next_batch(128)
    resumed.load_state_dict(state.state_dict())
    assert torch.equal(resumed.next_batch(128)[0], batches[2][0])
    other = DistributedTokenLoader(files, rank=0, world_size=1, seed=4, **kw)
    assert not torch.equal(other.next_batch(128)[0], batches[0][0])
