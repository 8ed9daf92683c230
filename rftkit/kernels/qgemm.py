"""Bindings of the int8 / int4 weight-only kernels (qgemm.c), used by rftkit.compress.quantize's QuantLinear.

    L = (QLayer * 3)(); L[0].fill(qweight, scales, mins, bias, N, lora)
    lib.qlinear_many(x, M, K, bits, group_size // 32, 3, ctypes.addressof(L), threads)
    lib.dequant_i4(...) / lib.dequant_i8(...)     # rows of the fp32 weight, for many-row products

Up to 64 rows (decode, batched decode): the low-bit weights are read as they are, the activations rounded to int8 per block of 32
and the dot products run on integers (llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0), each layer's unmerged LoRA
added in the same call. torch's own int8/int4 matmuls ran a scalar loop on CPUs without AVX-512
(docs/benchmarks.md, "Kernel design notes").
"""
from __future__ import annotations

import ctypes

import torch

import rftkit.kernels.build as build

QLINEAR_MAX_ROWS = 64          # decode rows and batches up to 64 on integer dot products; more: dequantize + MKL


class QLayer(ctypes.Structure):
    """One layer of a qlinear_many call (the C struct qlayer, kernels.h): addresses, 0 where absent."""
    _fields_ = [("q", ctypes.c_int64), ("d", ctypes.c_int64), ("mn", ctypes.c_int64), ("bias", ctypes.c_int64),
                ("A", ctypes.c_int64), ("B", ctypes.c_int64), ("y", ctypes.c_int64), ("scale", ctypes.c_float),
                ("r", ctypes.c_int32), ("N", ctypes.c_int32)]

    def fill(self, q: torch.Tensor, d: torch.Tensor, mn: torch.Tensor | None, bias: torch.Tensor | None, N: int,
             lora: tuple | None) -> None:
        """Point at a quantized layer's tensors (mn None for int8) with N outputs, and its unmerged LoRA
        (A [r, K], B [N, r], scale) or none; the output address is set per call."""
        self.q, self.d, self.mn = q.data_ptr(), d.data_ptr(), mn.data_ptr() if mn is not None else 0
        self.bias = bias.data_ptr() if bias is not None else 0
        self.N = N
        self.A = self.B = self.r = 0
        self.scale = 0.0
        if lora:
            self.A, self.B, self.scale, self.r = lora[0].data_ptr(), lora[1].data_ptr(), float(lora[2]), \
                lora[0].shape[0]


_P, _I = ctypes.c_void_p, ctypes.c_int
build.declare({
    "qlinear_many": ([_P, _I, _I, _I, _I, _I, _P, _I], None),
    "dequant_i4": ([_P, _P, _P, _P, _I, _I, _I, _I, _I], None),
    "dequant_i8": ([_P, _P, _P, _I, _I, _I, _I], None),
})
