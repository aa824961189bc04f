"""Triton kernels for the two symmetric products of a Newton-Schulz step.

    xxt(X)               A = X Xᵀ                (X: (m, k) or (batch, m, k))
    ba_plus_caa(A, b, c) B = b·A + c·A·A          (A symmetric: (m, m) or (batch, m, m))

Both outputs are symmetric, so one kernel computes only the tiles on and above the diagonal and
writes each off-diagonal tile twice (as itself and, transposed, as its mirror): about half the
flops of a dense matmul. Because A is symmetric, A·A = A·Aᵀ, so the second product is the first
one applied to A with a b·A epilogue. Accumulation is in float32; the output has the input dtype and is exactly symmetric.

Importing this module never fails: where triton is absent HAVE_TRITON is False and the launchers
raise UserError. Under TRITON_INTERPRET=1 the kernels run on CPU tensors (slowly): tiles are then
cast to float32 after loading (the interpreter's bf16 arithmetic and tl.dot are wrong otherwise),
bfloat16 results are rounded to nearest (the interpreter truncates), and autotuning has a single
config.
"""

from __future__ import annotations

import contextlib

import torch

from base import UserError
from kernels.interpreter import triton_interpreting

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the package still imports; the torch backend works without triton
    triton = None
    tl = None
    HAVE_TRITON = False

INTERPRET = triton_interpreting()
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _autotune_configs():
    if INTERPRET:
        # One config (the interpreter's autotuner fails with several); small tiles so the test
        # shapes span several tiles, with masked edges, and the mirrored writes are exercised.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    configs = []
    for block_m, block_k, warps, stages in [
        (64, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 128, 4, 3),
        (128, 32, 8, 4),
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 3),
    ]:
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages))
    return configs


if HAVE_TRITON:

    @triton.autotune(configs=_autotune_configs(), key=["M", "K", "HAS_ADD"])
    @triton.jit
    def _sym_product_kernel(
        X_ptr,
        Add_ptr,
        C_ptr,
        M,
        K,
        stride_xb,
        stride_xm,
        stride_xk,
        stride_ab,
        stride_am,
        stride_an,
        stride_cb,
        stride_cm,
        stride_cn,
        alpha,
        beta,
        HAS_ADD: tl.constexpr,
        UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """C[batch] = alpha * X Xᵀ (+ beta * Add), one (BLOCK_M x BLOCK_M) tile per program.

        Programs below the diagonal exit at once; the others store their tile and its transpose.
        Add must be symmetric (it is read once per upper tile and written to both places).
        """
        pid = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)
        num_tiles = tl.cdiv(M, BLOCK_M)
        pid_m = pid // num_tiles
        pid_n = pid % num_tiles
        if pid_m > pid_n:
            return

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        x_base = X_ptr + batch * stride_xb
        # rows block m as (BLOCK_M, BLOCK_K) and rows block n as its transpose (BLOCK_K, BLOCK_M)
        left_ptrs = x_base + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        right_ptrs = x_base + offs_n[None, :] * stride_xm + offs_k[:, None] * stride_xk
        mask_m = offs_m < M
        mask_n = offs_n < M

        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k0 * BLOCK_K
            left = tl.load(left_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            right = tl.load(right_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
            if UPCAST:
                left = left.to(tl.float32)
                right = right.to(tl.float32)
            acc = tl.dot(left, right, acc, input_precision=INPUT_PRECISION)
            left_ptrs += BLOCK_K * stride_xk
            right_ptrs += BLOCK_K * stride_xk

        if pid_m == pid_n:
            # a diagonal tile is symmetric only up to the rounding of its dot products; averaging
            # it with its transpose makes the whole output exactly symmetric
            acc = (acc + tl.trans(acc)) * 0.5
        acc = acc * alpha
        c_mask = mask_m[:, None] & mask_n[None, :]
        if HAS_ADD:
            add_ptrs = Add_ptr + batch * stride_ab + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an
            add = tl.load(add_ptrs, mask=c_mask, other=0.0).to(tl.float32)
            acc += beta * add
        if UPCAST:  # constexpr: compiled only under the interpreter
            if C_ptr.dtype.element_ty == tl.bfloat16:
                # the interpreter casts float32 -> bfloat16 by truncation; round to nearest even
                # first (as the GPU's cast does) so interpreted results carry the GPU's rounding
                bits = acc.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                acc = bits.to(tl.float32, bitcast=True)
        out = acc.to(C_ptr.dtype.element_ty)

        c_base = C_ptr + batch * stride_cb
        tl.store(c_base + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, out, mask=c_mask)
        if pid_m < pid_n:
            mirror_ptrs = c_base + offs_n[:, None] * stride_cm + offs_m[None, :] * stride_cn
            tl.store(mirror_ptrs, tl.trans(out), mask=mask_n[:, None] & mask_m[None, :])


def _check_available(t: torch.Tensor, name: str) -> None:
    if not HAVE_TRITON:
        raise UserError(f"kernels.triton_kernels.{name}: the triton package is not importable here")
    if t.device.type != "cuda" and not INTERPRET:
        raise UserError(
            f"kernels.triton_kernels.{name}: needs a CUDA tensor (got {t.device.type}) or TRITON_INTERPRET=1"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise UserError(f"kernels.triton_kernels.{name}: dtype {t.dtype} not supported; allowed: {allowed}")


def _as_batch(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.ndim == 2:
        return t.unsqueeze(0)
    if t.ndim == 3:
        return t
    raise UserError(f"kernels.triton_kernels.{name}: expected a 2D or 3D tensor (got shape {tuple(t.shape)})")


def _output(out: torch.Tensor | None, like: torch.Tensor, shape: tuple, name: str, inputs) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise UserError(
            f"kernels.triton_kernels.{name}: out must be {shape} {like.dtype} on {like.device} "
            f"(got {tuple(out.shape)} {out.dtype} on {out.device})"
        )
    if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs):
        raise UserError(f"kernels.triton_kernels.{name}: out must not share memory with the input")
    return out


def _input_precision(dtype: torch.dtype) -> str:
    # float32 follows torch's own matmul setting (TF32 only if torch allows it); 16-bit inputs
    # ignore the setting.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(X3: torch.Tensor, add3: torch.Tensor | None, out3: torch.Tensor, alpha: float, beta: float) -> None:
    batch, M, K = X3.shape
    add = add3 if add3 is not None else out3  # never read when HAS_ADD is False
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) ** 2, batch)  # noqa: E731
    # launch on the tensor's own GPU (its stream), not whichever device is current
    with torch.cuda.device(X3.device) if X3.device.type == "cuda" else contextlib.nullcontext():
        _sym_product_kernel[grid](
            X3,
            add,
            out3,
            M,
            K,
            *X3.stride(),
            *add.stride(),
            *out3.stride(),
            float(alpha),
            float(beta),
            HAS_ADD=add3 is not None,
            UPCAST=INTERPRET,
            INPUT_PRECISION=_input_precision(X3.dtype),
        )


def xxt(X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A = X Xᵀ for X of shape (m, k) or (batch, m, k); computes one triangle and mirrors it."""
    _check_available(X, "xxt")
    X3 = _as_batch(X, "xxt")
    batch, M, _ = X3.shape
    shape = (M, M) if X.ndim == 2 else (batch, M, M)
    out = _output(out, X, shape, "xxt", [X])
    if X.numel() == 0 or out.numel() == 0:
        return out.zero_()
    _launch(X3, None, _as_batch(out, "xxt"), 1.0, 0.0)
    return out


def ba_plus_caa(A: torch.Tensor, b: float, c: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """B = b·A + c·A·A for symmetric A of shape (m, m) or (batch, m, m); one triangle, mirrored.

    A must be symmetric (the kernel uses A·A = A·Aᵀ and reads only A's upper tiles for b·A);
    the X Xᵀ that xxt returns is exactly symmetric.
    """
    _check_available(A, "ba_plus_caa")
    A3 = _as_batch(A, "ba_plus_caa")
    if A3.shape[-1] != A3.shape[-2]:
        raise UserError(f"kernels.triton_kernels.ba_plus_caa: A must be square (got shape {tuple(A.shape)})")
    out = _output(out, A, tuple(A.shape), "ba_plus_caa", [A])
    if A.numel() == 0:
        return out
    _launch(A3, A3, _as_batch(out, "ba_plus_caa"), c, b)
    return out
