"""Decode attention over the paged KV cache (attention.c): one query per row, each row's blocks read where they
are, with the gathering torch reference it falls back to.

    out = paged_attention(q, K, V, table, qpos, block_size, window)

The torch path gathers every row's blocks into a contiguous copy per layer and step (hundreds of MB per step
at batch 64); the kernel reads the blocks in place.
"""
from __future__ import annotations

import ctypes

import torch

import rftkit.kernels.build as build

ATTN_MAX_GROUP, ATTN_MAX_HEAD_DIM = 16, 256

_P, _I = ctypes.c_void_p, ctypes.c_int
build.declare({"paged_attn": ([_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_float, _I], None)})


def paged_attention_reference(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, table: torch.Tensor,
                              qpos: torch.Tensor, block_size: int, window: int | None) -> torch.Tensor:
    """Gather each row's blocks, mask by position, softmax. q [B, H, hd]; kc, vc [slots, Hkv, hd];
    table [B, nb] block ids; qpos [B] -> [B, H, hd]."""
    B, H, hd = q.shape
    Hkv = kc.shape[1]
    read = (table[:, :, None] * block_size + torch.arange(block_size, device=q.device)).reshape(B, -1)  # [B, S]
    k, v = kc[read].transpose(1, 2), vc[read].transpose(1, 2)                                  # [B, Hkv, S, hd]
    kp = torch.arange(read.shape[1], device=q.device)[None]                                    # [1, S]
    allowed = kp <= qpos[:, None]
    if window is not None:
        allowed &= (qpos[:, None] - kp) < window
    qg = q.reshape(B, Hkv, H // Hkv, hd)
    scores = (qg @ k.transpose(-1, -2)) * hd ** -0.5                                           # [B, Hkv, G, S]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    return (torch.softmax(scores.float(), -1).to(v.dtype) @ v).reshape(B, H, hd)


def paged_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, table: torch.Tensor,
                    qpos: torch.Tensor, block_size: int, window: int | None) -> torch.Tensor:
    """Attention of one query per row over its cache blocks, read in place by the kernel (shapes as in
    `paged_attention_reference`, which it falls back to)."""
    B, H, hd = q.shape
    Hkv = kc.shape[1]
    lib = None
    if hd % 8 == 0 and hd <= ATTN_MAX_HEAD_DIM and H // Hkv <= ATTN_MAX_GROUP and table.dtype == torch.int64 \
            and kc.is_contiguous() and vc.is_contiguous():
        lib = build.usable(q, kc, vc)
    if lib is None:
        return paged_attention_reference(q, kc, vc, table, qpos, block_size, window)
    q, table, qpos = q.contiguous(), table.contiguous(), qpos.contiguous()
    out = torch.empty(B, H, hd)
    lib.paged_attn(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), table.data_ptr(), qpos.data_ptr(), out.data_ptr(),
                   B, H, Hkv, hd, table.shape[1], block_size, window or 0, hd ** -0.5, torch.get_num_threads())
    return out
