"""Causal attention within sequences packed back to back (packed_attention.c), forward and backward, for training
on CPU; None where the caller's SDPA path should run.

    out = packed_attention(q, k, v, lengths)     # q [1, H, N, hd], k, v [1, Hkv, N, hd] -> [1, H, N, hd]

An SFT or GRPO step packs its examples into one row and ran one causal SDPA per example; on CPU its flash kernel
reached ~30-50 GFLOP/s at 100-300 tokens (about a tenth of an SFT step). The kernel runs every example and kv head
as one task of a parallel loop, reads q, k, v in the projections' [N, heads, hd] layout (no copies), and saves
the log-sum-exp for a backward that recomputes the probabilities, as flash attention does.
"""
from __future__ import annotations

import ctypes
import math

import torch

import rftkit.kernels.build as build

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
build.declare({
    "packed_attn_fwd": ([_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _I], None),
    "packed_attn_bwd": ([_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _I], None),
})


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[1, heads, N, hd] -> its [N, heads, hd] memory (a copy only where it is laid out otherwise)."""
    return t[0].transpose(0, 1).contiguous()


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lens):
        qr, kr, vr = _rows(q), _rows(k), _rows(v)
        N, H, hd = qr.shape
        Hkv = kr.shape[1]
        o = torch.empty_like(qr)
        lse = torch.empty(H, N)
        scale = 1.0 / math.sqrt(hd)
        build.load().packed_attn_fwd(qr.data_ptr(), kr.data_ptr(), vr.data_ptr(), o.data_ptr(), lse.data_ptr(),
                                     lens.data_ptr(), lens.numel(), N, H, Hkv, hd, scale, torch.get_num_threads())
        ctx.save_for_backward(qr, kr, vr, o, lse, lens)
        return o.transpose(0, 1)[None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qr, kr, vr, o, lse, lens = ctx.saved_tensors
        N, H, hd = qr.shape
        Hkv = kr.shape[1]
        do = _rows(dout)
        dq, dk, dv = torch.empty_like(qr), torch.empty_like(kr), torch.empty_like(vr)
        build.load().packed_attn_bwd(qr.data_ptr(), kr.data_ptr(), vr.data_ptr(), o.data_ptr(), do.data_ptr(),
                                     lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), lens.data_ptr(),
                                     lens.numel(), N, H, Hkv, hd, 1.0 / math.sqrt(hd), torch.get_num_threads())
        return dq.transpose(0, 1)[None], dk.transpose(0, 1)[None], dv.transpose(0, 1)[None], None


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor | None:
    """Causal attention inside each of the packed sequences (scale 1 / sqrt(hd), grouped-query heads), or None
    where the kernel does not apply: not CPU fp32, head_dim not a multiple of 16, a batch of more than one row,
    kernels off or not built."""
    if not build._enabled or q.dim() != 4 or q.shape[0] != 1 or q.shape[3] % 16 or k.shape[1] == 0 \
            or q.shape[1] % k.shape[1] or k.shape != v.shape or q.shape[2] != k.shape[2]:
        return None
    for t in (q, k, v):
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return None
    if sum(lengths) != q.shape[2] or build.load() is None:
        return None
    return _PackedAttention.apply(q, k, v, torch.tensor(lengths, dtype=torch.int32))
