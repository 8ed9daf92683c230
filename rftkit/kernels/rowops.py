"""The per-row RMSNorm and RoPE of a decode step (rowops.c), or None where the caller's torch ops should run.

    y = rms_norm(x, w, eps); q = rope(q, cos, sin)

At one row each is ~7 torch ops per layer, pure dispatch overhead; the kernels run single-threaded.
"""
from __future__ import annotations

import ctypes

import torch

import rftkit.kernels.build as build

SMALL_MAX_ROWS = 64            # rms_norm / rope run single-threaded: worth it while dispatch dominates

_P, _I = ctypes.c_void_p, ctypes.c_int
build.declare({
    "rms_norm": ([_P, _P, _P, _I, _I, ctypes.c_float], None),
    "rope": ([_P, _P, _P, _P, _I, _I, _I], None),
})


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, or None where the kernel does not apply (the
    caller runs its torch ops)."""
    D = x.shape[-1]
    if x.numel() > SMALL_MAX_ROWS * D or not x.is_contiguous():
        return None
    lib = build.usable(x, weight)
    if lib is None:
        return None
    y = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), x.numel() // D, D, eps)
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [B, T, n, hd] * cos + rotate_half(x) * sin with cos, sin [B, T, 1, hd]; None where the kernel does
    not apply."""
    B, T, n, hd = x.shape
    if B * T > SMALL_MAX_ROWS or not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()) \
            or cos.shape != (B, T, 1, hd) or sin.shape != cos.shape:
        return None
    lib = build.usable(x, cos, sin)
    if lib is None:
        return None
    y = torch.empty_like(x)
    lib.rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), B * T, n, hd)
    return y
