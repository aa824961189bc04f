"""Our SpeedrunGPT against the fork's own GPT class (taken from ../shared/reference at test time).

Both at a small size (11 layers, dim 48, 4 heads of 12, vocab 128) with the same weights (every
parameter randomised, so no zero-initialised part hides), the same packed documents, fp32: the
same training loss (MTP-weighted, summed) and gradients, at several window sizes including after
a YaRN apply, and the same evaluation loss. Then a feature switched off in ours must break it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fork_model_reference as fr
from harness.speedrun_model import ForwardArgs, SpeedrunFeatures, SpeedrunGPT

pytestmark = pytest.mark.skipif(not fr.FORK_TRAIN.exists(), reason=fr.SKIP_REASON)

SIZE = dict(vocab_size=128, num_layers=11, model_dim=48, num_heads=4, head_dim=12)
BIGRAM_VOCAB = 97
T = 64
MAX_SEQ_LEN = 64
BF16_GRADS = ("attn_gate_bank", "ve_gate_bank")


@pytest.fixture(scope="module")
def fork():
    return fr.load(fr.MODEL_DEFS + ("get_bigram_hash",), bigram_vocab_size=BIGRAM_VOCAB,
                   train_max_seq_len=MAX_SEQ_LEN, val_batch_size=MAX_SEQ_LEN)


def _randomise(model: SpeedrunGPT, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    L = model.num_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name == "scalars":
                base = p.clone()
                p.copy_(base + 0.3 * r)  # around the fork's initial values (skip lambda etc.)
                p[4 * L].fill_(0.7)  # a visible smear
            elif name == "x0_lambdas":
                p.copy_(0.3 * r)
            elif name in ("attn_bank", "mlp_bank"):
                p.copy_(r * model.model_dim ** -0.5)
            elif name in ("attn_gate_bank", "ve_gate_bank", "smear_gate.weight", "skip_gate.weight"):
                p.copy_(0.5 * r)
            else:  # embeddings, value/bigram embeddings, head
                p.copy_(0.5 * r)


def _pair(fork, features=SpeedrunFeatures()):
    torch.manual_seed(0)
    ours = SpeedrunGPT(**SIZE, bigram_vocab_size=BIGRAM_VOCAB, max_seq_len=MAX_SEQ_LEN, features=features)
    _randomise(ours)
    theirs = fork.GPT(vocab_size=SIZE["vocab_size"], num_layers=11, num_heads=4, head_dim=12, model_dim=48,
                      max_seq_len=MAX_SEQ_LEN)
    theirs.lm_head.use_fp8 = False  # the fork's non-FP8 path (x @ W)
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            src = mine["lm_head" if name == "lm_head.weight" else name]
            assert p.shape == src.shape, name
            p.data = src.detach().clone().float()  # the fork creates some banks in bf16
    return ours, theirs


def _batch(fork):
    g = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, 128, (T,), generator=g, dtype=torch.int64)
    doc_lens = [9, 23, 17, 15]  # four packed documents
    cu = torch.full((16,), T, dtype=torch.int32)
    cu[0] = 0
    cu[1:len(doc_lens) + 1] = torch.tensor(doc_lens).cumsum(0)
    targets = torch.randint(0, 128, (T,), generator=g, dtype=torch.int64)
    bigram = fork.get_bigram_hash(inputs)
    return inputs, targets, cu, bigram


def _run(model, batch, mtp, ws_short, ws_long, ours: bool, train: bool = True):
    # the fork's model takes the fork's ForwardScheduleConfig (_run.fork: the loaded fork namespace)
    model.train(train)
    model.zero_grad(set_to_none=True)
    inputs, targets, cu, bigram = batch
    if ours:
        loss = model(inputs, targets, cu, bigram.long(), ForwardArgs(mtp, ws_short, ws_long))
    else:
        cfg = _run.fork.ForwardScheduleConfig(mtp_weights=mtp, ws_short=ws_short, ws_long=ws_long)
        loss = model(inputs, targets, cu, bigram, cfg)
    if train:
        loss.backward()
        grads = {("lm_head" if n == "lm_head.weight" else n): p.grad.clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        return loss.detach(), grads
    return loss.detach(), {}


def _compare(ours, theirs, batch, mtp, ws, train=True, tight=True):
    lo, go = _run(ours, batch, mtp, *ws, ours=True, train=train)
    lt, gt = _run(theirs, batch, mtp, *ws, ours=False, train=train)
    if not tight:
        return lo, lt, go, gt
    torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-5)
    assert go.keys() == gt.keys()
    for name in gt:
        scale = gt[name].abs().max().item() + 1e-12
        # the gate banks enter both forwards as bf16, so their gradients come back rounded to
        # bf16: an fp32 difference in the last bits can flip one rounding (one bf16 ulp, 2^-7)
        rtol = 2 ** -7 if name in BF16_GRADS else 1e-4
        torch.testing.assert_close(go[name], gt[name], rtol=rtol, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    return lo, lt, go, gt


def test_train_and_eval_parity_through_the_schedule(fork):
    _run.fork = fork
    ours, theirs = _pair(fork)
    batch = _batch(fork)
    # stage-like settings: (MTP weights, short window, long window), windows shrunk to fit T
    stages = [
        (torch.tensor([1.0, 0.5, 0.25]), 4, 12),
        (torch.tensor([1.0, 0.3]), 12, 28),
        (torch.tensor([1.0]), 20, 44),
    ]
    prev_long = stages[0][2]
    losses = []
    for mtp, ws_s, ws_l in stages:
        if ws_l != prev_long:  # YaRN on the long-window change, as the fork's advance_schedule
            ours.apply_window_change(prev_long, ws_l)
            theirs.yarn.apply(prev_long, ws_l)
            theirs.yarn_paired_head.apply(prev_long, ws_l)
            prev_long = ws_l
        assert ours.yarn.attn_scale == pytest.approx(theirs.yarn.attn_scale, rel=1e-12)
        lo, _, go, _ = _compare(ours, theirs, batch, mtp, (ws_s, ws_l))
        losses.append(lo.item())
        # every parameter the forward uses gets a gradient (the padding MLP layer does not)
        assert set(go) == {n for n, _ in ours.named_parameters()}
    assert len(set(losses)) == 3  # the windows and weights changed the loss
    # evaluation: mean CE of the next token, with the final validation's longer window
    lo, lt, _, _ = _compare(ours, theirs, batch, torch.tensor([1.0]), (20, 60), train=False)
    assert 0 < lo.item() < 30


def test_mtp_loss_is_a_weighted_sum_over_positions(fork):
    _run.fork = fork
    ours, _ = _pair(fork)
    batch = _batch(fork)
    one, _ = _run(ours, batch, torch.tensor([1.0]), 8, 24, ours=True)
    zero_tail, _ = _run(ours, batch, torch.tensor([1.0, 0.0, 0.0]), 8, 24, ours=True)
    eval_loss, _ = _run(ours, batch, torch.tensor([1.0]), 8, 24, ours=True, train=False)
    torch.testing.assert_close(one, zero_tail)
    # training loss is the sum of the per-token CE that evaluation averages
    torch.testing.assert_close(one / T, eval_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feature", ["key_offset", "doc_mask", "paired_heads", "smear", "bigram", "backout",
                                     "softcap", "mtp", "yarn", "attn_gate"])
def test_switching_a_feature_off_breaks_parity(fork, feature):
    _run.fork = fork
    feats = dataclasses.replace(SpeedrunFeatures(), **{feature: False})
    ours, theirs = _pair(fork, feats)
    batch = _batch(fork)
    if feature == "yarn":
        ours.apply_window_change(12, 28)
        theirs.yarn.apply(12, 28)
        theirs.yarn_paired_head.apply(12, 28)
    lo, lt, go, gt = _compare(ours, theirs, batch, torch.tensor([1.0, 0.5, 0.25]), (12, 28), tight=False)
    # "differs" = fails the parity tolerances above (the models agree ~100x closer than those);
    # the key offset, the subtlest part, moves this loss by ~4e-5 relative
    loss_differs = not torch.allclose(lo, lt, rtol=1e-5, atol=1e-5)
    grads_differ = any(not torch.allclose(go[n], gt[n], rtol=1e-4, atol=1e-5 * gt[n].abs().max().item())
                       for n in gt if n in go and n not in BF16_GRADS)
    assert loss_differs and grads_differ, f"switching off {feature} did not change the loss and gradients"
