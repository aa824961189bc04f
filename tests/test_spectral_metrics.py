"""Each spectral metric against hand-computed cases (docs/REFERENCE.md, "Spectral metrics")."""

import math

import numpy as np
import pytest
import torch

from harness import spectral as sp


def rotation(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def with_spectrum(s, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthogonal U, V (float64)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    r = len(s)
    return rotation(m, seed)[:, :r] @ torch.diag(s) @ rotation(n, seed + 1)[:, :r].T


def test_effective_rank_identity_and_rank_one():
    assert sp.effective_rank(torch.eye(7)).item() == pytest.approx(7.0, rel=1e-6)
    u, v = torch.randn(9, 1), torch.randn(1, 5)
    assert sp.effective_rank(u @ v).item() == pytest.approx(1.0, abs=1e-4)


def test_effective_rank_known_spectrum_and_batch():
    s = [4.0, 2.0, 1.0, 1.0]
    p = np.array(s) / sum(s)
    expected = math.exp(-(p * np.log(p)).sum())
    M = torch.stack([with_spectrum(s, 6, 4), with_spectrum([1, 1, 1, 1], 6, 4, seed=5)])
    got = sp.effective_rank(M)
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(expected, rel=1e-9)
    assert got[1].item() == pytest.approx(4.0, rel=1e-9)


def test_zero_matrix_metrics_are_nan():
    Z = torch.zeros(4, 3)
    for v in (sp.effective_rank(Z), sp.topk_mass(Z, 1), sp.condition_number(Z), sp.spectral_entropy(Z)):
        assert math.isnan(v.item())


def test_topk_mass():
    M = with_spectrum([5.0, 3.0, 1.0, 1.0], 5, 4)
    assert sp.topk_mass(M, 1).item() == pytest.approx(0.5)
    assert sp.topk_mass(M, 2).item() == pytest.approx(0.8)
    assert sp.topk_mass(M, 10).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        sp.topk_mass(M, 0)


def test_condition_number_ignores_null_directions():
    M = with_spectrum([8.0, 4.0, 2.0], 6, 5)  # rank 3 of 5: σ4 = σ5 = 0 up to round-off
    assert sp.condition_number(M).item() == pytest.approx(4.0, rel=1e-9)
    assert sp.condition_number(torch.eye(3) * 2).item() == pytest.approx(1.0)


def test_condition_number_cutoff_is_pinned():
    """The cutoff below which a singular value counts as null: numpy.linalg.matrix_rank's
    max(m, n) * eps relative to σ_1 for a matrix, r * eps for a vector of σ. Diagonal float32
    matrices have exact σ, placed on either side of the cutoff (40 x 3: 40 eps = 4.77e-6, while
    3 eps would be 3.6e-7), so the answer changes if the cutoff moves."""
    eps = torch.finfo(torch.float32).eps
    assert sp.default_rtol((40, 3), torch.float32) == 40 * eps

    def diag(*s):
        M = torch.zeros(40, 3)
        M[range(len(s)), range(len(s))] = torch.tensor(s)
        return M

    assert sp.condition_number(diag(1.0, 1e-5, 0.5)).item() == pytest.approx(1e5, rel=1e-4)  # 1e-5 > 40 eps: kept
    assert sp.condition_number(diag(1.0, 1e-6, 0.5)).item() == pytest.approx(2.0, rel=1e-6)  # 1e-6 < 40 eps: null
    assert sp.condition_number(diag(1.0, 1e-6, 0.5).T).item() == pytest.approx(2.0, rel=1e-6)  # same for the wide one
    assert sp.condition_number(diag(1.0, 1e-6, 0.5), rtol=1e-7).item() == pytest.approx(1e6, rel=1e-4)
    # from σ directly: r * eps with r = 3 (3.6e-7)
    s = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    assert sp.condition_number_sv(s(1.0, 0.5, 5e-7)).item() == pytest.approx(2e6, rel=1e-4)
    assert sp.condition_number_sv(s(1.0, 0.5, 2e-7)).item() == pytest.approx(2.0, rel=1e-6)
    assert sp.spectrum_summary(s(1.0, 0.5, 5e-7))["cond"].item() == pytest.approx(2e6, rel=1e-4)


def test_spectral_entropy_equal_and_rank_one_and_known():
    assert sp.spectral_entropy(torch.eye(6) * 3).item() == pytest.approx(1.0, rel=1e-6)
    assert sp.spectral_entropy(torch.ones(5, 4)).item() == pytest.approx(0.0, abs=1e-6)
    s = np.array([2.0, 1.0, 1.0])
    q = s**2 / (s**2).sum()
    expected = -(q * np.log(q)).sum() / math.log(3)
    assert sp.spectral_entropy(with_spectrum(s, 3, 3)).item() == pytest.approx(expected, rel=1e-9)


def test_subspace_alignment_shared_orthogonal_and_partial():
    Q = rotation(8, 3)
    W = Q[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ rotation(5, 4)[:, :3].T
    dW = Q[:, :3] @ torch.diag(torch.tensor([0.1, 0.5, 0.2], dtype=torch.float64)) @ rotation(5, 9)[:, :3].T
    assert sp.subspace_alignment(W, dW, 3).item() == pytest.approx(1.0, abs=1e-9)
    ortho = Q[:, 3:6] @ rotation(5, 6)[:, :3].T
    assert sp.subspace_alignment(W, ortho, 3).item() == pytest.approx(0.0, abs=1e-9)
    # top-2 of W: span{q0, q1}; top-2 of B: span{q0, q2}: principal cosines {1, 0} -> mean 0.5
    B = Q[:, [0, 2]] @ torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)) @ rotation(5, 7)[:, :2].T
    assert sp.subspace_alignment(W, B, 2).item() == pytest.approx(0.5, abs=1e-9)
    # one direction at a known angle: cos 60° = 0.5 for k = 1
    theta = math.radians(60)
    a = Q[:, :1]
    b = math.cos(theta) * Q[:, :1] + math.sin(theta) * Q[:, 1:2]
    assert sp.subspace_alignment(a @ a.T, b @ b.T, 1).item() == pytest.approx(0.5, abs=1e-9)


def test_ns_effect_known_angle_and_losses():
    # G = diag(2, 1): P = I; <G,P> = 3, |G| = √5, |P| = √2
    G = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    P = torch.eye(2, dtype=torch.float64)
    eff = sp.ns_effect(G, P)
    assert eff.angle_deg.item() == pytest.approx(math.degrees(math.acos(3 / math.sqrt(10))), rel=1e-12)
    assert eff.rel_loss.item() == pytest.approx(1 / math.sqrt(5), rel=1e-12)  # |diag(1, 0)| / √5
    scaled = P * math.sqrt(5 / 2)
    assert eff.rel_loss_scaled.item() == pytest.approx((G - scaled).norm().item() / math.sqrt(5), rel=1e-12)
    same = sp.ns_effect(P * 3, P)
    assert same.angle_deg.item() == pytest.approx(0.0, abs=1e-5)
    assert same.rel_loss_scaled.item() == pytest.approx(0.0, abs=1e-12)


def test_ns_effect_with_kernels_orthogonalize_on_a_batch():
    from kernels import orthogonalize

    G = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(0))
    eff = sp.ns_effect(G, orthogonalize(G))
    assert eff.angle_deg.shape == (3,)
    assert ((eff.angle_deg > 5) & (eff.angle_deg < 60)).all()
    assert ((eff.rel_loss_scaled > 0) & (eff.rel_loss_scaled < 1)).all()


def test_gradient_snr():
    # two samples [1, 3] and [3, 5]: mean [2, 4], std (Bessel) [√2, √2]
    g = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    assert sp.gradient_snr(g).item() == pytest.approx(math.sqrt(20) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        sp.gradient_snr(g[:1])


def test_spectrum_summary_keys_and_fro():
    s = sp.singular_values(with_spectrum([3.0, 4.0], 4, 4))
    out = sp.spectrum_summary(s, topk=(1, 5), suffix="_ns")
    assert set(out) == {"eff_rank_ns", "top1_ns", "top5_ns", "cond_ns", "fro_ns"}
    assert out["fro_ns"].item() == pytest.approx(5.0, rel=1e-9)


def test_reshape_spectrum_modes():
    M = with_spectrum([4.0, 2.0, 1.0], 6, 5)  # rank 3
    s = lambda X: sp.singular_values(X)[:3].tolist()  # noqa: E731
    assert torch.equal(sp.reshape_spectrum(M, "full"), M)
    assert s(sp.reshape_spectrum(M, "low_rank", k=2)) == pytest.approx([4.0, 2.0, 0.0], abs=1e-9)
    assert s(sp.reshape_spectrum(M, "orthonormal")) == pytest.approx([1.0, 1.0, 1.0], abs=1e-9)
    eq = sp.reshape_spectrum(M, "equalized")
    assert s(eq) == pytest.approx([7 / 3] * 3, abs=1e-9)
    assert sp.singular_values(eq)[3:].abs().max().item() < 1e-9  # null directions stay null
    # singular vectors kept: the reshaped matrix spans the same column space
    assert sp.subspace_alignment(M, eq, 3).item() == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError):
        sp.reshape_spectrum(M, "nope")
    P = sp.polar_factor(M)
    assert torch.allclose(P @ P.T @ P, P, atol=1e-9)  # a partial isometry
