"""Orthogonalization by Newton-Schulz-type iterations: the torch reference and the backend dispatch.

`orthogonalize(G)` approximates the polar factor U Vᵀ of G = U S Vᵀ (what Muon applies). Each
iteration with coefficients (a, b, c) is

    A = X Xᵀ;  B = b·A + c·A·A;  X = a·X + B·X

on the wide orientation of X (rows <= cols), so the Gram matrix A is the small side.
The torch path here is the reference; the Triton path (kernels/triton_kernels.py) replaces the
two symmetric products by kernels that compute one triangle and mirror it.
"""

from __future__ import annotations

import os

import torch

from base import UserError
from kernels.interpreter import triton_interpreting

# Polar express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): 5 iterations computed
# with safety factor 2e-2 and cushion 2 (docs/REFERENCE.md, "Orthogonalization"), one triple per step.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Muon's quintic Newton-Schulz (Jordan et al. 2024), the same triple at every step.
QUINTIC_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

METHODS = ("polar_express", "quintic")
BACKENDS = ("torch", "triton")
BACKEND_ENV = "MUON_NS_BACKEND"
# Normalization X = G / (||G||_F * (1 + NORM_SAFETY) + NORM_EPS): the safety factor matches the
# one the polar-express coefficients were computed with.
NORM_SAFETY = 2e-2
NORM_EPS = 1e-6
_WORKING_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def ns_coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) triple of each of `steps` iterations.

    polar_express: the 5 published triples; for steps > 5 the last triple is repeated (it is the
    one tuned for singular values already near 1), for steps < 5 the first `steps` are used.
    quintic: (3.4445, -4.7750, 2.0315) at every step.
    """
    if method not in METHODS:
        raise UserError(f"orthogonalize: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise UserError(f"orthogonalize: steps must be a positive integer (got {steps!r})")
    if method == "quintic":
        return [QUINTIC_COEFFS] * steps
    return [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(steps)]


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Explicit argument, else env MUON_NS_BACKEND, else triton for CUDA tensors and torch otherwise.

    Asking for triton where it cannot run is an error, never a silent fallback.
    """
    source = "backend"
    if backend is None:
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env:
            backend, source = env.lower(), BACKEND_ENV
        else:
            backend = "triton" if device.type == "cuda" else "torch"
            source = "default"
    if backend not in BACKENDS:
        raise UserError(f"orthogonalize: {source}={backend!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    if backend == "triton":
        if device.type != "cuda" and not triton_interpreting():
            raise UserError(
                f"{BACKEND_ENV}=triton needs a CUDA tensor (got {device.type}) or TRITON_INTERPRET=1"
            )
        from kernels import triton_kernels

        if not triton_kernels.HAVE_TRITON:
            raise UserError(f"{BACKEND_ENV}=triton needs the triton package, which is not importable here")
    return backend


def default_dtype(device: torch.device) -> torch.dtype:
    """The iteration's working dtype: bfloat16 on CUDA (as upstream), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def normalize(G: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """G / (||G||_F (1 + 2e-2) + 1e-6) per matrix, computed in at least float32, cast to `dtype`."""
    Gw = G.to(torch.promote_types(torch.promote_types(G.dtype, dtype), torch.float32))
    norm = torch.linalg.matrix_norm(Gw, ord="fro", keepdim=True)
    return (Gw / (norm * (1 + NORM_SAFETY) + NORM_EPS)).to(dtype)


def _iterate_torch(X: torch.Tensor, coeffs: list[tuple[float, float, float]]) -> torch.Tensor:
    """The reference iteration on a batch (B, m, n), m <= n, buffers reused across steps."""
    A = torch.empty(X.shape[0], X.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
    Bm = torch.empty_like(A)
    Y = torch.empty_like(X)
    for a, b, c in coeffs:
        torch.bmm(X, X.mT, out=A)
        torch.baddbmm(A, A, A, beta=b, alpha=c, out=Bm)  # B = b*A + c*A@A
        torch.baddbmm(X, Bm, X, beta=a, alpha=1.0, out=Y)  # X = a*X + B@X
        X, Y = Y, X
    return X


def _iterate_triton(X: torch.Tensor, coeffs: list[tuple[float, float, float]]) -> torch.Tensor:
    """The same iteration with the two symmetric products in Triton; the last one a plain matmul."""
    from kernels import triton_kernels

    A = torch.empty(X.shape[0], X.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
    Bm = torch.empty_like(A)
    Y = torch.empty_like(X)
    for a, b, c in coeffs:
        triton_kernels.xxt(X, out=A)
        triton_kernels.ba_plus_caa(A, b, c, out=Bm)
        torch.baddbmm(X, Bm, X, beta=a, alpha=1.0, out=Y)
        X, Y = Y, X
    return X


@torch.no_grad()
def orthogonalize(
    G: torch.Tensor,
    method: str = "polar_express",
    steps: int = 5,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Approximate polar factor of G (a matrix, or a batch of matrices as a 3D tensor).

    method: "polar_express" (5 published triples; for steps > 5 the last triple repeats) or
        "quintic" (Muon's (3.4445, -4.7750, 2.0315) every step).
    steps: number of iterations (> 0).
    dtype: the iteration's working dtype; None means bfloat16 on CUDA, float32 elsewhere
        (float16 and float64 are allowed too). The result is cast back to G.dtype.
    backend: "torch" | "triton"; None reads env MUON_NS_BACKEND, else triton on CUDA tensors,
        torch otherwise. Triton on a CPU tensor runs only under TRITON_INTERPRET=1.

    Tall matrices are transposed so the Gram matrix is the small side; each matrix of a batch is
    normalized by its own Frobenius norm. Returns a tensor of G's shape and dtype. Runs under
    no_grad (an optimizer step, not a differentiable op).
    """
    coeffs = ns_coefficients(method, steps)
    if not isinstance(G, torch.Tensor) or G.ndim not in (2, 3):
        shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise UserError(f"orthogonalize: G must be a 2D matrix or a 3D batch of matrices (got {shape})")
    if not G.is_floating_point():
        raise UserError(f"orthogonalize: G must be a floating-point tensor (got {G.dtype})")
    dtype = default_dtype(G.device) if dtype is None else dtype
    if dtype not in _WORKING_DTYPES:
        allowed = ", ".join(str(d) for d in _WORKING_DTYPES)
        raise UserError(f"orthogonalize: dtype {dtype} is not a working dtype; allowed: {allowed}")
    if backend is None and not os.environ.get(BACKEND_ENV, "").strip() and dtype == torch.float64:
        backend = "torch"  # the kernels have no float64; only an explicit request for triton is an error
    backend = resolve_backend(backend, G.device)
    if backend == "triton" and dtype == torch.float64:
        raise UserError("orthogonalize: the triton backend works in float32, bfloat16 or float16 (got float64)")
    if G.numel() == 0:
        return G.clone()

    X = G if G.ndim == 3 else G.unsqueeze(0)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = normalize(X, dtype).contiguous()
    X = _iterate_triton(X, coeffs) if backend == "triton" else _iterate_torch(X, coeffs)
    if tall:
        X = X.mT
    if G.ndim == 2:
        X = X.squeeze(0)
    return X.to(G.dtype).contiguous()
