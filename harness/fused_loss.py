"""The head and its soft-capped cross-entropy in one pass over chunks of tokens (CPU training).

The plain path materialises the (tokens x vocab) logits in float32 several times over (the
product, the tanh soft-cap, log-softmax, and the same again in the backward): at the tiny
preset's 2048 tokens x 50304 ids that is ~400 MB per copy, and on a CPU the step spends much of
its head time moving those copies through memory. Here the forward computes, chunk by chunk of
`chunk` tokens, the logits, the loss and at once the gradients of the loss with respect to the
hidden states and the head (the chunk's logits stay in cache and are then dropped); the backward
only scales those saved gradients by the incoming gradient (the loss is a scalar, so that is
exact). The idea is Liger-Kernel's fused linear cross-entropy; the maths is the plain path's:

    z = h W^T,  s = cap tanh(z / cap),  loss = mean_i (logsumexp(s_i) - s_i[y_i])
    dL/ds = (softmax(s) - onehot(y)) / N,  dL/dz = dL/ds (1 - tanh^2),  dh = dz W,  dW = dz^T h
"""

from __future__ import annotations

import torch


def _chunk_loss_and_grads(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cap: float, n: int,
                          want_grads: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    z = h @ w.T
    if cap > 0:
        t = torch.tanh(z / cap)
        s = t * cap
    else:
        t, s = None, z
    lse = torch.logsumexp(s, dim=-1)
    loss = (lse - s.gather(1, y[:, None]).squeeze(1)).sum()
    if not want_grads:
        return loss, None, None
    p = s.sub_(lse[:, None]).exp_()  # softmax, in place of s
    p[torch.arange(len(y)), y] -= 1.0
    p.div_(n)
    if t is not None:
        p.mul_(1.0 - t.square_())
    return loss, p @ w, p.T @ h


class _FusedSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cap: float, chunk: int, want: bool):
        n = h.size(0)
        loss = h.new_zeros((), dtype=torch.float32)
        dh = torch.empty_like(h) if want else None
        dw = torch.zeros_like(w, dtype=torch.float32) if want else None
        for a in range(0, n, chunk):
            part, gh, gw = _chunk_loss_and_grads(h[a:a + chunk], w, y[a:a + chunk], cap, n, want)
            loss += part
            if want:
                dh[a:a + chunk] = gh
                dw += gw
        if want:
            ctx.save_for_backward(dh, dw.to(w.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.saved_tensors
        return dh * grad, dw * grad, None, None, None, None


def softcapped_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                             chunk: int = 128) -> torch.Tensor:
    """Mean cross-entropy of `cap * tanh((h @ weight.T) / cap)` (no cap when cap <= 0) against
    `targets`, in float32; h is (..., d), targets (...). Equal to the plain path in value and
    gradients, without its (tokens x vocab) tensors."""
    h2 = h.reshape(-1, h.size(-1)).float()
    # decided here: inside forward grad mode is off, and under no_grad (validation) the head's
    # weight still says requires_grad; the gradients would double the cost of every validation
    want = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _FusedSoftcapCE.apply(h2, weight.float(), targets.reshape(-1), float(cap), int(chunk), want)
