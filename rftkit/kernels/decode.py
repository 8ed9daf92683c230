"""Bindings of the one-call decode stack (decode.c): every decoder block of a decode step in one kernel call.

    layers = (DecodeLayer * n)()     # filled by rftkit.decode_stack from the model's weights, kept
    decode_layers(x, layers, ...)    # plain blocks, with unmerged LoRA and the bank's per-row adapters
    decode_layers_q(x, blocks, ...)  # quantized blocks (QBlock), with unmerged LoRA

The structs and the ctypes signatures of their entry points are declared here, side by side; the library
reports the C layout (`struct_layout`) and tests/test_kernels.py compares it with these mirrors.
"""
from __future__ import annotations

import ctypes

import torch

import rftkit.kernels.build as build
from rftkit.kernels.attention import ATTN_MAX_GROUP, ATTN_MAX_HEAD_DIM
from rftkit.kernels.gemv import GEMV_MAX_ROWS_LONG_K
from rftkit.kernels.qgemm import QLINEAR_MAX_ROWS, QLayer

DECODE_MAX_ROWS = GEMV_MAX_ROWS_LONG_K      # down_proj's K (the FFN width) is long: the GEMV kernel's limit


class DecodeLayer(ctypes.Structure):
    """One decoder block of a decode_layers call (the C struct dlayer, kernels.h): addresses, 0 for an absent
    bias."""
    _fields_ = [(n, ctypes.c_int64) for n in ("ln1", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo", "ln2",
                                              "wg", "wu", "wd", "bg", "bu", "bd", "kc", "vc")] \
        + [("la", ctypes.c_int64 * 7), ("lb", ctypes.c_int64 * 7), ("ls", ctypes.c_float * 7),
           ("lr", ctypes.c_int32 * 7), ("window", ctypes.c_int32), ("pad", ctypes.c_int32)] \
        + [(n, ctypes.c_int64 * 7) for n in ("bA", "bB", "bT", "bR", "bS")]
    LORA_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    LORA_MAX_RANK = 64


class QBlock(ctypes.Structure):
    """One decoder block of a decode_layers_q call (the C struct qblock, kernels.h)."""
    _fields_ = [("ln1", ctypes.c_int64), ("ln2", ctypes.c_int64), ("kc", ctypes.c_int64), ("vc", ctypes.c_int64),
                ("qkv", QLayer * 3), ("o", QLayer), ("gu", QLayer * 2), ("down", QLayer),
                ("window", ctypes.c_int32), ("pad", ctypes.c_int32)]


STRUCTS = {"dlayer": (0, DecodeLayer), "qlayer": (1, QLayer), "qblock": (2, QBlock)}   # C name: (id, mirror)

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
build.declare({
    # x, layers, nl, M, D, H, Hkv, hd, F, cos, sin, table, nbmax, qpos, write, block_size, eps, scale, ws,
    # bank rows, rmax, nslots, bxs, btmp, bidx, threads
    "decode_layers": ([_P, _P, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _I, _P, _P, _I, _F, _F, _P,
                       _P, _I, _I, _P, _P, _P, _I], None),
    # x, blocks, nl, M, D, H, Hkv, hd, F, bits, sub, cos, sin, table, nbmax, qpos, write, block_size, eps, scale,
    # ws, threads
    "decode_layers_q": ([_P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _I, _P, _P, _I, _F, _F, _P, _I],
                        None),
    "struct_layout": ([_I, _P, _I], ctypes.c_int),
})


def decode_max_rows() -> int:
    """The most rows decode_layers takes."""
    return DECODE_MAX_ROWS


def struct_layout(name: str) -> list[int]:
    """[size, offset of each field...] of C struct `name` (dlayer, qlayer, qblock) as the library lays it out."""
    lib = build.load()
    if lib is None:
        raise RuntimeError(f"struct_layout({name!r}): no kernel library ({build.error()})")
    if name not in STRUCTS:
        raise ValueError(f"unknown kernel struct {name!r} (known: {', '.join(STRUCTS)})")
    out = (ctypes.c_int64 * 64)()
    n = lib.struct_layout(STRUCTS[name][0], out, len(out))
    return list(out[:n])


def decode_layers(x: torch.Tensor, layers, n_heads: int, n_kv: int, head_dim: int, ffn_dim: int,
                  cos: torch.Tensor, sin: torch.Tensor, table: torch.Tensor, qpos: torch.Tensor,
                  write: torch.Tensor, block_size: int, eps: float, bank_rows: torch.Tensor | None = None,
                  bank_rank: int = 0, bank_slots: int = 0) -> bool:
    """Run len(layers) plain decoder blocks (RMSNorm, q/k/v, RoPE, paged attention, o, RMSNorm, SwiGLU; each
    linear with its unmerged LoRA or none) on x [M, D] in place, one new token per row, writing each block's
    new key and value to cache row write[m]: the model's per-op decode path in one call. `layers` is a
    DecodeLayer array the caller built (and keeps) from fp32 CPU contiguous weights. cos, sin [M, head_dim];
    table [M, nb], qpos, write [M] int64. bank_rows (int32 [M], a slot per row) adds the adapter bank's
    per-row adapters after each linear and its own LoRA, as BankLinear does (lora_bgmv over each module's
    slot table in bA..bS: bank_slots entries, slot 0 included, ranks <= bank_rank). False where the kernel
    does not apply (the caller runs its blocks)."""
    M, D = x.shape
    if not 0 < M <= decode_max_rows() or D % 8 or (n_heads * head_dim) % 8 or ffn_dim % 8 or head_dim % 8 \
            or head_dim > ATTN_MAX_HEAD_DIM or n_heads // n_kv > ATTN_MAX_GROUP or not x.is_contiguous() \
            or table.dtype != torch.int64 or qpos.dtype != torch.int64 or write.dtype != torch.int64:
        return False
    lib = build.usable(x, cos, sin)
    if lib is None:
        return False
    cos, sin, table, qpos, write = (t.contiguous() for t in (cos, sin, table, qpos, write))
    nq, nk = n_heads * head_dim, n_kv * head_dim
    if bank_rows is not None and (bank_rows.dtype != torch.int32 or bank_rows.shape != (M,)):
        return False
    ws = torch.empty(M * (2 * D + 3 * nq + 2 * nk + 2 * ffn_dim))
    rmax = max(int(bank_rank), 1)
    rows = bank_rows.contiguous() if bank_rows is not None else None
    bxs = btmp = bidx = None
    if rows is not None:                          # lora_bgmv's scratch: rows sorted by slot, their x, A x
        bxs, btmp = torch.empty(M * max(D, nq, ffn_dim)), torch.empty(M * rmax)
        bidx = torch.empty(M + 3 * bank_slots + 1, dtype=torch.int32)
    lib.decode_layers(x.data_ptr(), ctypes.addressof(layers), len(layers), M, D, n_heads, n_kv, head_dim, ffn_dim,
                      cos.data_ptr(), sin.data_ptr(), table.data_ptr(), table.shape[1], qpos.data_ptr(),
                      write.data_ptr(), block_size, eps, head_dim ** -0.5, ws.data_ptr(),
                      0 if rows is None else rows.data_ptr(), rmax, bank_slots,
                      *(0 if t is None else t.data_ptr() for t in (bxs, btmp, bidx)), torch.get_num_threads())
    return True


def decode_layers_q(x: torch.Tensor, blocks, bits: int, group_size: int, n_heads: int, n_kv: int, head_dim: int,
                    ffn_dim: int, cos: torch.Tensor, sin: torch.Tensor, table: torch.Tensor, qpos: torch.Tensor,
                    write: torch.Tensor, block_size: int, eps: float) -> bool:
    """decode_layers for quantized blocks: `blocks` a QBlock array the caller built (and keeps), every layer of
    `bits` / `group_size`. x [M, D] in place, M <= QLINEAR_MAX_ROWS. Runs whenever the library exists (as
    rftkit.compress.quantize's layers do), `set_enabled` aside. False where the kernel does not apply (the caller runs
    its blocks)."""
    M, D = x.shape
    if not 0 < M <= QLINEAR_MAX_ROWS or not x.is_contiguous() or x.dtype != torch.float32 \
            or x.device.type != "cpu" or head_dim % 8 or head_dim > ATTN_MAX_HEAD_DIM \
            or n_heads // n_kv > ATTN_MAX_GROUP:
        return False
    lib = build.load()
    if lib is None:
        return False
    cos, sin = cos.contiguous(), sin.contiguous()
    nq, nk = n_heads * head_dim, n_kv * head_dim
    ws = torch.empty(M * (2 * D + 3 * nq + 2 * nk + 2 * ffn_dim))
    lib.decode_layers_q(x.data_ptr(), ctypes.addressof(blocks), len(blocks), M, D, n_heads, n_kv, head_dim, ffn_dim,
                        bits, group_size // 32 if bits == 4 else 1, cos.data_ptr(), sin.data_ptr(), table.data_ptr(),
                        table.shape[1], qpos.data_ptr(), write.data_ptr(), block_size, eps, head_dim ** -0.5,
                        ws.data_ptr(), torch.get_num_threads())
    return True
