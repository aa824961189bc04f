"""Triton kernels through the interpreter (TRITON_INTERPRET=1, in a subprocess) against torch.

The interpreter config uses 16x16 output tiles and 32-wide k blocks, so the shapes below span
several tiles, end in partial (masked) tiles in both m and k, and exercise the mirrored writes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

INTERPRETER_SCRIPT = r'''
import json, torch
from base import UserError
from kernels import orthogonalize
from kernels import triton_kernels as tk

assert tk.INTERPRET, "TRITON_INTERPRET was not seen"
gen = torch.Generator().manual_seed(0)
res = {}

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

for shape in [(1, 24, 40), (3, 33, 70), (2, 70, 33), (40, 17)]:
    X = torch.randn(*shape, generator=gen)
    A = tk.xxt(X)
    key = "x".join(map(str, shape))
    res["xxt_" + key] = dict(shape=list(A.shape), rel=rel(A, X @ X.mT), symmetric=bool(torch.equal(A, A.mT)))
    A = A / A.norm()
    B = tk.ba_plus_caa(A, -2.808917465908714, 0.5000178451051316)
    ref = -2.808917465908714 * A + 0.5000178451051316 * (A @ A)
    res["baa_" + key] = dict(shape=list(B.shape), rel=rel(B, ref), symmetric=bool(torch.equal(B, B.mT)))

# preallocated out is written in place and returned
X = torch.randn(2, 20, 36, generator=gen)
out = torch.full((2, 20, 20), float("nan"))
res["out_is_returned"] = tk.xxt(X, out=out) is out and bool(torch.isfinite(out).all())

# bfloat16 tiles: loaded as bf16, accumulated in fp32, stored as bf16
Xb = torch.randn(3, 33, 70, generator=gen).bfloat16()
Ab, Rb = tk.xxt(Xb), Xb.float() @ Xb.float().mT
res["xxt_bf16"] = dict(dtype=str(Ab.dtype), rel=rel(Ab, Rb), rounded_exactly=bool((Ab == Rb.bfloat16()).float().mean() > 0.99))

for method in ["polar_express", "quintic"]:
    for shape in [(3, 33, 70), (2, 70, 33), (24, 40)]:
        G = torch.randn(*shape, generator=gen)
        O_tr = orthogonalize(G, method=method, backend="triton", dtype=torch.float32)
        O_to = orthogonalize(G, method=method, backend="torch", dtype=torch.float32)
        res[f"orth_{method}_" + "x".join(map(str, shape))] = dict(
            shape=list(O_tr.shape), dtype=str(O_tr.dtype), maxabs=(O_tr - O_to).abs().max().item())
G = torch.randn(2, 33, 70, generator=gen)
O_bf = orthogonalize(G, backend="triton", dtype=torch.bfloat16)
O_32 = orthogonalize(G, backend="torch", dtype=torch.float32)
res["orth_bf16_rel"] = dict(triton=rel(O_bf, O_32), torch=rel(orthogonalize(G, backend="torch", dtype=torch.bfloat16), O_32))

errors = {}
for name, fn in [
    ("alias", lambda: tk.ba_plus_caa(A, 1.0, 1.0, out=A)),
    ("not_square", lambda: tk.ba_plus_caa(torch.randn(4, 5), 1.0, 1.0)),
    ("ndim", lambda: tk.xxt(torch.randn(5))),
    ("out_shape", lambda: tk.xxt(torch.randn(4, 6), out=torch.empty(6, 6))),
    ("float64", lambda: tk.xxt(torch.randn(4, 6, dtype=torch.float64))),
]:
    try:
        fn()
        errors[name] = None
    except UserError as e:
        errors[name] = str(e)
res["errors"] = errors
print("RESULT " + json.dumps(res))
'''


def _run(script: str, repo_root, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(repo_root), **env_extra)
    env.pop("MUON_NS_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def interp(request):
    repo_root = request.config.rootpath
    proc = _run(INTERPRETER_SCRIPT, repo_root, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("key, shape", [("1x24x40", [1, 24, 24]), ("3x33x70", [3, 33, 33]),
                                        ("2x70x33", [2, 70, 70]), ("40x17", [40, 40])])
def test_xxt_matches_torch(interp, key, shape):
    r = interp["xxt_" + key]
    assert r["shape"] == shape
    assert r["rel"] < 1e-6
    assert r["symmetric"]  # one triangle computed, mirrored: exactly symmetric


@pytest.mark.parametrize("key, shape", [("1x24x40", [1, 24, 24]), ("3x33x70", [3, 33, 33]),
                                        ("2x70x33", [2, 70, 70]), ("40x17", [40, 40])])
def test_ba_plus_caa_matches_torch(interp, key, shape):
    r = interp["baa_" + key]
    assert r["shape"] == shape
    assert r["rel"] < 1e-6
    assert r["symmetric"]


def test_out_argument(interp):
    assert interp["out_is_returned"]


def test_bfloat16_tiles(interp):
    assert interp["xxt_bf16"]["dtype"] == "torch.bfloat16"
    assert interp["xxt_bf16"]["rel"] < 4e-3  # bf16 output rounding (2^-9 relative), fp32 accumulation
    assert interp["xxt_bf16"]["rounded_exactly"]  # fp32 sum rounded to nearest, as torch rounds it


@pytest.mark.parametrize("method", ["polar_express", "quintic"])
@pytest.mark.parametrize("key, shape", [("3x33x70", [3, 33, 70]), ("2x70x33", [2, 70, 33]), ("24x40", [24, 40])])
def test_orthogonalize_triton_equals_torch(interp, method, key, shape):
    r = interp[f"orth_{method}_{key}"]
    assert r["shape"] == shape and r["dtype"] == "torch.float32"
    assert r["maxabs"] < 1e-4


def test_orthogonalize_triton_bfloat16_close(interp):
    # bf16 rounding of X, A and B each step: the Triton path may differ from fp32 about as much
    # as torch's own bf16 path does (~2%), not more
    r = interp["orth_bf16_rel"]
    assert r["triton"] < 1.5 * r["torch"] + 0.01, r


def test_launcher_errors(interp):
    e = interp["errors"]
    assert "must not share memory" in e["alias"]
    assert "must be square" in e["not_square"]
    assert "2D or 3D" in e["ndim"]
    assert "out must be (4, 4)" in e["out_shape"]
    assert "not supported" in e["float64"]


def test_package_imports_without_triton(repo_root):
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from base import UserError\n"
        "from kernels import orthogonalize, triton_kernels\n"
        "assert not triton_kernels.HAVE_TRITON\n"
        "assert orthogonalize(torch.randn(4, 6)).shape == (4, 6)\n"
        "try:\n"
        "    orthogonalize(torch.randn(4, 6), backend='triton')\n"
        "except UserError as e:\n"
        "    print('ERR', e)\n"
    )
    proc = _run(script, repo_root, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERR MUON_NS_BACKEND=triton needs the triton package" in proc.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(768, 768), (768, 3072), (6, 768, 768), (3, 768, 3072), (5, 100, 333)])
def test_cuda_kernels_match_torch(shape, dtype, tol):
    from kernels import triton_kernels as tk

    torch.manual_seed(0)
    X = torch.randn(*shape, device="cuda").to(dtype)
    X = X / X.norm(dim=(-2, -1), keepdim=True)
    A = tk.xxt(X)
    ref = (X.float() @ X.float().mT)
    assert torch.equal(A, A.mT)
    assert ((A.float() - ref).norm() / ref.norm()).item() < tol
    B = tk.ba_plus_caa(A, -2.0, 0.5)
    Af = A.float()
    refB = -2.0 * Af + 0.5 * (Af @ Af)
    assert ((B.float() - refB).norm() / refB.norm()).item() < tol


@pytest.fixture
def set_tf32():
    """Set torch.backends.cuda.matmul.allow_tf32 (a property of torch's cuBLAS module, which
    monkeypatch cannot restore) for one test, and put the old value back."""
    before = torch.backends.cuda.matmul.allow_tf32

    def set_(value: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_
    torch.backends.cuda.matmul.allow_tf32 = before


def test_float32_input_precision_follows_torch_tf32_setting(set_tf32):
    """CPU twin of the CUDA check below: float32 uses TF32 only where torch allows it for its
    own matmuls (torch.backends.cuda.matmul.allow_tf32, False by default); 16-bit inputs have
    no IEEE float32 path to lose."""
    from kernels import triton_kernels as tk

    set_tf32(False)
    assert tk._input_precision(torch.float32) == "ieee"
    assert tk._input_precision(torch.bfloat16) == tk._input_precision(torch.float16) == "tf32"
    set_tf32(True)
    assert tk._input_precision(torch.float32) == "tf32"


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(768, 768), (2, 256, 1024)])
def test_cuda_float32_does_not_silently_use_tf32(shape, set_tf32):
    """With TF32 off (torch's default), the float32 kernels match a float64 reference to float32
    accuracy (~1e-7 relative here). TF32 rounds the inputs to a 10-bit mantissa (2^-11 = 4.9e-4
    relative per input): errors ~1e-4, which the 1e-5 bound rejects. The reference is float64,
    so it cannot itself drift to TF32 (a float32 torch reference would, under
    set_float32_matmul_precision("high"), and then agree with a TF32 kernel)."""
    from kernels import triton_kernels as tk

    set_tf32(False)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    gen = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(*shape, device="cuda", generator=gen)
    X = X / X.norm(dim=(-2, -1), keepdim=True)
    A = tk.xxt(X)
    assert A.dtype == torch.float32
    assert rel(A, X.double() @ X.double().mT) < 1e-5
    A64 = A.double()
    B = tk.ba_plus_caa(A, -2.0, 0.5)
    assert rel(B, -2.0 * A64 + 0.5 * (A64 @ A64)) < 1e-5
    # the bound can see TF32: with TF32 allowed, the same kernel is far less accurate
    set_tf32(True)
    assert rel(tk.xxt(X), X.double() @ X.double().mT) > 2e-5


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["polar_express", "quintic"])
@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (4, 768, 3072)])
def test_cuda_orthogonalize_triton_equals_torch(method, shape):
    from kernels import orthogonalize

    torch.manual_seed(0)
    G = torch.randn(*shape, device="cuda")
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    O_32 = orthogonalize(G, method=method, dtype=torch.float32, backend="torch")
    O_tr = orthogonalize(G, method=method, dtype=torch.float32, backend="triton")
    assert O_tr.shape == G.shape and O_tr.dtype == G.dtype
    assert rel(O_tr, O_32) < 1e-3
    # bfloat16: the Triton path is as far from float32 as torch's own bf16 path, not further
    O_tr = orthogonalize(G, method=method, dtype=torch.bfloat16, backend="triton")
    O_to = orthogonalize(G, method=method, dtype=torch.bfloat16, backend="torch")
    assert O_tr.dtype == G.dtype
    assert rel(O_tr, O_32) < 1.5 * rel(O_to, O_32) + 0.01


COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_kernels as tk

fn = tk._sym_product_kernel.fn  # the jit function under the autotuner
strides = ["stride_xb", "stride_xm", "stride_xk", "stride_ab", "stride_am", "stride_an",
           "stride_cb", "stride_cm", "stride_cn"]
sig = {"X_ptr": "*bf16", "Add_ptr": "*bf16", "C_ptr": "*bf16", "M": "i32", "K": "i32",
       **{s: "i32" for s in strides}, "alpha": "fp32", "beta": "fp32",
       "HAS_ADD": "constexpr", "UPCAST": "constexpr", "INPUT_PRECISION": "constexpr",
       "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
consts = {"HAS_ADD": True, "UPCAST": False, "INPUT_PRECISION": "tf32", "BLOCK_M": 128, "BLOCK_K": 64}
k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
print("COMPILED", "wgmma" in k.asm["ptx"], len(k.asm["cubin"]) > 0)
'''


def test_kernel_compiles_for_h100_without_a_gpu(repo_root):
    """The GPU code path (no interpreter) compiles to an sm_90 cubin and uses tensor cores (wgmma)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(repo_root), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "COMPILED True True" in proc.stdout
