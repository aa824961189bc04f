"""Spectral metrics of gradients, updates and weights (definitions: docs/REFERENCE.md, "Spectral metrics").

Pure torch. Every metric takes a matrix or a batch of matrices (..., m, n) and returns one value
per matrix (a tensor of shape (...)); the `*_sv` variants take singular values instead
(..., r), sorted descending as torch.linalg.svdvals returns them, so one svdvals call can feed
several metrics. Metrics are computed in float32 at least (bfloat16 inputs are promoted).

A metric that is undefined for the zero matrix (every ratio over Σσ) is nan there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "singular_values", "effective_rank", "effective_rank_sv", "topk_mass", "topk_mass_sv",
    "condition_number", "condition_number_sv", "spectral_entropy", "spectral_entropy_sv",
    "top_left_subspace", "subspace_alignment", "principal_angle_cosines", "NSEffect", "ns_effect",
    "gradient_snr", "spectrum_summary", "reshape_spectrum", "polar_factor", "SPECTRUM_MODES",
]


def _work(M: torch.Tensor) -> torch.Tensor:
    if M.ndim < 2:
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(M.shape)}")
    return M if M.dtype in (torch.float32, torch.float64) else M.float()


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """σ of each matrix, descending, (..., min(m, n)); float32 at least. Wide matrices are
    decomposed transposed (same σ; LAPACK is several times faster on the tall orientation)."""
    M = _work(M)
    return torch.linalg.svdvals(M.mT if M.size(-2) < M.size(-1) else M)


def _nan_where_zero(value: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return torch.where(total > 0, value, torch.full_like(value, math.nan))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """-Σ p log p over the last dim, with 0 log 0 = 0."""
    return -(torch.xlogy(p, p)).sum(-1)


# --- effective rank, top-k mass, condition number, spectral entropy ---------------------------
def effective_rank_sv(s: torch.Tensor) -> torch.Tensor:
    """exp(H(σ/Σσ)): 1 for a rank-one matrix, r when all r singular values are equal."""
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    return _nan_where_zero(torch.exp(_entropy(p)), total.squeeze(-1))


def effective_rank(M: torch.Tensor) -> torch.Tensor:
    return effective_rank_sv(singular_values(M))


def topk_mass_sv(s: torch.Tensor, k: int) -> torch.Tensor:
    """Σ_{i<=k} σ_i / Σσ (k larger than the rank counts every σ)."""
    if k < 1:
        raise ValueError(f"top-k mass needs k >= 1 (got {k})")
    total = s.sum(-1)
    return _nan_where_zero(s[..., :k].sum(-1) / total.clamp_min(torch.finfo(s.dtype).tiny), total)


def topk_mass(M: torch.Tensor, k: int) -> torch.Tensor:
    return topk_mass_sv(singular_values(M), k)


def default_rtol(shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """numpy.linalg.matrix_rank's tolerance: max(m, n) * eps, relative to σ_1."""
    return max(shape[-2:]) * torch.finfo(dtype).eps


def condition_number_sv(s: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """σ_1 / σ_min over the σ above rtol * σ_1 (default rtol: r * eps); nan for the zero matrix."""
    if rtol is None:
        rtol = s.size(-1) * torch.finfo(s.dtype).eps
    s1 = s[..., :1]
    kept = torch.where(s > rtol * s1, s, torch.full_like(s, math.inf))
    smin = kept.min(-1).values
    return _nan_where_zero(s1.squeeze(-1) / smin, s1.squeeze(-1))


def condition_number(M: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    M = _work(M)
    return condition_number_sv(singular_values(M), default_rtol(M.shape, M.dtype) if rtol is None else rtol)


def spectral_entropy_sv(s: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of q = σ²/Σσ² in [0, 1]: 1 when every σ is equal, 0 for rank one.
    With a single singular value the one distribution there is counts as uniform (1)."""
    sq = s.square()
    total = sq.sum(-1, keepdim=True)
    q = sq / total.clamp_min(torch.finfo(s.dtype).tiny)
    n = s.size(-1)
    h = _entropy(q) / math.log(n) if n > 1 else torch.ones_like(total.squeeze(-1))
    return _nan_where_zero(h, total.squeeze(-1))


def spectral_entropy(M: torch.Tensor) -> torch.Tensor:
    return spectral_entropy_sv(singular_values(M))


def spectrum_summary(s: torch.Tensor, topk: tuple[int, ...] = (1, 5, 10), rtol: float | None = None,
                     suffix: str = "") -> dict[str, torch.Tensor]:
    """The gradient-spectrum block of the diagnostics from one set of σ: eff_rank, top<k>, cond, fro."""
    out = {f"eff_rank{suffix}": effective_rank_sv(s)}
    for k in topk:
        out[f"top{k}{suffix}"] = topk_mass_sv(s, k)
    out[f"cond{suffix}"] = condition_number_sv(s, rtol)
    out[f"fro{suffix}"] = s.square().sum(-1).sqrt()
    return out


# --- subspaces ---------------------------------------------------------------------------------
def top_left_subspace(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k (..., m, k), σ (..., r)): the top-k left singular vectors and all singular values."""
    M = _work(M)
    if M.size(-2) < M.size(-1):  # tall orientation (faster): M = (Mᵀ)ᵀ, left vectors = Vh rows of Mᵀ
        _, s, Vh = torch.linalg.svd(M.mT, full_matrices=False)
        U = Vh.mT
    else:
        U, s, _ = torch.linalg.svd(M, full_matrices=False)
    return U[..., : min(k, U.size(-1))], s


def principal_angle_cosines(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the spans of orthonormal columns U and V."""
    return torch.linalg.svdvals(U.mT @ V).clamp(0.0, 1.0)


def subspace_alignment(A: torch.Tensor, B: torch.Tensor, k: int) -> torch.Tensor:
    """Mean cosine of the principal angles between the top-k left singular subspaces of A and B:
    1 when they span the same subspace, 0 when orthogonal. nan where either matrix is zero."""
    if k < 1:
        raise ValueError(f"subspace alignment needs k >= 1 (got {k})")
    Ua, sa = top_left_subspace(A, k)
    Ub, sb = top_left_subspace(B, k)
    value = principal_angle_cosines(Ua, Ub).mean(-1)
    return _nan_where_zero(value, torch.minimum(sa[..., 0], sb[..., 0]))


# --- Newton-Schulz effect ----------------------------------------------------------------------
class NSEffect(NamedTuple):
    angle_deg: torch.Tensor  # arccos(<G, P> / (|G| |P|)) in degrees
    rel_loss: torch.Tensor  # |G - P| / |G|
    rel_loss_scaled: torch.Tensor  # |G - P |G|/|P|| / |G|: P rescaled to G's norm


def ns_effect(G: torch.Tensor, P: torch.Tensor) -> NSEffect:
    """How far the orthogonalized P is from G (per matrix; P has unit singular values, so the
    plain relative loss mixes scale and direction, the rescaled one only direction)."""
    G = _work(G)
    P = _work(P).to(G.dtype)
    g_norm = G.norm(dim=(-2, -1))
    p_norm = P.norm(dim=(-2, -1))
    tiny = torch.finfo(G.dtype).tiny
    cos = (G * P).sum((-2, -1)) / (g_norm * p_norm).clamp_min(tiny)
    angle = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
    rel = (G - P).norm(dim=(-2, -1)) / g_norm.clamp_min(tiny)
    scale = (g_norm / p_norm.clamp_min(tiny))[..., None, None]
    rel_scaled = (G - P * scale).norm(dim=(-2, -1)) / g_norm.clamp_min(tiny)
    defined = torch.minimum(g_norm, p_norm)
    return NSEffect(*(_nan_where_zero(v, defined) for v in (angle, rel, rel_scaled)))


# --- gradient signal-to-noise ------------------------------------------------------------------
def gradient_snr(grads: torch.Tensor) -> torch.Tensor:
    """||mean_b g_b|| / ||std_b g_b|| over the first dim (B >= 2 minibatch gradients of one
    tensor), the std elementwise with Bessel's correction, the norms Frobenius over the rest."""
    if grads.size(0) < 2:
        raise ValueError(f"gradient SNR needs at least 2 minibatch gradients (got {grads.size(0)})")
    g = grads if grads.dtype in (torch.float32, torch.float64) else grads.float()
    mean = g.mean(0)
    std = g.std(0, correction=1)
    return mean.norm() / std.norm().clamp_min(torch.finfo(g.dtype).tiny)


# --- spectrum transforms (the rank-manipulation study) ----------------------------------------
SPECTRUM_MODES = ("full", "low_rank", "orthonormal", "equalized")


def polar_factor(M: torch.Tensor) -> torch.Tensor:
    """U Vᵀ from the SVD: the exact polar factor that Newton-Schulz approximates (on the
    numerical range of M: directions with σ below the rank tolerance map to 0, as in NS)."""
    return reshape_spectrum(M, "orthonormal")


def reshape_spectrum(M: torch.Tensor, mode: str, k: int = 1) -> torch.Tensor:
    """M with its singular values replaced, singular vectors kept:
    full (unchanged), low_rank (only the top k kept), orthonormal (all 1: the polar factor),
    equalized (all set to their mean, which keeps Σσ).
    Singular values at or below the rank tolerance stay 0 in every mode: their singular vectors
    are arbitrary (as Newton-Schulz leaves them at 0 too)."""
    if mode not in SPECTRUM_MODES:
        raise ValueError(f"unknown spectrum mode {mode!r}; allowed: {', '.join(SPECTRUM_MODES)}")
    if mode == "full":
        return M
    U, s, Vh = torch.linalg.svd(_work(M), full_matrices=False)
    if mode == "low_rank":
        if k < 1:
            raise ValueError(f"low_rank needs k >= 1 (got {k})")
        s = torch.where(torch.arange(s.size(-1), device=s.device) < k, s, torch.zeros_like(s))
    else:
        live = s > default_rtol(M.shape, s.dtype) * s[..., :1]
        if mode == "orthonormal":
            level = torch.ones_like(s)
        else:  # the mean over the live σ: keeps the nuclear norm Σσ
            level = (s.sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1)).expand_as(s)
        s = torch.where(live, level, torch.zeros_like(s))
    return ((U * s[..., None, :]) @ Vh).to(M.dtype)
