"""Hand-written CPU kernels for the decode path and for training (log-probs, SwiGLU, packed attention; fp32, AVX2 +
FMA, OpenMP; the GEMV also 16 lanes wide on Intel CPUs with AVX-512 and AMD Zen 5), each with its torch reference.

    y = linear(x, weight, bias)                    # [.., K] -> [.., N]; a GEMV kernel for <= 64 rows (any on AMD Zen 5)
    q, k, v = linear_many(x, [Wq, Wk, Wv], [None] * 3)   # several weights of one input, one call
    dx = matmul_nn(dy, weight)                     # dy @ W, a frozen linear's input gradient (16 lanes)
    out = paged_attention(q, K, V, table, qpos, block_size, window)
    lora_bgmv(x, y, rows, slots)                   # y += s * B_slot A_slot x, a slot per row (Punica BGMV)
    tokens, logp = sample_rows(logits, temperature, u)   # inverse-CDF sampling in one pass per row
    logp, lse, ent, s = softmax_rows(z, targets, 1 / T, True)   # training log-probs, z -> exp in place
    y = rms_norm(x, w, eps); q = rope(q, cos, sin)        # decode rows (None: run the torch ops)
    h = swiglu(gate, up)                           # silu(gate) * up, forward and backward one pass each
    out = packed_attention(q, k, v, lengths)       # causal attention within packed sequences, with its backward
    decode_layers(x, layers, ...)                  # a whole stack of plain decoder blocks, one call

A leaf package: it imports nothing from rftkit. One family per pair of files, the C beside its Python:
gemv (linear), attention, rowops (RMSNorm, RoPE), bgmv (the adapter bank), softmax (sampling, log-probs),
swiglu (the MLP's silu(gate) * up, in training too), packed_attention (training's attention), qgemm (int8/int4
layers), decode (the one-call block stack); kernels.h declares every entry point and struct,
and build.py compiles all of it into one shared library in the cache.

Why. One decode step of a small model is bound by memory bandwidth and by the dispatch of many small torch
ops; the kernels read each weight once, read the paged KV cache and the bank's adapters in place, and run a
whole block stack per call (measurements: docs/benchmarks.md, "Kernel design notes").

Every entry point falls back to plain torch ops (the reference the tests compare against) when a kernel does
not apply: no compiler or no AVX2, a CUDA or non-fp32 tensor, autograd recording, shapes the kernel does not
handle. `set_enabled(False)` forces the reference path everywhere (A/B benchmarks, tests).
"""
import rftkit.kernels.build as build
from rftkit.kernels.attention import (ATTN_MAX_GROUP, ATTN_MAX_HEAD_DIM, paged_attention,
                                      paged_attention_reference)
from rftkit.kernels.bgmv import BC, SlotTable, blocked_t, lora_bgmv, lora_bgmv_reference
from rftkit.kernels.build import available, lanes, load, set_enabled, set_lanes16, status
from rftkit.kernels.decode import (DECODE_MAX_ROWS, DecodeLayer, QBlock, decode_layers, decode_layers_q,
                                   decode_max_rows, struct_layout)
from rftkit.kernels.gemv import (GEMV_MAX_ROWS, GEMV_MAX_ROWS_LONG_K, linear, linear_into, linear_many,
                                 matmul_nn)
from rftkit.kernels.packed_attention import packed_attention
from rftkit.kernels.qgemm import QLINEAR_MAX_ROWS, QLayer
from rftkit.kernels.rowops import SMALL_MAX_ROWS, rms_norm, rope
from rftkit.kernels.softmax import sample_rows, softmax_rows
from rftkit.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "ATTN_MAX_GROUP", "ATTN_MAX_HEAD_DIM", "BC", "DECODE_MAX_ROWS", "GEMV_MAX_ROWS", "GEMV_MAX_ROWS_LONG_K",
    "QLINEAR_MAX_ROWS", "SMALL_MAX_ROWS", "DecodeLayer", "QBlock", "QLayer", "SlotTable", "available", "blocked_t",
    "build", "decode_layers", "decode_layers_q", "decode_max_rows", "lanes", "linear", "linear_into",
    "linear_many", "load", "lora_bgmv", "lora_bgmv_reference", "matmul_nn", "packed_attention", "paged_attention",
    "paged_attention_reference", "rms_norm", "rope", "sample_rows", "set_enabled", "set_lanes16",
    "softmax_rows", "status", "struct_layout", "swiglu", "swiglu_reference",
]
