"""Punica BGMV on CPU (bgmv.c): every row's adapter of the bank added in one call, a slot per row, the slots'
weights read in place; with its per-slot torch reference.

    table = SlotTable(n_slots); table.set(slot, A, B, scale)
    lora_bgmv(x, y, rows, table)                   # y += s * B_slot A_slot x, a slot per row

The torch path runs two small matmuls plus an index_select/index_add per slot group and module; the kernel
does every row's adapter in one call, each slot's A and B read from memory once per call.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

import rftkit.kernels.build as build

_P, _I = ctypes.c_void_p, ctypes.c_int
build.declare({"lora_bgmv": ([_P] * 11 + [_I] * 6, None)})

BC = 32    # columns per block of a bank slot's B^T (bgmv.c's BC)


def blocked_t(B: torch.Tensor) -> torch.Tensor:
    """B [N, R] as lora_bgmv's expand reads it: B^T cut into blocks of BC columns, each block's R rows
    contiguous ([ceil(N / BC), R, BC], the last block zero-padded), so a task's run of columns is one
    contiguous read instead of R short strided ones."""
    N, R = B.shape
    Bt = torch.zeros(R, -(-N // BC) * BC, dtype=B.dtype)
    Bt[:, :N] = B.t()
    return Bt.reshape(R, -1, BC).transpose(0, 1).contiguous()


class SlotTable:
    """Per-module pointer table of the bank's slots for `lora_bgmv`: A [R, K] and B [N, R] of each slot (slot 0
    = none) with its scale. Keeps the tensors alive; `set` / `clear` when a slot changes. A slot loaded from
    files also keeps B transposed in blocks (`blocked_t`, the kernel's fast layout); a live slot (`live=True`: a
    trainer updates A and B in place) is read as it is, so the kernel always sees the current weights."""

    def __init__(self, n_slots: int):
        self.tensors: list[tuple | None] = [None] * (n_slots + 1)
        self._bt: list[torch.Tensor | None] = [None] * (n_slots + 1)
        self.A = torch.zeros(n_slots + 1, dtype=torch.int64)
        self.B = torch.zeros(n_slots + 1, dtype=torch.int64)
        self.T = torch.zeros(n_slots + 1, dtype=torch.int32)       # 1: B pointer is blocked_t(B)
        self.R = torch.zeros(n_slots + 1, dtype=torch.int32)
        self.s = torch.zeros(n_slots + 1, dtype=torch.float32)
        self._bad: set[int] = set()                # slots whose tensors the kernel cannot read
        self._rank = [0] * (n_slots + 1)

    @property
    def kernel_ok(self) -> bool:                   # every set slot is CPU fp32 contiguous
        return not self._bad

    @property
    def max_rank(self) -> int:
        return max(self._rank)

    def set(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float, live: bool = False) -> None:
        self.tensors[slot] = (A, B, scale)
        self._bt[slot] = None if live or B.device.type != "cpu" else blocked_t(B)
        self._update(slot)

    def clear(self, slot: int) -> None:
        self.tensors[slot] = self._bt[slot] = None
        self._update(slot)

    def _update(self, k: int) -> None:
        """Rewrite slot k's row of the pointer table only (a load or eviction touches one slot, not all)."""
        self.A[k] = self.B[k] = self.T[k] = self.R[k] = self.s[k] = 0
        self._bad.discard(k)
        self._rank[k] = 0
        ab = self.tensors[k]
        if ab is None:
            return
        A, B, scale = ab
        self._rank[k] = A.shape[0]
        if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (A, B)):
            self._bad.add(k)
            return
        bt = self._bt[k]
        self.A[k], self.R[k], self.s[k] = A.data_ptr(), A.shape[0], scale
        self.B[k], self.T[k] = (B.data_ptr(), 0) if bt is None else (bt.data_ptr(), 1)


def lora_bgmv_reference(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, table: SlotTable) -> torch.Tensor:
    """y [M, N] + per row m: s_k * x[m] @ A_k^T @ B_k^T with k = rows[m] (slots without weights add nothing)."""
    out = y.clone()
    for k, ab in enumerate(table.tensors):
        if ab is None:
            continue
        idx = (rows == k).nonzero().flatten()
        if len(idx):
            A, B, scale = ab
            out.index_add_(0, idx, F.linear(F.linear(x[idx], A), B) * scale)
    return out


def lora_bgmv(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, table: SlotTable) -> torch.Tensor | None:
    """Add every row's adapter to y in place with the kernel: x [M, K], y [M, N] contiguous, rows int32 [M].
    Returns y, or None when the kernel does not apply (the caller takes its torch path)."""
    if not table.kernel_ok or rows.dtype != torch.int32 or not y.is_contiguous() or x.shape[-1] % 8:
        return None
    lib = build.usable(x, y)
    if lib is None:
        return None
    x = x.contiguous()
    M, K = x.shape
    R, S = max(table.max_rank, 1), table.A.shape[0]
    xs, tmp, idx = torch.empty(M, K), torch.empty(M, R), torch.empty(M + 3 * S + 1, dtype=torch.int32)
    lib.lora_bgmv(x.data_ptr(), y.data_ptr(), rows.data_ptr(), table.A.data_ptr(), table.B.data_ptr(),
                  table.T.data_ptr(), table.R.data_ptr(), table.s.data_ptr(), xs.data_ptr(), tmp.data_ptr(),
                  idx.data_ptr(), M, K, y.shape[1], R, S, torch.get_num_threads())
    return y
