"""The GEMV kernels (gemv.c): y = x W^T for a few rows on CPU, each entry point with its torch reference.

    y = linear(x, weight, bias)                    # [.., K] -> [.., N]; a GEMV kernel for <= 64 rows (any on AMD Zen 5)
    q, k, v = linear_many(x, [Wq, Wk, Wv], [None] * 3)   # several weights of one input, one call
    dx = matmul_nn(dy, weight)                     # dy @ W, a frozen linear's input gradient (16 lanes)

Why: one decode step of a small model multiplies a handful of rows by every weight, bound by memory
bandwidth, where torch's fp32 GEMV read well below the copy bandwidth (docs/benchmarks.md, "Kernel design notes").
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

import rftkit.kernels.build as build

# the GEMV kernel's row limits (short and long K), measured against MKL with the weights out of cache
GEMV_MAX_ROWS = 64
GEMV_MAX_ROWS_LONG_K = 64

_P, _I = ctypes.c_void_p, ctypes.c_int
build.declare({
    "gemv": ([_P, _P, _P, _P, _I, _I, _I, _I], None),
    "gemv_many": ([_P, _P, _P, _P, _P, _I, _I, _I, _I], None),
    "gemm_nn": ([_P, _P, _P, _I, _I, _I, _I], None),
})


def _gemv_rows_ok(M: int, K: int, N: int) -> bool:
    build.load()                                   # sets _all_rows
    return 0 < M and (build._all_rows or M <= (GEMV_MAX_ROWS if K <= 1024 else GEMV_MAX_ROWS_LONG_K))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); x [.., K], weight [N, K]. Few rows on CPU (_gemv_rows_ok): the GEMV kernel.
    Under autograd with a frozen weight (a LoRA base in training) where the kernel takes every row count
    (`_all_rows`): the kernel forward and `matmul_nn` for the input's gradient (_FrozenLinear)."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if not _gemv_rows_ok(M, K, weight.shape[0]) or K % 8 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    lib = build.usable(x, weight) if bias is None else build.usable(x, weight, bias)
    if lib is None:
        if build._all_rows and _frozen_ok(x, weight, bias):
            return _FrozenLinear.apply(x, weight, bias)
        return F.linear(x, weight, bias)
    return _gemv(lib, x, weight, bias)


def _frozen_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and not weight.requires_grad and (bias is None or not bias.requires_grad) \
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, weight)) and build._enabled


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W and b frozen: the GEMV kernel forward and dx = dy W by gemm_nn at 16 lanes, both
    faster than MKL where the kernel takes every row count (AMD Zen 5), else dx by torch."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _gemv(build.load(), x.detach(), weight, bias)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return matmul_nn(dy, weight), None, None


def matmul_nn(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g [.., N] @ weight [N, K] (an input gradient through a linear): gemm_nn at 16 lanes on CPU fp32 outside
    autograd, else torch."""
    N, K = weight.shape
    build.load()                                   # sets _lanes16
    lib = build.usable(g, weight) if build._lanes16 and K % 16 == 0 and weight.is_contiguous() else None
    if lib is None:
        return g @ weight
    g2 = g.reshape(-1, N).contiguous()
    out = torch.empty(*g.shape[:-1], K)
    lib.gemm_nn(g2.data_ptr(), weight.data_ptr(), out.data_ptr(), g2.shape[0], N, K, torch.get_num_threads())
    return out


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """torch.mm(x, weight.t(), out=out) for x [M, K] (the training log-probs' logits): the GEMV kernel on AMD CPUs,
    where MKL is slow at this shape (1,024 rows of the 49,152-row vocabulary on a 2-core Zen 3: 133 vs 64
    GFLOP/s; on Zen 5 the kernel takes every row count anyway)."""
    M, K = x.shape
    build.load()                                   # sets _amd
    lib = build.usable(x, weight, out) if (build._all_rows or build._amd) and K % 8 == 0 \
        and weight.is_contiguous() and out.is_contiguous() else None
    if lib is None:
        return torch.mm(x, weight.t(), out=out)
    x = x.contiguous()
    lib.gemv(x.data_ptr(), weight.data_ptr(), 0, out.data_ptr(), M, weight.shape[0], K, torch.get_num_threads())
    return out


def _gemv(lib, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    K = x.shape[-1]
    M = x.numel() // K
    x2 = x.reshape(M, K).contiguous()
    N = weight.shape[0]
    y = torch.empty(*x.shape[:-1], N)
    b = 0 if bias is None else bias.contiguous().data_ptr()
    lib.gemv(x2.data_ptr(), weight.data_ptr(), b, y.data_ptr(), M, N, K, torch.get_num_threads())
    return y


def linear_many(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
    """[F.linear(x, w, b) ...] for up to 4 weights sharing x [.., K], in one kernel call for few rows;
    None where the kernel does not apply (the caller runs them one by one)."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if not 0 < len(weights) <= 4 or not _gemv_rows_ok(M, K, max(w.shape[0] for w in weights)) or K % 8 \
            or not all(w.is_contiguous() and w.shape[1] == K for w in weights):
        return None
    lib = build.usable(x, *weights, *[b for b in biases if b is not None])
    if lib is None:
        return None
    x2 = x.reshape(M, K).contiguous()
    ys = [torch.empty(*x.shape[:-1], w.shape[0]) for w in weights]
    bs = [b.contiguous() if b is not None else None for b in biases]
    ptrs = torch.tensor([[w.data_ptr() for w in weights], [0 if b is None else b.data_ptr() for b in bs],
                         [y.data_ptr() for y in ys]], dtype=torch.int64)
    N = torch.tensor([w.shape[0] for w in weights], dtype=torch.int32)
    lib.gemv_many(x2.data_ptr(), ptrs[0].data_ptr(), ptrs[1].data_ptr(), ptrs[2].data_ptr(), N.data_ptr(),
                  len(weights), M, K, torch.get_num_threads())
    return ys
