"""Weight-only quantization: int8 per output channel, int4 in groups along the input, stored in low-bit form.

    quantize(model, bits=4, group_size=32)       # swaps every nn.Linear (and a tied embedding) in place
    y = QuantLinear.from_linear(linear, bits=8)(x)

int8:  w[n, k] = q[n, k] * s[n]                  q int8 [N, K], s [N]         (symmetric, absmax / 127)
int4:  w[n, k] = q[n, k] * d[n, g] + m[n, g]     q in 0..15, g = k // group  (min/max, llama.cpp's Q4_1)
       two 4-bit values per byte: in each run of 32 inputs, byte j holds k = j (low nibble) and k = j + 16.

The embedded SmolLM2 is a Q4_1 GGUF: its linear weights already sit on a 16-level grid per block of 32 with
exactly this min/max rule, so int4 with group_size=32 gives back that grid (the error is the fp16 rounding of
its scales), and the accuracy cost of int4 here is ~0 by construction. Larger groups or other models pay the
usual RTN error.

Matmul. torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` run a scalar loop on CPUs without
AVX-512 (measured on this AVX2 machine: 0.16x / 0.07x of fp32 `F.linear` for a 576x576 weight at M = 1), and
`torch.compile` of a dequantize-multiply-sum was 0.1x. So a small C kernel (AVX2 + FMA, compiled once with
the system `cc` into the cache, loaded with ctypes: no torch headers, ~0.3 s to build) does both cases:
- few rows (decode, M <= 8): the low-bit weights are read as they are and never become fp32 ones; the
  activations are rounded to int8 per block of 32 (scale absmax / 127) and the dot products run on integers
  (`maddubs`), llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 scheme; the int4 min term uses the exact sums of x.
  That rounding costs ~0.5% relative error on a layer's output (measured in tests/test_compress.py) and
  made decode 1.7-2.8x faster than the same kernel on fp32 activations. Layers sharing an input (q/k/v,
  gate/up: `linear_many`) run in one call, each with its unmerged LoRA added inside it; the call's arguments
  are a plan built once per group of layers (building them each call cost ~28 us, 120 calls a decode step).
- more rows (prefill, large batches: compute-bound): 8 MB of weight rows at a time are dequantized into one
  reused buffer, which stays in cache, and multiplied by MKL; the fp32 weight never exists whole.
With autograd recording (training LoRA on a quantized model) the layer multiplies the dequantized weight in
torch, exact fp32, the reference path the kernel is tested against. Without a compiler, or on a CPU without
AVX2, or on GPU, every call takes the reference path (`kernel_available()` says which).
"""
from __future__ import annotations

import ctypes
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from rftkit import kernels

BITS = (4, 8)
KERNEL_MAX_ROWS = 8            # the C kernel keeps one accumulator per row in registers
CHUNK_BYTES = 8 << 20          # more rows: weight rows dequantized this many bytes at a time (fits in L3)
_buffer: torch.Tensor | None = None


def _fusable(A: torch.Tensor, B: torch.Tensor, scale) -> bool:
    """Whether the kernel can add this LoRA in its call: fp32, contiguous, rank <= 64, outside autograd."""
    return A.shape[0] <= 64 and A.is_contiguous() and B.is_contiguous() and A.dtype == B.dtype == torch.float32 \
        and not (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad))


def _scratch(numel: int) -> torch.Tensor:
    """One float32 buffer reused by every quantized layer's many-row matmul (grown when needed)."""
    global _buffer
    if _buffer is None or _buffer.numel() < numel:
        _buffer = torch.empty(numel)
    return _buffer

# the decode kernels' source first: the block stack below calls their RMSNorm, RoPE and paged attention
_KERNEL_SRC = kernels._SRC + r"""
/* rows of x -> int8 per block of 32, llama.cpp's Q8 rule: d = absmax / 127, q = round(x / d);
   xd[m, b] = d, xs[m, b] = the exact float sum of the block */
static void quant_x8(const float* x, int M, int K, int8_t* xq, float* xd, float* xs) {
  int B = K / 32;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int m = 0; m < M; m++) for (int b = 0; b < B; b++) {
    const float* v = x + (long)m * K + b * 32;
    __m256 a0 = _mm256_loadu_ps(v), a1 = _mm256_loadu_ps(v + 8), a2 = _mm256_loadu_ps(v + 16), a3 = _mm256_loadu_ps(v + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a0), _mm256_andnot_ps(sign, a1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, a2), _mm256_andnot_ps(sign, a3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h)); h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float amax = _mm_cvtss_f32(h);
    float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
    xd[(long)m * B + b] = d;
    xs[(long)m * B + b] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    __m256 sc = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(a0, sc)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(a1, sc));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(a2, sc)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(a3, sc));
    i0 = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256((__m256i*)(xq + (long)m * K + b * 32), _mm256_permutevar8x32_epi32(i0, perm));
  }
}
/* one output row of an int8 layer (w = q * s) for the M quantized rows of x: out[m] = x8[m] . q */
static inline void row_i8(const int8_t* qr, float s, const int8_t* xq, const float* xd, float* out, int M, int K) {
  int B = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  if (M == 1) {             /* one row: four blocks a step into four named accumulators (see row_i4) */
#define I8_BLOCK(c, b) { \
      __m256i w = _mm256_loadu_si256((const __m256i*)(qr + (b) * 32)); \
      __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (b) * 32)); \
      __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w)), ones); \
      c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xd[b]), c); }
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 4 <= B; b += 4) { I8_BLOCK(c0, b) I8_BLOCK(c1, b + 1) I8_BLOCK(c2, b + 2) I8_BLOCK(c3, b + 3) }
    for (; b < B; b++) I8_BLOCK(c0, b)
#undef I8_BLOCK
    out[0] = hsum(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3))) * s;
    return;
  }
  __m256 acc[8];
  for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
  for (int b = 0; b < B; b++) {
    __m256i w = _mm256_loadu_si256((const __m256i*)(qr + b * 32));
    __m256i aw = _mm256_sign_epi8(w, w);                         /* |w| as unsigned, the sign moved to x */
    for (int m = 0; m < M; m++) {
      __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (long)m * K + b * 32));
      __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xd[(long)m * B + b]), acc[m]);
    }
  }
  for (int m = 0; m < M; m++) out[m] = hsum(acc[m]) * s;
}
/* one output row of an int4 layer (w = q * d[g] + mn[g], group = 32 * sub): sum_g d * (q . x8) + mn * sum(x),
   llama.cpp's Q4_1 x Q8_1; xg[m, g] = the exact sums of x per group */
static inline void row_i4(const uint8_t* qr, const float* dr, const float* mr, const int8_t* xq, const float* xd,
                          const float* xg, float* out, int M, int K, int sub) {
  int B = K / 32, G = K / (32 * sub);
  const __m128i m15 = _mm_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[8];
  if (M == 1) {             /* one row: four blocks a step into four named accumulators (an array indexed by
                               b & 3 was kept in memory: each FMA then waited on a store and a load) */
#define I4_BLOCK(c, b) { \
      __m128i qb = _mm_loadu_si128((const __m128i*)(qr + (b) * 16)); \
      __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qb, 4), m15), _mm_and_si128(qb, m15)); \
      __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i*)(xq + (b) * 32))), ones); \
      c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dr[sub == 1 ? (b) : (b) / sub] * xd[b]), c); }
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 4 <= B; b += 4) { I4_BLOCK(c0, b) I4_BLOCK(c1, b + 1) I4_BLOCK(c2, b + 2) I4_BLOCK(c3, b + 3) }
    for (; b < B; b++) I4_BLOCK(c0, b)
#undef I4_BLOCK
    acc[0] = _mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3));
  } else {
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int b = 0; b < B; b++) {
      __m128i qb = _mm_loadu_si128((const __m128i*)(qr + b * 16));
      /* low half: k = 0..15 of the block (low nibbles), high half: k = 16..31 */
      __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qb, 4), m15), _mm_and_si128(qb, m15));
      float dw = dr[sub == 1 ? b : b / sub];
      for (int m = 0; m < M; m++) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (long)m * K + b * 32));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xd[(long)m * B + b]), acc[m]);
      }
    }
  }
  for (int m = 0; m < M; m++) {
    float t = hsum(acc[m]);
    for (int g = 0; g < G; g++) t += mr[g] * xg[(long)m * G + g];
    out[m] = t;
  }
}
/* Up to 4 quantized layers of the same bits, group and in_features sharing x [M, K] (q/k/v, gate/up; or one):
   x is rounded to int8 once and every layer's rows run in one parallel loop. Per layer j: y_j[M, N_j] =
   x W_j^T (+ bias_j) (+ scale_j * (x A_j^T) B_j^T, an unmerged LoRA of rank r_j <= 64, r_j = 0 for none).
   Addresses are 0 where absent; for int8 layers d holds the row scales and mn is unused. M <= 8, K % 32 == 0. */
typedef struct { int64_t q, d, mn, bias, A, B, y; float scale; int32_t r, N; } qlayer;
#define QRUN 16
void qlinear_many(const float* x, int M, int K, int bits, int sub, int nl, const qlayer* L, int nt) {
  int B = K / 32, G = K / (32 * sub);
  int8_t* xq = (int8_t*)malloc((size_t)M * K + 64);
  float* xd = (float*)malloc(sizeof(float) * (2 * (size_t)M * B + (size_t)M * G));
  float* xs = xd + (size_t)M * B;
  float* xg = xs + (size_t)M * B;
  float t[4 * 8 * 64];                      /* t[j, m, :] = scale_j * x[m] A_j^T */
  quant_x8(x, M, K, xq, xd, xs);
  for (int m = 0; m < M; m++) for (int g = 0; g < G; g++) {
    float s = 0.0f;
    for (int i = 0; i < sub; i++) s += xs[(long)m * B + g * sub + i];
    xg[(long)m * G + g] = s;
  }
  long total = 0, start[5];
  for (int j = 0; j < nl; j++) {
    start[j] = total; total += L[j].N;
    for (int m = 0; m < M; m++) for (int i = 0; i < L[j].r; i++)
      t[(j * 8 + m) * 64 + i] = dot((const float*)L[j].A + (long)i * K, x + (long)m * K, K) * L[j].scale;
  }
  start[nl] = total;
  long runs = (total + QRUN - 1) / QRUN;
  #pragma omp parallel for schedule(guided, 1) num_threads(nt)
  for (long c = 0; c < runs; c++) {
    long r0 = c * QRUN, r1 = r0 + QRUN < total ? r0 + QRUN : total;
    for (int j = 0; j < nl; j++) {
      long a = r0 > start[j] ? r0 : start[j], e = r1 < start[j + 1] ? r1 : start[j + 1];
      const float* bj = (const float*)L[j].bias;
      const float* Bj = (const float*)L[j].B;
      float* yj = (float*)L[j].y;
      int rj = L[j].r, Nj = L[j].N;
      for (long n = a - start[j]; n < e - start[j]; n++) {
        float out[8];
        if (bits == 8)
          row_i8((const int8_t*)L[j].q + n * K, ((const float*)L[j].d)[n], xq, xd, out, M, K);
        else
          row_i4((const uint8_t*)L[j].q + n * K / 2, (const float*)L[j].d + n * G, (const float*)L[j].mn + n * G,
                 xq, xd, xg, out, M, K, sub);
        for (int m = 0; m < M; m++) {
          float v = out[m] + (bj ? bj[n] : 0.0f);
          if (rj) {
            const float* bn = Bj + n * rj;
            const float* tm = t + (j * 8 + m) * 64;
            __m256 s = _mm256_setzero_ps();
            int i = 0;
            for (; i + 8 <= rj; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(bn + i), _mm256_loadu_ps(tm + i), s);
            v += hsum(s);
            for (; i < rj; i++) v += bn[i] * tm[i];
          }
          yj[(long)m * Nj + n] = v;
        }
      }
    }
  }
  free(xq); free(xd);
}
/* One decoder block of a quantized model for decode_layers_q (mirrored by _Block in Python): its norms' weights,
   its paged cache pools, and its seven layers as qlinear_many takes them (output addresses set per call). */
typedef struct {
  int64_t ln1, ln2, kc, vc;
  qlayer qkv[3], o, gu[2], down;
  int32_t window, pad;
} qblock;

/* rftkit.kernels' decode_layers for quantized blocks (every layer of one bits and group, each with its
   unmerged LoRA or none): nl blocks for M <= 8 decode rows over a paged cache, in place on x [M, D]; one call
   for the whole stack instead of ~25 torch ops and kernel calls per block. Arguments as decode_layers'. */
void decode_layers_q(float* x, qblock* L, int nl, int M, int D, int H, int Hkv, int hd, int F, int bits, int sub,
                     const float* cs, const float* sn, const int64_t* table, int nbmax, const int64_t* qpos,
                     const int64_t* wrow, int bs, float eps, float scale, float* ws, int nt) {
  const long NQ = (long)H * hd, NK = (long)Hkv * hd;
  float *h = ws, *q0 = h + M * D, *k0 = q0 + M * NQ, *v0 = k0 + M * NK, *q1 = v0 + M * NK,
        *att = q1 + M * NQ, *g = att + M * NQ, *u = g + (long)M * F, *t = u + (long)M * F;
  for (int l = 0; l < nl; l++) {
    qblock* P = L + l;
    float *kc = (float*)P->kc, *vc = (float*)P->vc;
    rms_norm(x, (const float*)P->ln1, h, M, D, eps);
    P->qkv[0].y = (int64_t)q0; P->qkv[1].y = (int64_t)k0; P->qkv[2].y = (int64_t)v0;
    qlinear_many(h, M, D, bits, sub, 3, P->qkv, nt);
    decode_attend(q0, k0, v0, q1, att, kc, vc, M, H, Hkv, hd, cs, sn, table, nbmax, qpos, wrow, bs, P->window,
                  scale, nt);
    P->o.y = (int64_t)t;
    qlinear_many(att, M, (int)NQ, bits, sub, 1, &P->o, nt);
    for (long i = 0; i < (long)M * D; i++) x[i] += t[i];
    rms_norm(x, (const float*)P->ln2, h, M, D, eps);
    P->gu[0].y = (int64_t)g; P->gu[1].y = (int64_t)u;
    qlinear_many(h, M, D, bits, sub, 2, P->gu, nt);
    for (long i = 0; i < (long)M * F; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    P->down.y = (int64_t)t;
    qlinear_many(g, M, F, bits, sub, 1, &P->down, nt);
    for (long i = 0; i < (long)M * D; i++) x[i] += t[i];
  }
}
/* rows [n0, n1) of the dequantized weight into w [(n1 - n0), K] (prefill and large batches: then MKL) */
void dequant_i4(const uint8_t* q, const float* d, const float* mn, float* w, int n0, int n1, int K, int sub, int nt) {
  int B = K / 32, G = K / (32 * sub);
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int n = n0; n < n1; n++) {
    const uint8_t* qr = q + (long)n * K / 2;
    float* wr = w + (long)(n - n0) * K;
    const __m128i m15 = _mm_set1_epi8(15);
    for (int b = 0; b < B; b++) {
      __m128i qb = _mm_loadu_si128((const __m128i*)(qr + b * 16));
      __m128i lo = _mm_and_si128(qb, m15), hi = _mm_and_si128(_mm_srli_epi16(qb, 4), m15);
      int g = sub == 1 ? b : b / sub;
      __m256 dd = _mm256_set1_ps(d[(long)n * G + g]), mm = _mm256_set1_ps(mn[(long)n * G + g]);
      float* o = wr + b * 32;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dd, mm));
      _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dd, mm));
      _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dd, mm));
      _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dd, mm));
    }
  }
}
void dequant_i8(const int8_t* q, const float* s, float* w, int n0, int n1, int K, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int n = n0; n < n1; n++) {
    const int8_t* qr = q + (long)n * K;
    float* wr = w + (long)(n - n0) * K;
    __m256 sc = _mm256_set1_ps(s[n]);
    for (int k = 0; k < K; k += 8)
      _mm256_storeu_ps(wr + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qr + k)))), sc));
  }
}
"""

_lib = None
_lib_error: str | None = None


def _load_kernel():
    """Build (once, into the cache) and load the C kernel; None when this machine cannot."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    from rftkit.kernels import build_library
    lib, _lib_error = build_library(_KERNEL_SRC, "qgemm", "int8/int4 kernel")
    if lib is None:
        return None
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.qlinear_many.argtypes = [P, I, I, I, I, I, P, I]
    lib.dequant_i4.argtypes = [P, P, P, P, I, I, I, I, I]
    lib.dequant_i8.argtypes = [P, P, P, I, I, I, I]
    Fl = ctypes.c_float
    lib.decode_layers_q.argtypes = [P, P, I, I, I, I, I, I, I, I, I, P, P, P, I, P, P, I, Fl, Fl, P, I]
    _lib = lib
    return lib


def kernel_available() -> bool:
    return _load_kernel() is not None


def kernel_status() -> str:
    return "avx2 C kernel" if kernel_available() else f"reference only ({_lib_error})"


# ----------------------------------------------------------------------------------------------------------
# quantize / dequantize a matrix

def check_bits(bits: int, group_size: int, in_features: int | None = None) -> None:
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits!r}: weight-only quantization supports {BITS}")
    if bits == 4:
        if group_size < 32 or group_size % 32:
            raise ValueError(f"int4 group_size must be a positive multiple of 32, got {group_size}")
        if in_features is not None and in_features % group_size:
            raise ValueError(f"int4 group_size {group_size} does not divide in_features={in_features}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], s [N]) with w ~ q * s[:, None]."""
    s = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s.float()


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K/2], d [N, G], m [N, G]) with w ~ q * d + m, q in 0..15 per group."""
    N, K = w.shape
    check_bits(4, group_size, K)
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    d = (hi - lo) / 15
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((wg - lo[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(N, K)), d, lo


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> [N, K/2]: per run of 32, byte j = q[j] | q[j + 16] << 4."""
    N, K = q.shape
    b = q.reshape(N, K // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    N, half = packed.shape
    b = packed.reshape(N, half // 16, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(N, half * 2)


# ----------------------------------------------------------------------------------------------------------
# modules

class QuantLinear(nn.Module):
    """A linear layer whose weight is stored as int8 or int4 (+ scales). `weight` is a read-only dequantized
    view (for code that asks for a dtype or device, or multiplies by hand); LoRA wraps this module unmerged
    and hands it its A, B and scale (`forward(x, lora=...)`, `fuses_lora`)."""

    fuses_lora = True

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int = 32,
                 bias: bool = False, device=None):
        super().__init__()
        check_bits(bits, group_size, in_features)
        if in_features % 32:
            raise ValueError(f"quantized linears need in_features divisible by 32, got {in_features}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(N, device=device))
        else:
            G = K // group_size
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(N, G, device=device))
            self.register_buffer("mins", torch.zeros(N, G, device=device))
        self.bias = nn.Parameter(torch.zeros(N, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 32) -> "QuantLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, w.device)
        m.set_weight(w)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        if self.bits == 8:
            self.qweight, self.scales = quantize_int8(w.float())
        else:
            self.qweight, self.scales, self.mins = quantize_int4(w.float(), self.group_size)

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scales[:, None]
        N, K, g = self.out_features, self.in_features, self.group_size
        q = unpack_int4(self.qweight).float().reshape(N, K // g, g)
        return (q * self.scales[..., None] + self.mins[..., None]).reshape(N, K)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    @weight.setter
    def weight(self, value):
        raise ValueError("a QuantLinear's weight is read-only: keep LoRA unmerged on a quantized model, or merge "
                         "before quantizing")

    def forward(self, x: torch.Tensor, lora: tuple | None = None) -> torch.Tensor:
        """y = x W^T (+ bias); `lora` = (A [r, K], B [N, r], scale) adds scale * x A^T B^T, in the same kernel
        call at decode rows (LoRALinear passes it: one call instead of five torch ops)."""
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        lib = self._kernel_for(x2)
        if lib is None:                                  # reference path; autograd keeps the weight it used
            y = F.linear(x2, self.dequantize().to(x.dtype), self.bias)
        elif x2.shape[0] > KERNEL_MAX_ROWS:
            y = self._dequantized_matmul(lib, x2.contiguous(), torch.get_num_threads())
            if self.bias is not None:
                y += self.bias
        else:
            fused = lora is not None and _fusable(*lora)
            y = _decode(lib, x2.contiguous(), [(self, lora if fused else None)])[0]
            lora = None if fused else lora
        if lora is not None:
            y = y + F.linear(F.linear(x2, lora[0]), lora[1]) * lora[2]
        return y.reshape(*lead, self.out_features)

    def _kernel_for(self, x2: torch.Tensor):
        """The C kernel library when it may run on x2 [M, K] (CPU fp32, outside autograd), else None."""
        if x2.device.type != "cpu" or x2.dtype != torch.float32 or x2.shape[0] == 0 \
                or (torch.is_grad_enabled() and x2.requires_grad):
            return None
        return _load_kernel()

    def _dequantized_matmul(self, lib, x2: torch.Tensor, nt: int) -> torch.Tensor:
        """Many rows: dequantize CHUNK_BYTES of weight rows at a time into one reused buffer (it stays in
        cache) and multiply with MKL; the fp32 weight never exists whole."""
        N, K = self.out_features, self.in_features
        rows = max(1, min(N, CHUNK_BYTES // (4 * K)))
        buf = _scratch(rows * K)
        outs = []
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            w = buf[:(n1 - n0) * K].view(n1 - n0, K)
            if self.bits == 8:
                lib.dequant_i8(self.qweight.data_ptr(), self.scales.data_ptr(), w.data_ptr(), n0, n1, K, nt)
            else:
                lib.dequant_i4(self.qweight.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(), w.data_ptr(),
                               n0, n1, K, self.group_size // 32, nt)
            outs.append(x2 @ w.T)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"


class _Layer(ctypes.Structure):
    """One layer of a qlinear_many call (the C struct qlayer): addresses, 0 where absent."""
    _fields_ = [("q", ctypes.c_int64), ("d", ctypes.c_int64), ("mn", ctypes.c_int64), ("bias", ctypes.c_int64),
                ("A", ctypes.c_int64), ("B", ctypes.c_int64), ("y", ctypes.c_int64), ("scale", ctypes.c_float),
                ("r", ctypes.c_int32), ("N", ctypes.c_int32)]


_plans: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class _Block(ctypes.Structure):
    """One decoder block of a decode_layers_q call (the C struct qblock)."""
    _fields_ = [("ln1", ctypes.c_int64), ("ln2", ctypes.c_int64), ("kc", ctypes.c_int64), ("vc", ctypes.c_int64),
                ("qkv", _Layer * 3), ("o", _Layer), ("gu", _Layer * 2), ("down", _Layer),
                ("window", ctypes.c_int32), ("pad", ctypes.c_int32)]


def fill_layer(L: _Layer, m: "QuantLinear", lora: tuple | None) -> None:
    """Point L at QuantLinear m's tensors and its fused LoRA (A, B, scale) or none (the output is set per call)."""
    q, d, mn, bias = _tensors(m)
    L.q, L.d, L.mn = q.data_ptr(), d.data_ptr(), mn.data_ptr() if m.bits == 4 else 0
    L.bias = bias.data_ptr() if bias is not None else 0
    L.N = m.out_features
    L.A = L.B = L.r = 0
    L.scale = 0.0
    if lora:
        L.A, L.B, L.scale, L.r = lora[0].data_ptr(), lora[1].data_ptr(), float(lora[2]), lora[0].shape[0]


def decode_layers(x: torch.Tensor, blocks, bits: int, group_size: int, n_heads: int, n_kv: int, head_dim: int,
                  ffn_dim: int, cos: torch.Tensor, sin: torch.Tensor, table: torch.Tensor, qpos: torch.Tensor,
                  write: torch.Tensor, block_size: int, eps: float) -> bool:
    """rftkit.kernels.decode_layers for quantized blocks: `blocks` a _Block array the caller built (and keeps),
    every layer of `bits` / `group_size`. x [M, D] in place, M <= KERNEL_MAX_ROWS. False where the kernel
    does not apply (the caller runs its blocks)."""
    M, D = x.shape
    if not 0 < M <= KERNEL_MAX_ROWS or not x.is_contiguous() or x.dtype != torch.float32 or x.device.type != "cpu" \
            or head_dim % 8 or head_dim > kernels.ATTN_MAX_HEAD_DIM or n_heads // n_kv > kernels.ATTN_MAX_GROUP:
        return False
    lib = _load_kernel()
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


def _tensors(m: "QuantLinear") -> tuple:
    b = m._buffers
    return b["qweight"], b["scales"], b.get("mins"), m._parameters.get("bias")


def _plan(parts: list[tuple]):
    """The qlinear_many arguments for these (QuantLinear, lora) parts, built once per group of layers and kept
    (weakly, on the first layer) while every tensor and LoRA scale it was built from is still the one in use."""
    tens = [(_tensors(m), lo) for m, lo in parts]
    key = tuple(id(t) for ts, lo in tens for t in (*ts, *(lo[:2] if lo else ()))) \
        + tuple(float(lo[2]) if lo else None for _, lo in tens)
    groups = _plans.get(parts[0][0])
    if groups is None:
        groups = _plans[parts[0][0]] = {}
    ids = tuple(id(m) for m, _ in parts)
    plan = groups.get(ids)
    if plan is not None and plan[0] == key:
        return plan[1]
    layers = (_Layer * len(parts))()
    for L, (m, lo) in zip(layers, parts):
        fill_layer(L, m, lo)
    groups[ids] = (key, (layers, tens))              # tens keeps the tensors alive, so their ids stay theirs
    return layers, tens


def _decode(lib, x2: torch.Tensor, parts: list[tuple]) -> list[torch.Tensor]:
    """Decode rows (M <= KERNEL_MAX_ROWS): [x2 W^T (+ bias) (+ LoRA) for (QuantLinear, lora or None) in parts],
    up to 4 layers of one bits / group / in_features in one call of the kernel (x2 rounded to int8 once). The
    plan's output addresses are set here: one model is driven by one thread at a time (the engine's)."""
    M, K = x2.shape
    first = parts[0][0]
    layers, _ = _plan(parts)
    ys = []
    for L, (m, _) in zip(layers, parts):
        y = torch.empty(M, m.out_features)
        L.y = y.data_ptr()
        ys.append(y)
    lib.qlinear_many(x2.data_ptr(), M, K, first.bits, first.group_size // 32 if first.bits == 4 else 1,
                     len(parts), ctypes.addressof(layers), torch.get_num_threads())
    return ys


def _quant_part(m: nn.Module) -> tuple | None:
    """(QuantLinear, fusable LoRA or None) for a QuantLinear or a LoRALinear on one; None for anything else."""
    if isinstance(m, QuantLinear):
        return m, None
    parts = m.quant_parts() if hasattr(m, "quant_parts") else None
    if parts is None or (parts[1] is not None and not _fusable(*parts[1])):
        return None
    return parts


def linear_many(mods: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor] | None:
    """[m(x) for m in mods] in one kernel call (x rounded to int8 once, one parallel loop) when every module is a
    QuantLinear, or a LoRALinear on one, of one bits / group / in_features, at decode rows: q/k/v and gate/up of
    a quantized model. None where that does not apply (the caller runs them one by one)."""
    if not 0 < len(mods) <= 4:
        return None
    parts = [_quant_part(m) for m in mods]
    if any(p is None for p in parts):
        return None
    first = parts[0][0]
    if any((m.bits, m.group_size, m.in_features) != (first.bits, first.group_size, first.in_features)
           for m, _ in parts):
        return None
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    lib = first._kernel_for(x2) if x2.shape[0] <= KERNEL_MAX_ROWS else None
    if lib is None:
        return None
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in _decode(lib, x2.contiguous(), parts)]


class QuantEmbedding(nn.Module):
    """int8 embedding, one scale per row; with tied embeddings the lm_head QuantLinear shares its tensors."""

    def __init__(self, num_embeddings: int, dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, device=device))

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * self.scales[ids][..., None]


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def quantize(model: nn.Module, bits: int = 8, group_size: int = 32, head_bits: int | None = 8,
             skip: tuple[str, ...] = ()) -> dict:
    """Swap every nn.Linear for a QuantLinear of `bits`; the lm_head (and a tied embedding, int8 only) gets
    `head_bits` (None = left fp32). Returns {module path: {"kind": "quant", "bits", "group_size"}}."""
    check_bits(bits, group_size)
    if head_bits is not None:
        check_bits(head_bits, group_size)
    record = {}
    tied = model.cfg.tie_embeddings
    for path, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear) or path in skip or path == "lm_head":
            continue
        _swap(model, path, QuantLinear.from_linear(m, bits, group_size))
        record[path] = {"kind": "quant", "bits": bits, "group_size": group_size}
    if head_bits is not None:
        head = QuantLinear.from_linear(model.lm_head, head_bits, group_size)
        model.lm_head = head
        record["lm_head"] = {"kind": "quant", "bits": head_bits, "group_size": group_size}
        if tied and head_bits == 8:           # one int8 matrix serves the embedding and the lm_head
            emb = QuantEmbedding(head.out_features, head.in_features, head.qweight.device)
            emb.qweight, emb.scales = head.qweight, head.scales
            model.model.embed_tokens = emb
            record["model.embed_tokens"] = {"kind": "quant_embedding", "bits": 8}
    return record
