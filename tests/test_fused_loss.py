"""The fused chunked head + soft-capped cross-entropy equals the plain path, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.config import load_config
from harness.fused_loss import softcapped_cross_entropy
from harness.model import GPT, ModelShape


def plain(h, w, y, cap):
    z = F.linear(h, w).float()
    if cap > 0:
        z = cap * torch.tanh(z / cap)
    return F.cross_entropy(z.view(-1, z.size(-1)), y.view(-1))


@pytest.mark.parametrize("cap, chunk", [(15.0, 7), (15.0, 1000), (0.0, 16), (2.0, 32)])
def test_value_and_gradients_equal_the_plain_path(cap, chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 41, 24, dtype=torch.float64, requires_grad=True)  # 123 tokens: chunks do not divide it
    w = torch.randn(300, 24, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 300, (3, 41))
    ref = plain(h, w, y, cap)
    gh, gw = torch.autograd.grad(ref * 3.0, (h, w))  # an upstream gradient that is not 1
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ours = softcapped_cross_entropy(h32, w32, y, cap, chunk=chunk)
    (ours * 3.0).backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(h32.grad, gh.float(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w32.grad, gw.float(), rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # validation: the same value
        assert softcapped_cross_entropy(h32, w32, y, cap, chunk=chunk).item() == pytest.approx(ours.item(), rel=1e-6)


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Validation runs under no_grad while the head's weight still requires grad: the chunks
    must compute the loss only (the gradients would double every validation's cost)."""
    import harness.fused_loss as FL

    asked = []
    real = FL._chunk_loss_and_grads

    def spy(*args):
        asked.append(args[-1])
        return real(*args)

    monkeypatch.setattr(FL, "_chunk_loss_and_grads", spy)
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(100, 16))
    y = torch.randint(0, 100, (64,))
    with torch.no_grad():
        FL.softcapped_cross_entropy(h, w, y, 15.0, chunk=16)
    assert asked == [False] * 4
    asked.clear()
    FL.softcapped_cross_entropy(h.detach(), w, y, 15.0, chunk=16).backward()  # training: the head's weight wants them
    assert asked == [True] * 4 and w.grad is not None


def test_cpu_model_loss_is_the_logits_path():
    cfg = load_config(["--num_layers", "2", "--model_dim", "32", "--num_heads", "2", "--vocab_size", "256"], env={})
    torch.manual_seed(0)
    model = GPT(ModelShape.from_config(cfg))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # zero at init: give the head something to do
    idx = torch.randint(0, 256, (2, 16))
    fused = model(idx, idx.roll(1))
    g_fused = torch.autograd.grad(fused, list(model.parameters()), allow_unused=True)
    logits = model.logits(idx)
    ref = F.cross_entropy(logits.view(-1, 256), idx.roll(1).view(-1))
    g_ref = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
    assert [a is None for a in g_fused] == [b is None for b in g_ref]  # the value lambdas: unused here
    for a, b in zip(g_fused, g_ref):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
