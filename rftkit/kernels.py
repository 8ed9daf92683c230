"""Hand-written CPU kernels for the decode path and the training log-probs (fp32, AVX2 + FMA, OpenMP; the GEMV also
16 lanes wide on Intel CPUs with AVX-512 and AMD Zen 5), each with its torch reference.

    y = linear(x, weight, bias)                    # [.., K] -> [.., N]; a GEMV kernel for <= 64 rows (any on AMD Zen 5)
    q, k, v = linear_many(x, [Wq, Wk, Wv], [None] * 3)   # several weights of one input, one call
    dx = matmul_nn(dy, weight)                     # dy @ W, a frozen linear's input gradient (16 lanes)
    out = paged_attention(q, K, V, table, qpos, block_size, window)
    lora_bgmv(x, y, rows, slots)                   # y += s * B_slot A_slot x, a slot per row (Punica BGMV)
    tokens, logp = sample_rows(logits, temperature, u)   # inverse-CDF sampling in one pass per row
    logp, lse, ent, s = softmax_rows(z, targets, 1 / T, True)   # training log-probs, z -> exp in place
    y = rms_norm(x, w, eps); q = rope(q, cos, sin)        # decode rows (None: run the torch ops)
    decode_layers(x, layers, ...)                  # a whole stack of plain decoder blocks, one call

Why. One decode step of a small model multiplies a handful of rows by every weight: it is bound by memory
bandwidth, and torch's fp32 GEMV reached ~12 GB/s on this 2-core AVX2 machine where a copy reaches ~22-26.
The paged KV cache's torch path gathers every row's blocks into a contiguous copy per layer and step
(hundreds of MB per step at batch 64); the kernel reads the blocks where they are. The adapter bank's torch
path runs two small matmuls plus an index_select/index_add per slot group and module; the kernel does every
row's adapter in one call. Sampling at batch 64 spent ~14 ms a step in torch (log_softmax, a second softmax,
cumsum over 49152 tokens, searchsorted); the kernel reads each row's logits three times. RMSNorm and RoPE of
a decode step are ~7 torch ops each per layer, pure dispatch overhead at one row. The kernels are C (kernels.c) built
once with the system compiler into the cache (like rftkit.quantize's int8/int4 kernel; no torch headers,
~1 s) and loaded with ctypes. The shared object links `libgomp.so.1`, which torch has loaded already, so
kernels and torch share one OpenMP pool.

Every entry point falls back to plain torch ops (the reference the tests compare against) when a kernel does
not apply: no compiler or no AVX2, a CUDA or non-fp32 tensor, autograd recording, shapes the kernel does not
handle. `set_enabled(False)` forces the reference path everywhere (A/B benchmarks, tests).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

GEMV_MAX_ROWS = 64             # the GEMV kernel's row limit; measured on 2 cores against MKL (F.linear), weights
GEMV_MAX_ROWS_LONG_K = 64      # out of cache. The first AVX2 machine, eight x rows against one weight row: at K =
                               # 576 2.3-2.9x at 8 rows, 1.3-1.7x at 16-32, 1.2x at 64, ~1.05x at 128; at K = 1536
                               # (down_proj) 1.2x at 8, 1.1x at 16, 0.9-1.0x beyond (so long K stopped at 16).
                               # Three x rows against four weight rows (gemv_rows), a 2-core AMD EPYC: at 64 rows
                               # 1.4-1.5x at K = 576 and 1.4x at K = 1536 (0.63 vs 0.87 ms), 1.7x at 32 (down_proj
                               # 0.35 vs 0.60 ms), 179-191 GFLOP/s at 64 rows; so long K goes to 64 rows too.


# On Intel CPUs with AVX-512 the GEMV kernel runs 16 lanes wide (gemv_rows16: six x rows against four weight
# rows, 10 loads per 24 FMAs). MKL's 16-lane GEMM beat the 8-lane kernel there from 2 rows up (a 2-core Xeon
# with AVX-512 and AMX, weights out of cache: 1.1-1.4x at 2-32 rows of K = 576); the 16-lane kernel, on a 2-core
# Sapphire Rapids with the weights read from memory: 1.18-1.57x MKL at 16 rows, 1.13-1.41x at 64, a tie at one
# row (bench/gemv.py). AMD Zen 5 (cpu family 26 and up: full-width AVX-512) runs 16 lanes too: on a 2-core
# EPYC 1.9-2.0x the 8-lane kernel at 64 rows and 1.1-1.2x at one (bench/gemv.py, 2026-12-04). There MKL has no
# AVX-512 path and the kernel takes every row count (`_all_rows`: 1.6-2.2x MKL at 64-2048 rows of every layer's
# shape, chunks of 64 rows in C); elsewhere it stops at GEMV_MAX_ROWS and larger products go to MKL. Earlier
# AMD CPUs with AVX-512 (Zen 4 double-pumps 512-bit ops) keep 8 lanes: unmeasured there.
_lanes16: bool | None = None
_all_rows = False              # the GEMV kernel takes any number of rows (16 lanes on AMD), not just few


def _gemv_rows_ok(M: int, K: int, N: int) -> bool:
    _load()                                        # sets _all_rows
    return 0 < M and (_all_rows or M <= (GEMV_MAX_ROWS if K <= 1024 else GEMV_MAX_ROWS_LONG_K))


def _default_lanes16(cpuinfo: str) -> bool:
    """16 lanes on Intel CPUs with AVX-512 and on AMD Zen 5 or later (cpu family >= 26) with it."""
    if " avx512f" not in cpuinfo:
        return False
    if "GenuineIntel" in cpuinfo:
        return True
    family = re.search(r"^cpu family\s*:\s*(\d+)", cpuinfo, re.M)
    return "AuthenticAMD" in cpuinfo and family is not None and int(family.group(1)) >= 26


def set_lanes16(on: bool) -> None:
    """The GEMV kernel's 16-lane AVX-512 path on or off (A/B benchmarks, tests); on by default on Intel CPUs
    with AVX-512 and AMD Zen 5 (`_default_lanes16`). On AMD it also lifts the kernel's row limit. K % 16 != 0
    always runs 8 lanes."""
    lib = _load()
    if lib is None:
        return
    info = _cpuinfo()
    if on and " avx512f" not in info:
        raise ValueError("set_lanes16(True): this CPU has no AVX-512")
    _set_lanes(lib, bool(on), info)


def _set_lanes(lib, on: bool, cpuinfo: str) -> None:
    global _lanes16, _all_rows
    _lanes16 = on
    _all_rows = on and "AuthenticAMD" in cpuinfo
    lib.set_wide(int(on))


def lanes() -> int:
    """How wide the GEMV kernel runs on this CPU: 16 (AVX-512 path on) or 8."""
    _load()
    return 16 if _lanes16 else 8


def _cpuinfo() -> str:
    return open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""


ATTN_MAX_GROUP, ATTN_MAX_HEAD_DIM = 16, 256

C_HELPERS = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <immintrin.h>
#include <omp.h>

static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a)); a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1)); return _mm_cvtss_f32(a);
}
static inline float dot(const float* a, const float* b, int n) {       /* any n */
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int k = 0;
  for (; k + 16 <= n; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  float r = hsum(_mm256_add_ps(s0, s1));
  for (; k < n; k++) r += a[k] * b[k];
  return r;
}
"""   # the includes and helpers every C source here starts with (rftkit.quantize's too)

_SRC = C_HELPERS + Path(__file__).with_name("kernels.c").read_text()      # the kernels themselves

_lib = None
_error: str | None = None
_enabled = True


def build_library(src: str, stem: str, what: str) -> tuple[ctypes.CDLL | None, str | None]:
    """Compile C source `src` once into the cache (`kernels/{stem}-{hash}.so`, -O3 -mavx2 -mfma -fopenmp) and
    load it: (library, None), or (None, why not) on a CPU without AVX2+FMA or a machine without a compiler.
    Shared by these kernels and rftkit.quantize's."""
    flags = _cpuinfo()
    if " avx2" not in flags or " fma" not in flags:
        return None, "CPU without AVX2+FMA"
    from rftkit.loading import cache_dir
    tag = hashlib.sha256(src.encode()).hexdigest()[:12]
    so = cache_dir() / "kernels" / f"{stem}-{tag}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            c, out = Path(tmp) / f"{stem}.c", Path(tmp) / so.name
            c.write_text(src)
            cmd = [os.environ.get("CC", "cc"), "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC",
                   str(c), "-o", str(out), "-lm"]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                return None, f"could not compile the {what} ({cmd[0]}: {e})"
            os.replace(out, so)                  # atomic: a concurrent process sees all or nothing
    return ctypes.CDLL(str(so)), None


def _load():
    """Build (once, into the cache) and load the kernels; None when this machine cannot."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    cpuinfo = _cpuinfo()
    lib, _error = build_library(_SRC, "decode", "decode kernels")
    if lib is None:
        return None
    P, I, Fl = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.gemv.argtypes = [P, P, P, P, I, I, I, I]
    lib.gemm_nn.argtypes = [P, P, P, I, I, I, I]
    lib.set_wide.argtypes = [I]
    _set_lanes(lib, _default_lanes16(cpuinfo), cpuinfo)
    lib.gemv_many.argtypes = [P, P, P, P, P, I, I, I, I]
    lib.paged_attn.argtypes = [P, P, P, P, P, P, I, I, I, I, I, I, I, Fl, I]
    lib.rms_norm.argtypes = [P, P, P, I, I, Fl]
    lib.rope.argtypes = [P, P, P, P, I, I, I]
    lib.sample_rows.argtypes = [P, P, P, P, P, I, I, I]
    lib.softmax_rows.argtypes = [P, P, Fl, P, P, P, P, I, I, I]
    lib.lora_bgmv.argtypes = [P, P, P, P, P, P, P, P, P, P, P, I, I, I, I, I, I]
    lib.decode_layers.argtypes = [P, P, I, I, I, I, I, I, I, P, P, P, I, P, P, I, Fl, Fl, P, P, I, I, P, P, P, I]
    _lib = lib
    return lib


def set_enabled(on: bool) -> None:
    """Use the kernels where they apply (default) or the torch reference everywhere."""
    global _enabled
    _enabled = bool(on)


def available() -> bool:
    return _enabled and _load() is not None


def status() -> str:
    if not _enabled:
        return "torch reference (kernels disabled)"
    return f"C kernels ({lanes()} lanes)" if _load() is not None else f"torch reference ({_error})"


def _usable(*tensors: torch.Tensor):
    """The library when every tensor is a CPU fp32 tensor outside autograd, else None."""
    if not _enabled:
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or (t.requires_grad and torch.is_grad_enabled()):
            return None
    return _load()


# ----------------------------------------------------------------------------------------------------------
# linear

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); x [.., K], weight [N, K]. Few rows on CPU (_gemv_rows_ok): the GEMV kernel.
    Under autograd with a frozen weight (a LoRA base in training) where the kernel takes every row count
    (`_all_rows`): the kernel forward and `matmul_nn` for the input's gradient (_FrozenLinear)."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if not _gemv_rows_ok(M, K, weight.shape[0]) or K % 8 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    lib = _usable(x, weight) if bias is None else _usable(x, weight, bias)
    if lib is None:
        if _all_rows and _frozen_ok(x, weight, bias):
            return _FrozenLinear.apply(x, weight, bias)
        return F.linear(x, weight, bias)
    return _gemv(lib, x, weight, bias)


def _frozen_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and not weight.requires_grad and (bias is None or not bias.requires_grad) \
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, weight)) and _enabled


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W and b frozen: the GEMV kernel forward (1.6-2.2x MKL at 64-2048 rows on AMD Zen 5)
    and dx = dy W by gemm_nn at 16 lanes (2.3x MKL there: 430-470 GFLOP/s at 64 and 1024 rows of every layer's
    shape), else by torch."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _gemv(_load(), x.detach(), weight, bias)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return matmul_nn(dy, weight), None, None


def matmul_nn(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g [.., N] @ weight [N, K] (an input gradient through a linear): gemm_nn at 16 lanes on CPU fp32 outside
    autograd, else torch."""
    N, K = weight.shape
    _load()                                        # sets _lanes16
    lib = _usable(g, weight) if _lanes16 and K % 16 == 0 and weight.is_contiguous() else None
    if lib is None:
        return g @ weight
    g2 = g.reshape(-1, N).contiguous()
    out = torch.empty(*g.shape[:-1], K)
    lib.gemm_nn(g2.data_ptr(), weight.data_ptr(), out.data_ptr(), g2.shape[0], N, K, torch.get_num_threads())
    return out


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """torch.mm(x, weight.t(), out=out) for x [M, K]; the GEMV kernel where it takes every row count (AMD Zen 5)."""
    M, K = x.shape
    _load()                                        # sets _all_rows
    lib = _usable(x, weight, out) if _all_rows and K % 8 == 0 and weight.is_contiguous() \
        and out.is_contiguous() else None
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


SMALL_MAX_ROWS = 64            # rms_norm / rope run single-threaded: worth it while dispatch dominates


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, or None where the kernel does not apply (the
    caller runs its torch ops)."""
    D = x.shape[-1]
    if x.numel() > SMALL_MAX_ROWS * D or not x.is_contiguous():
        return None
    lib = _usable(x, weight)
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
    lib = _usable(x, cos, sin)
    if lib is None:
        return None
    y = torch.empty_like(x)
    lib.rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), B * T, n, hd)
    return y


# ----------------------------------------------------------------------------------------------------------
# several linears of one input

def linear_many(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
    """[F.linear(x, w, b) ...] for up to 4 weights sharing x [.., K], in one kernel call for few rows;
    None where the kernel does not apply (the caller runs them one by one)."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if not 0 < len(weights) <= 4 or not _gemv_rows_ok(M, K, max(w.shape[0] for w in weights)) or K % 8 \
            or not all(w.is_contiguous() and w.shape[1] == K for w in weights):
        return None
    lib = _usable(x, *weights, *[b for b in biases if b is not None])
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


# ----------------------------------------------------------------------------------------------------------
# a stack of decoder blocks

DECODE_MAX_ROWS = GEMV_MAX_ROWS_LONG_K      # down_proj's K (the FFN width) is long: the GEMV kernel's limit


def decode_max_rows() -> int:
    """The most rows decode_layers takes."""
    return DECODE_MAX_ROWS


class DecodeLayer(ctypes.Structure):
    """One decoder block of a decode_layers call (the C struct dlayer): addresses, 0 for an absent bias."""
    _fields_ = [(n, ctypes.c_int64) for n in ("ln1", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo", "ln2",
                                              "wg", "wu", "wd", "bg", "bu", "bd", "kc", "vc")] \
        + [("la", ctypes.c_int64 * 7), ("lb", ctypes.c_int64 * 7), ("ls", ctypes.c_float * 7),
           ("lr", ctypes.c_int32 * 7), ("window", ctypes.c_int32), ("pad", ctypes.c_int32)] \
        + [(n, ctypes.c_int64 * 7) for n in ("bA", "bB", "bT", "bR", "bS")]
    LORA_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    LORA_MAX_RANK = 64


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
    lib = _usable(x, cos, sin)
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


# ----------------------------------------------------------------------------------------------------------
# paged decode attention

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
        lib = _usable(q, kc, vc)
    if lib is None:
        return paged_attention_reference(q, kc, vc, table, qpos, block_size, window)
    q, table, qpos = q.contiguous(), table.contiguous(), qpos.contiguous()
    out = torch.empty(B, H, hd)
    lib.paged_attn(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), table.data_ptr(), qpos.data_ptr(), out.data_ptr(),
                   B, H, Hkv, hd, table.shape[1], block_size, window or 0, hd ** -0.5, torch.get_num_threads())
    return out


# ----------------------------------------------------------------------------------------------------------
# per-row LoRA (BGMV)

BC = 32    # columns per block of a bank slot's B^T (kernels.c's BC)


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
    lib = _usable(x, y)
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


# ----------------------------------------------------------------------------------------------------------
# sampling

def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor):
    """logits [B, V]; temperature [B] (> 0); u [B] uniforms in [0, 1), or < 0 for greedy rows ->
    (tokens int64 [B], log_softmax(logits / T) at those tokens [B]), or None where the kernel does not apply.
    Sampled rows take the first token whose CDF reaches u (rftkit.sampling's reference rule)."""
    lib = _usable(logits)
    if lib is None or logits.dim() != 2:
        return None
    logits = logits.contiguous()
    B, V = logits.shape
    inv_t = (1.0 / temperature.float()).contiguous()
    u = u.float().contiguous()
    tok, logp = torch.empty(B, dtype=torch.int64), torch.empty(B)
    lib.sample_rows(logits.data_ptr(), inv_t.data_ptr(), u.data_ptr(), tok.data_ptr(), logp.data_ptr(), B, V,
                    torch.get_num_threads())
    return tok, logp


def softmax_rows(z: torch.Tensor, targets: torch.Tensor, inv_t: float, with_entropy: bool):
    """Log-softmax statistics of logits z [B, V] at temperature 1/inv_t, overwriting z with the unnormalised
    probabilities e = exp((z - max) * inv_t) (floored at exp(-86)): (log p(target) [B], log-normaliser [B],
    entropy [B] or None, row sums of e [B]); None where the kernel does not apply (the caller runs torch ops).
    targets int64 [B]."""
    lib = _usable(z)
    if lib is None or z.dim() != 2 or not z.is_contiguous() or targets.dtype != torch.int64:
        return None
    B, V = z.shape
    t = targets.contiguous()
    logp, lse, s = torch.empty(B), torch.empty(B), torch.empty(B)
    ent = torch.empty(B) if with_entropy else None
    lib.softmax_rows(z.data_ptr(), t.data_ptr(), float(inv_t), logp.data_ptr(), lse.data_ptr(),
                     0 if ent is None else ent.data_ptr(), s.data_ptr(), B, V, torch.get_num_threads())
    return logp, lse, ent, s
