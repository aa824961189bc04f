"""Orthogonalization for Muon: polar express and quintic Newton-Schulz, torch reference + Triton kernels.

    from kernels import orthogonalize
    O = orthogonalize(G)                      # polar express, 5 steps, bf16 on CUDA / fp32 on CPU
    O = orthogonalize(G, method="quintic")    # Muon's original iteration

Backend: triton for CUDA tensors, torch otherwise; env MUON_NS_BACKEND=torch|triton overrides.
"""

from kernels.newton_schulz import (
    POLAR_EXPRESS_COEFFS,
    QUINTIC_COEFFS,
    ns_coefficients,
    orthogonalize,
)

__all__ = ["orthogonalize", "ns_coefficients", "POLAR_EXPRESS_COEFFS", "QUINTIC_COEFFS"]
