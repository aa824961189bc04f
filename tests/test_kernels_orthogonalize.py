"""kernels.orthogonalize, torch path: shapes, dtypes, spectra, the reference formula, errors, dispatch."""

import pytest
import torch

from base import UserError
from kernels import POLAR_EXPRESS_COEFFS, QUINTIC_COEFFS, ns_coefficients, orthogonalize


def naive_reference(G: torch.Tensor, coeffs) -> torch.Tensor:
    """The iteration exactly as docs/REFERENCE.md writes it, one matrix at a time, in float64."""
    outs = []
    for M in G.reshape(-1, *G.shape[-2:]).double():
        tall = M.shape[0] > M.shape[1]
        X = M.T if tall else M
        X = X / (X.norm() * (1 + 2e-2) + 1e-6)
        for a, b, c in coeffs:
            A = X @ X.T
            B = b * A + c * (A @ A)
            X = a * X + B @ X
        outs.append(X.T if tall else X)
    return torch.stack(outs).reshape(G.shape)


def svals(O: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(O.double())


@pytest.fixture(autouse=True)
def no_backend_env(monkeypatch):
    monkeypatch.delenv("MUON_NS_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (3, 12, 30), (2, 30, 12), (20, 20)])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_shape_and_dtype_preserved(shape, in_dtype):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(in_dtype)
    O = orthogonalize(G)
    assert O.shape == G.shape and O.dtype == in_dtype and O.is_contiguous()
    assert torch.isfinite(O).all()


@pytest.mark.parametrize("method", ["polar_express", "quintic"])
@pytest.mark.parametrize("shape", [(24, 56), (56, 24), (3, 20, 36), (2, 36, 20)])
def test_matches_reference_formula_float64(method, shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    O = orthogonalize(G, method=method, steps=6, dtype=torch.float64)
    torch.testing.assert_close(O, naive_reference(G, ns_coefficients(method, 6)), rtol=1e-10, atol=1e-10)


def test_polar_express_five_steps_singular_values_near_one():
    # For singular values of G/(1.02 ||G||_F) in [1e-3, 1], the 5 composed polar-express
    # polynomials map into [0.8466, 1.1412] (computed from the coefficients on a fine grid);
    # a 64x128 Gaussian has sigma_min/||G||_F ~ 0.03, well inside that range.
    G = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    s = svals(orthogonalize(G, "polar_express", 5, dtype=torch.float32))
    assert 0.84 <= s.min() and s.max() <= 1.15, (s.min().item(), s.max().item())
    # more steps tighten the band (steps > 5 repeat the last triple)
    s8 = svals(orthogonalize(G, "polar_express", 8, dtype=torch.float32))
    assert 0.99 <= s8.min() and s8.max() <= 1.09, (s8.min().item(), s8.max().item())


def test_quintic_band():
    G = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    s = svals(orthogonalize(G, "quintic", 5, dtype=torch.float32))
    # the quintic's fixed band: it never reaches 1 but stays within roughly 0.68 .. 1.21
    assert 0.6 <= s.min() <= 0.8 and 1.0 <= s.max() <= 1.21, (s.min().item(), s.max().item())


def test_batch_normalizes_each_matrix_on_its_own():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(3, 16, 24, generator=gen) * torch.tensor([1e-3, 1.0, 1e3]).view(3, 1, 1)
    O = orthogonalize(G)
    for i in range(3):
        torch.testing.assert_close(O[i], orthogonalize(G[i]), rtol=1e-5, atol=1e-6)
    # one norm for the whole batch would leave the 1e-3 matrix near zero
    s = svals(O)
    assert s.min() > 0.84 and s.max() < 1.15


def test_tall_is_transpose_of_wide():
    G = torch.randn(20, 44, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(orthogonalize(G.T.contiguous()), orthogonalize(G).T, rtol=1e-5, atol=1e-5)


def test_float16_and_bfloat16_working_dtypes_close_to_float32():
    G = torch.randn(32, 48, generator=torch.Generator().manual_seed(5))
    ref = orthogonalize(G, dtype=torch.float32)
    for dt, tol in [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)]:
        O = orthogonalize(G, dtype=dt)
        assert O.dtype == torch.float32
        rel = (O - ref).norm() / ref.norm()
        assert rel < tol, (dt, rel.item())


def test_deterministic():
    G = torch.randn(2, 48, 96, generator=torch.Generator().manual_seed(6))
    assert torch.equal(orthogonalize(G), orthogonalize(G))


def test_zero_matrix_stays_zero():
    assert torch.equal(orthogonalize(torch.zeros(8, 12)), torch.zeros(8, 12))


def test_coefficients():
    assert len(POLAR_EXPRESS_COEFFS) == 5 and POLAR_EXPRESS_COEFFS[0][0] == 8.156554524902461
    assert ns_coefficients("polar_express", 3) == list(POLAR_EXPRESS_COEFFS[:3])
    assert ns_coefficients("polar_express", 7) == list(POLAR_EXPRESS_COEFFS) + [POLAR_EXPRESS_COEFFS[-1]] * 2
    assert ns_coefficients("quintic", 4) == [QUINTIC_COEFFS] * 4 == [(3.4445, -4.7750, 2.0315)] * 4


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(method="cubic"), "unknown method 'cubic'"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=-2), "steps must be a positive integer"),
        (dict(steps=2.5), "steps must be a positive integer"),
        (dict(backend="cuda"), "'cuda' is not a backend"),
        (dict(dtype=torch.int32), "not a working dtype"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(UserError, match=needle) as exc:
        orthogonalize(torch.randn(4, 6), **kwargs)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5)])
def test_bad_ndim(shape):
    with pytest.raises(UserError, match="2D matrix or a 3D batch"):
        orthogonalize(torch.randn(*shape))


def test_integer_input_rejected():
    with pytest.raises(UserError, match="floating-point"):
        orthogonalize(torch.ones(3, 4, dtype=torch.int64))


def test_triton_on_cpu_is_an_error_not_a_fallback():
    with pytest.raises(UserError) as exc:
        orthogonalize(torch.randn(4, 6), backend="triton")
    assert str(exc.value) == "MUON_NS_BACKEND=triton needs a CUDA tensor (got cpu) or TRITON_INTERPRET=1"


def test_env_override(monkeypatch):
    G = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    # the float64 formula, computed here: the default CPU path (float32) must be within float32 error
    ref = naive_reference(G, POLAR_EXPRESS_COEFFS).float()
    monkeypatch.setenv("MUON_NS_BACKEND", "torch")
    torch.testing.assert_close(orthogonalize(G), ref, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("MUON_NS_BACKEND", "triton")
    with pytest.raises(UserError, match="needs a CUDA tensor"):
        orthogonalize(G)
    # an explicit argument wins over the environment: the torch path, same numbers as the formula
    torch.testing.assert_close(orthogonalize(G, backend="torch"), ref, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("MUON_NS_BACKEND", "fast")
    with pytest.raises(UserError, match="MUON_NS_BACKEND='fast' is not a backend"):
        orthogonalize(G)


def test_runs_on_tensors_that_require_grad():
    G = torch.randn(8, 12, requires_grad=True)
    O = orthogonalize(G)
    assert O.shape == (8, 12) and not O.requires_grad
