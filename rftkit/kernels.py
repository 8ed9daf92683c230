"""Hand-written CPU kernels for the decode path and the training log-probs (fp32, AVX2 + FMA, OpenMP), each with its
torch reference.

    y = linear(x, weight, bias)                    # [.., K] -> [.., N]; a GEMV kernel for <= 8 rows
    q, k, v = linear_many(x, [Wq, Wk, Wv], [None] * 3)   # several weights of one input, one call
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
a decode step are ~7 torch ops each per layer, pure dispatch overhead at one row. The kernels are C built
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


# On a CPU with AVX-512 MKL's GEMM runs 16 lanes wide and beats this 8-lane kernel from 2 rows up (measured on
# a 2-core Xeon with AVX-512 and AMX, weights out of cache: 1.1-1.4x at 2-32 rows of K = 576, N = 192-1536;
# one row ties), except at the vocabulary projection, where MKL has a slow stretch of 4-12 rows (N = 49152:
# the kernel 7.7-10.2 ms against MKL's 9.4-20.4 ms; at 16+ rows MKL wins, 1.7x at 48). There the kernel
# takes one row, and 2-12 rows of very wide outputs. MKL's wide paths are Intel's: on a 2-core AMD EPYC with
# AVX-512 the kernel beat MKL at every row count (1-32 rows, 30 layers of SmolLM2 shapes: 14 vs 28 ms at one
# row, 29 vs 43 ms at 16; the 49,152-wide head 8.9 vs 14.0 ms at 16 rows), so only Intel CPUs count as wide.
_wide_blas: bool | None = None


def _gemv_rows_ok(M: int, K: int, N: int) -> bool:
    if not 0 < M <= (GEMV_MAX_ROWS if K <= 1024 else GEMV_MAX_ROWS_LONG_K):
        return False
    if _wide_blas is None:
        _load()
    return not _wide_blas or M == 1 or (N >= 16384 and M <= 12)
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

_SRC = C_HELPERS + r"""
#include <string.h>

/* rows [n0, n1) of y[M, N] = x[M, K] @ W[N, K]^T (+ bias), R weight rows at a time; M, R compile-time, M * R <= 12.
   Each k step loads the M x vectors once and each of the R weight vectors once for M * R FMAs. Every output is
   one 8-lane FMA chain over K and a horizontal sum, whatever M and R are: a row's result does not depend on
   which rows share its call (seeded requests stay batch-invariant). */
static inline void gemv_tile(const float* x, const float* W, const float* bias, float* y,
                             long n0, long n1, int N, int K, const int M, const int R) {
  long n = n0;
  for (; n + R <= n1; n += R) {
    __m256 acc[12];
    for (int i = 0; i < M * R; i++) acc[i] = _mm256_setzero_ps();
    const float* w = W + n * K;
    for (int k = 0; k < K; k += 8) {
      __m256 xv[3];
      for (int m = 0; m < M; m++) xv[m] = _mm256_loadu_ps(x + (long)m * K + k);
      for (int r = 0; r < R; r++) {
        __m256 wv = _mm256_loadu_ps(w + (long)r * K + k);
        for (int m = 0; m < M; m++) acc[m * R + r] = _mm256_fmadd_ps(xv[m], wv, acc[m * R + r]);
      }
    }
    for (int m = 0; m < M; m++)
      for (int r = 0; r < R; r++) y[(long)m * N + n + r] = hsum(acc[m * R + r]) + (bias ? bias[n + r] : 0.f);
  }
  for (; n < n1; n++)
    for (int m = 0; m < M; m++) y[(long)m * N + n] = dot(x + (long)m * K, W + n * K, K) + (bias ? bias[n] : 0.f);
}

/* rows [n0, n1) of weight w into y, M picked at run time: x rows three at a time against four weight rows
   (7 loads per 12 FMAs, where eight rows against one took 9 per 8 and ran load-bound), the last one or two,
   or four as two pairs, against four; the weight run is in L1/L2 after the first pass (16 rows of K = 1536 is
   96 KB) */
static void gemv_rows(const float* x, const float* w, const float* bias, float* y, long n0, long n1, int N, int K,
                      int M) {
  for (int m0 = 0; m0 < M;) {
    const float* xb = x + (long)m0 * K;
    float* yb = y + (long)m0 * N;
    int left = M - m0;
    if (left == 1) { gemv_tile(xb, w, bias, yb, n0, n1, N, K, 1, 4); m0 += 1; }
    else if (left == 2 || left == 4) { gemv_tile(xb, w, bias, yb, n0, n1, N, K, 2, 4); m0 += 2; }
    else { gemv_tile(xb, w, bias, yb, n0, n1, N, K, 3, 4); m0 += 3; }
  }
}

/* Several GEMVs of the same x (q, k, v; gate, up) in one parallel region: weight j is W[j] [N[j], K] with
   bias b[j] (or 0) into y[j] [M, N[j]]; K % 8 == 0, M >= 1 (8 at a time), nw <= 4. The concatenated rows are dealt in
   runs of 16, guided: long contiguous stretches first, short ones last, so the threads finish together even
   when the OS holds one of them up. */
#define RUN 16
void gemv_many(const float* x, const int64_t* W, const int64_t* b, const int64_t* y, const int32_t* N, int nw,
               int M, int K, int nt) {
  long total = 0, start[5];
  for (int j = 0; j < nw; j++) { start[j] = total; total += N[j]; }
  start[nw] = total;
  long runs = (total + RUN - 1) / RUN;
  #pragma omp parallel for schedule(guided, 1) num_threads(nt)
  for (long c = 0; c < runs; c++) {
    long r0 = c * RUN, r1 = r0 + RUN < total ? r0 + RUN : total;
    for (int j = 0; j < nw; j++) {
      long a = r0 > start[j] ? r0 : start[j], e = r1 < start[j + 1] ? r1 : start[j + 1];
      if (a < e)
        gemv_rows(x, (const float*)W[j], (const float*)b[j], (float*)y[j], a - start[j], e - start[j], N[j], K, M);
    }
  }
}

/* y[M, N] = x[M, K] @ W[N, K]^T + bias (bias may be 0) */
void gemv(const float* x, const float* W, const float* bias, float* y, int M, int N, int K, int nt) {
  int64_t w = (int64_t)W, bb = (int64_t)bias, yy = (int64_t)y;
  int32_t n = N;
  gemv_many(x, &w, &bb, &yy, &n, 1, M, K, nt);
}

/* exp(x) for 8 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2 (Cephes' polynomial, ~1 ulp); -inf -> 0 */
static inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* One query per row over a paged cache, read in place. q [B, H, hd]; kc, vc [slots, Hkv, hd] (token-major
   pool: cache row of position t of batch row b = table[b, t / bs] * bs + t % bs); qpos [B]: the query's
   position, keys t in [max(0, qpos - window + 1), qpos] (window 0 = all); out [B, H, hd]. Online softmax
   over chunks of 64 keys; one task per (row, kv head), its G = H / Hkv query heads share each key and value
   load. hd % 8 == 0, hd <= 256, G <= 16. */
#define CH 64
void paged_attn(const float* q, const float* kc, const float* vc, const int64_t* table, const int64_t* qpos,
                float* out, int B, int H, int Hkv, int hd, int nbmax, int bs, int window, float scale, int nt) {
  const int G = H / Hkv, D8 = hd / 8;
  const long row = (long)Hkv * hd;                       /* floats between consecutive tokens of the pool */
  #pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int task = 0; task < B * Hkv; task++) {
    int b = task / Hkv, h = task % Hkv;
    long p = qpos[b];
    float* o = out + ((long)b * H + (long)h * G) * hd;
    if (p < 0) { for (int i = 0; i < G * hd; i++) o[i] = 0.f; continue; }
    long t0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const float* qh = q + ((long)b * H + (long)h * G) * hd;
    const int64_t* tb = table + (long)b * nbmax;
    float mx[16], l[16], sc[16][CH] __attribute__((aligned(32)));
    float acc[16][256] __attribute__((aligned(32)));
    const float* kp[CH]; const float* vp[CH];
    for (int g = 0; g < G; g++) { mx[g] = -INFINITY; l[g] = 0.f; for (int d = 0; d < hd; d++) acc[g][d] = 0.f; }
    long blk = t0 / bs, off = t0 % bs;
    for (long c0 = t0; c0 <= p; c0 += CH) {
      int n = p - c0 + 1 < CH ? (int)(p - c0 + 1) : CH;
      for (int j = 0; j < n; j++) {                       /* the chunk's key/value rows, walking the blocks */
        long r = (tb[blk] * bs + off) * row + (long)h * hd;
        kp[j] = kc + r; vp[j] = vc + r;
        if (++off == bs) { off = 0; blk++; }
      }
      for (int j = 0; j < n; j++)
        for (int g = 0; g < G; g++) sc[g][j] = dot(qh + (long)g * hd, kp[j], hd) * scale;
      for (int g = 0; g < G; g++) {
        float cm = mx[g];
        for (int j = 0; j < n; j++) cm = sc[g][j] > cm ? sc[g][j] : cm;
        float f = mx[g] == -INFINITY ? 0.f : expf(mx[g] - cm);
        mx[g] = cm;
        __m256 cv = _mm256_set1_ps(cm), sum = _mm256_setzero_ps();
        int j = 0;
        for (; j + 8 <= n; j += 8) {
          __m256 e = exp256(_mm256_sub_ps(_mm256_load_ps(&sc[g][j]), cv));
          _mm256_store_ps(&sc[g][j], e);
          sum = _mm256_add_ps(sum, e);
        }
        float ls = hsum(sum);
        for (; j < n; j++) { sc[g][j] = expf(sc[g][j] - cm); ls += sc[g][j]; }
        l[g] = l[g] * f + ls;
        if (f != 1.f) { __m256 fv = _mm256_set1_ps(f); for (int d = 0; d < D8; d++) _mm256_store_ps(&acc[g][d * 8], _mm256_mul_ps(_mm256_load_ps(&acc[g][d * 8]), fv)); }
      }
      for (int d = 0; d < D8; d++) {                      /* acc[g] += p[g, j] * v_j, 4 heads per pass */
        for (int g0 = 0; g0 < G; g0 += 4) {
          int gn = G - g0 < 4 ? G - g0 : 4;
          __m256 a0 = _mm256_load_ps(&acc[g0][d * 8]);
          __m256 a1 = gn > 1 ? _mm256_load_ps(&acc[g0 + 1][d * 8]) : a0;
          __m256 a2 = gn > 2 ? _mm256_load_ps(&acc[g0 + 2][d * 8]) : a0;
          __m256 a3 = gn > 3 ? _mm256_load_ps(&acc[g0 + 3][d * 8]) : a0;
          for (int j = 0; j < n; j++) {
            __m256 v = _mm256_loadu_ps(vp[j] + d * 8);
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(sc[g0][j]), v, a0);
            if (gn > 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(sc[g0 + 1][j]), v, a1);
            if (gn > 2) a2 = _mm256_fmadd_ps(_mm256_set1_ps(sc[g0 + 2][j]), v, a2);
            if (gn > 3) a3 = _mm256_fmadd_ps(_mm256_set1_ps(sc[g0 + 3][j]), v, a3);
          }
          _mm256_store_ps(&acc[g0][d * 8], a0);
          if (gn > 1) _mm256_store_ps(&acc[g0 + 1][d * 8], a1);
          if (gn > 2) _mm256_store_ps(&acc[g0 + 2][d * 8], a2);
          if (gn > 3) _mm256_store_ps(&acc[g0 + 3][d * 8], a3);
        }
      }
    }
    for (int g = 0; g < G; g++) {
      __m256 inv = _mm256_set1_ps(1.f / l[g]);
      for (int d = 0; d < D8; d++) _mm256_storeu_ps(o + (long)g * hd + d * 8, _mm256_mul_ps(_mm256_load_ps(&acc[g][d * 8]), inv));
    }
  }
}

/* Punica BGMV over slots: y[m] += s[k] * B_k (A_k x[m]) with k = rows[m], for rows whose slot has weights
   (A[k] != 0). x [M, K] (K % 8 == 0), y [M, N]; A_k [R_k, K]; B_k [N, R_k], or its transpose [R_k, N] where Tr[k] (then the
   expand is R_k axpys along N, vectorised; the [N, R_k] layout of live tensors costs a dot per output);
   tmp [M, Rmax] scratch. */
void lora_bgmv(const float* x, float* y, const int32_t* rows, const int64_t* A, const int64_t* Bw,
               const int32_t* Tr, const int32_t* R, const float* s, float* tmp, int M, int K, int N, int Rmax,
               int nt) {
  #pragma omp parallel num_threads(nt)
  {
    #pragma omp for schedule(static)
    for (int m = 0; m < M; m++) {                         /* shrink: tmp[m] = s * A_k x[m], 4 rows of A a pass */
      int k = rows[m];
      float* t = tmp + (long)m * Rmax;
      if (!A[k]) continue;
      gemv_tile(x + (long)m * K, (const float*)A[k], 0, t, 0, R[k], R[k], K, 1, 4);
      for (int r = 0; r < R[k]; r++) t[r] *= s[k];
    }
    /* expand: tasks of (row, run of 256 outputs) */
    const int NC = 256, nc = (N + NC - 1) / NC;
    #pragma omp for schedule(static)
    for (long i = 0; i < (long)M * nc; i++) {
      int m = i / nc, k = rows[m];
      if (!A[k]) continue;
      int n0 = (i % nc) * NC, n1 = n0 + NC < N ? n0 + NC : N, Rk = R[k];
      const float* t = tmp + (long)m * Rmax;
      float* yr = y + (long)m * N;
      const float* b = (const float*)Bw[k];
      if (Tr[k]) {                                        /* b [R, N] */
        int n = n0;
        for (; n + 32 <= n1; n += 32) {                   /* 4 vectors per broadcast of tmp[r] */
          __m256 a0 = _mm256_loadu_ps(yr + n), a1 = _mm256_loadu_ps(yr + n + 8);
          __m256 a2 = _mm256_loadu_ps(yr + n + 16), a3 = _mm256_loadu_ps(yr + n + 24);
          for (int r = 0; r < Rk; r++) {
            const float* br = b + (long)r * N + n;
            __m256 tv = _mm256_set1_ps(t[r]);
            a0 = _mm256_fmadd_ps(tv, _mm256_loadu_ps(br), a0);
            a1 = _mm256_fmadd_ps(tv, _mm256_loadu_ps(br + 8), a1);
            a2 = _mm256_fmadd_ps(tv, _mm256_loadu_ps(br + 16), a2);
            a3 = _mm256_fmadd_ps(tv, _mm256_loadu_ps(br + 24), a3);
          }
          _mm256_storeu_ps(yr + n, a0); _mm256_storeu_ps(yr + n + 8, a1);
          _mm256_storeu_ps(yr + n + 16, a2); _mm256_storeu_ps(yr + n + 24, a3);
        }
        for (; n + 8 <= n1; n += 8) {
          __m256 a = _mm256_loadu_ps(yr + n);
          for (int r = 0; r < Rk; r++) a = _mm256_fmadd_ps(_mm256_set1_ps(t[r]), _mm256_loadu_ps(b + (long)r * N + n), a);
          _mm256_storeu_ps(yr + n, a);
        }
        for (; n < n1; n++) { float a = 0.f; for (int r = 0; r < Rk; r++) a += t[r] * b[(long)r * N + n]; yr[n] += a; }
      } else {                                            /* b [N, R] */
        for (int n = n0; n < n1; n++) yr[n] += dot(b + (long)n * Rk, t, Rk);
      }
    }
  }
}
/* Sample one token per row of logits [B, V]: z = logits * inv_t[b]; u[b] < 0: greedy (first argmax);
   else the inverse CDF at u[b] of softmax(z) (the first token whose running sum of exp(z - max) reaches
   u * total). tok [B] (int64) and logp [B] = log_softmax(z)[tok]. One task per row. */
void sample_rows(const float* logits, const float* inv_t, const float* u, int64_t* tok, float* logp,
                 int B, int V, int nt) {
  #pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int b = 0; b < B; b++) {
    const float* z = logits + (long)b * V;
    float it = inv_t[b];
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int v = 0;
    for (; v + 8 <= V; v += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(z + v));
    float mx = -INFINITY, tmp[8];
    _mm256_storeu_ps(tmp, mv);
    for (int i = 0; i < 8; i++) mx = tmp[i] > mx ? tmp[i] : mx;
    for (; v < V; v++) mx = z[v] > mx ? z[v] : mx;
    __m256 itv = _mm256_set1_ps(it), sh = _mm256_set1_ps(mx * it), sum = _mm256_setzero_ps();
    for (v = 0; v + 8 <= V; v += 8)
      sum = _mm256_add_ps(sum, exp256(_mm256_fmsub_ps(_mm256_loadu_ps(z + v), itv, sh)));
    float total = hsum(sum);
    for (; v < V; v++) total += expf(z[v] * it - mx * it);
    long t = 0;
    if (u[b] < 0) {
      while (t < V - 1 && z[t] != mx) t++;
    } else {
      float target = u[b] * total, run = 0.f;
      for (v = 0; v + 8 <= V; v += 8) {
        float c = hsum(exp256(_mm256_fmsub_ps(_mm256_loadu_ps(z + v), itv, sh)));
        if (run + c >= target) break;
        run += c;
      }
      /* v == V when rounding left the blocks' sum short of target: then the last token (never V) */
      for (t = v < V ? v : V - 1; t < V - 1; t++) {
        run += expf(z[t] * it - mx * it);
        if (run >= target) break;
      }
    }
    tok[b] = t;
    logp[b] = z[t] * it - mx * it - logf(total);
  }
}
/* Softmax statistics of logits z [B, V] at 1/T = inv_t, in place (the training log-probs, rftkit.train_utils):
   y = (z - max) * inv_t floored at -86 (below it exp gives denormals, which run ~10x slower, for weights under
   1e-37), and z becomes e = exp(y). Per row: logp[b] = (z[t] - max) * inv_t - log s (s = sum e, the target
   unfloored), lse[b] = max * inv_t + log s, s_out[b] = s, and ent[b] = log s - sum(e y) / s when ent. */
void softmax_rows(float* z, const int64_t* t, float inv_t, float* logp, float* lse, float* ent, float* s_out,
                  int B, int V, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int b = 0; b < B; b++) {
    float* r = z + (long)b * V;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int v = 0;
    for (; v + 8 <= V; v += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(r + v));
    float mx = -INFINITY, tmp[8];
    _mm256_storeu_ps(tmp, mv);
    for (int i = 0; i < 8; i++) mx = tmp[i] > mx ? tmp[i] : mx;
    for (; v < V; v++) mx = r[v] > mx ? r[v] : mx;
    float yt = (r[t[b]] - mx) * inv_t;
    __m256 itv = _mm256_set1_ps(inv_t), sh = _mm256_set1_ps(mx * inv_t), lo = _mm256_set1_ps(-86.f);
    __m256 sum = _mm256_setzero_ps(), sey = _mm256_setzero_ps();
    for (v = 0; v + 8 <= V; v += 8) {
      __m256 y = _mm256_max_ps(_mm256_fmsub_ps(_mm256_loadu_ps(r + v), itv, sh), lo);
      __m256 e = exp256(y);
      _mm256_storeu_ps(r + v, e);
      sum = _mm256_add_ps(sum, e);
      sey = _mm256_fmadd_ps(e, y, sey);
    }
    float total = hsum(sum), ey = hsum(sey);
    for (; v < V; v++) {
      float y = r[v] * inv_t - mx * inv_t;
      y = y < -86.f ? -86.f : y;
      float e = expf(y);
      r[v] = e; total += e; ey += e * y;
    }
    float ls = logf(total);
    logp[b] = yt - ls;
    lse[b] = mx * inv_t + ls;
    s_out[b] = total;
    if (ent) ent[b] = ls - ey / total;
  }
}
/* y[m] = w * x[m] / sqrt(mean(x[m]^2) + eps); x, y [M, D] */
void rms_norm(const float* x, const float* w, float* y, int M, int D, float eps) {
  for (int m = 0; m < M; m++) {
    const float* xr = x + (long)m * D;
    float* yr = y + (long)m * D;
    float r = 1.f / sqrtf(dot(xr, xr, D) / D + eps);
    for (int d = 0; d < D; d++) yr[d] = w[d] * (xr[d] * r);
  }
}

/* Rotary embedding, rotate-half convention: x [BT, n, hd], cos, sin [BT, hd] -> y = x cos + rot(x) sin,
   rot(x) = (-x[hd/2:], x[:hd/2]) */
void rope(const float* x, const float* cs, const float* sn, float* y, int BT, int n, int hd) {
  const int half = hd / 2;
  for (long bt = 0; bt < BT; bt++) {
    const float* c = cs + bt * hd; const float* s = sn + bt * hd;
    for (int h = 0; h < n; h++) {
      const float* xi = x + (bt * n + h) * hd;
      float* yi = y + (bt * n + h) * hd;
      for (int d = 0; d < half; d++) {
        yi[d] = xi[d] * c[d] - xi[d + half] * s[d];
        yi[d + half] = xi[d + half] * c[d + half] + xi[d] * s[d + half];
      }
    }
  }
}

/* The attention of a decode step after q/k/v: RoPE on q0 (into q1) and k0, the new keys and values into cache
   rows wrow of the pools kc, vc, then paged attention into att [M, H, hd] (decode_layers and rftkit.quantize's
   decode_layers_q) */
static void decode_attend(const float* q0, const float* k0, const float* v0, float* q1, float* att, float* kc,
                          float* vc, int M, int H, int Hkv, int hd, const float* cs, const float* sn,
                          const int64_t* table, int nbmax, const int64_t* qpos, const int64_t* wrow, int bs,
                          int window, float scale, int nt) {
  const long NK = (long)Hkv * hd;
  rope(q0, cs, sn, q1, M, H, hd);
  for (int m = 0; m < M; m++) {
    rope(k0 + m * NK, cs + (long)m * hd, sn + (long)m * hd, kc + wrow[m] * NK, 1, Hkv, hd);
    memcpy(vc + wrow[m] * NK, v0 + m * NK, NK * sizeof(float));
  }
  paged_attn(q1, kc, vc, table, qpos, att, M, H, Hkv, hd, nbmax, bs, window, scale, nt);
}

/* One decoder block's weights for decode_layers: addresses, 0 for an absent bias (struct mirrored by
   DecodeLayer in Python). kc, vc: the block's paged cache, [slots, Hkv, hd]. */
typedef struct {
  int64_t ln1, wq, wk, wv, bq, bk, bv, wo, bo, ln2, wg, wu, wd, bg, bu, bd, kc, vc;
  int64_t la[7], lb[7];          /* unmerged LoRA of q, k, v, o, gate, up, down: A [r, K], B [N, r]; 0 = none */
  float ls[7];                   /* its scale */
  int32_t lr[7];                 /* its rank, <= 64 */
  int32_t window, pad;
  int64_t bA[7], bB[7], bT[7], bR[7], bS[7];   /* the adapter bank's slot table of each (SlotTable); 0 = none */
} dlayer;

/* the 8 horizontal sums of v[0..7], as one vector */
static inline __m256 hsum8(const __m256* v) {
  __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
/* y [M, N] += s * (x A^T) B^T for live LoRA tensors A [r, K], B [N, r] (PEFT's layouts; r <= 64, M <= 64). The
   expand's dots are only r long: with r % 8 == 0 eight outputs share one horizontal reduction (hsum8). */
static void lora_rows(const float* x, int M, int K, const float* A, const float* B, float s, int r, float* y, int N,
                      int nt) {
  float t[64 * 64];
  #pragma omp parallel num_threads(nt)
  {
    #pragma omp for schedule(static)
    for (int i = 0; i < M * r; i++) t[(i / r) * 64 + i % r] = dot(x + (long)(i / r) * K, A + (long)(i % r) * K, K) * s;
    int N8 = r % 8 == 0 ? N / 8 * 8 : 0;
    #pragma omp for schedule(static)
    for (int n = 0; n < N8; n += 8)
      for (int m = 0; m < M; m++) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int j = 0; j < r; j += 8) {
          __m256 tv = _mm256_loadu_ps(t + m * 64 + j);
          for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(B + (long)(n + i) * r + j), tv, acc[i]);
        }
        float* yo = y + (long)m * N + n;
        _mm256_storeu_ps(yo, _mm256_add_ps(_mm256_loadu_ps(yo), hsum8(acc)));
      }
    #pragma omp for schedule(static)
    for (int n = N8; n < N; n++)
      for (int m = 0; m < M; m++) y[(long)m * N + n] += dot(B + (long)n * r, t + m * 64, r);
  }
}
#define LORA(j, xin, K, yout, N) if (P->la[j]) lora_rows(xin, M, K, (const float*)P->la[j], (const float*)P->lb[j], P->ls[j], P->lr[j], yout, N, nt); \
  if (rows && P->bA[j]) lora_bgmv(xin, yout, rows, (const int64_t*)P->bA[j], (const int64_t*)P->bB[j], (const int32_t*)P->bT[j], \
                                  (const int32_t*)P->bR[j], (const float*)P->bS[j], btmp, M, K, N, rmax, nt);

/* nl decoder blocks for M decode rows (one new token each) over a paged cache, in place on x [M, D]:
     x += o(attn(rope(q), cache + (rope(k), v))) of rms_norm(x);  x += down(silu(gate) * up) of rms_norm(x)
   with the same kernels as the per-op path (gemv_many, rope, paged_attn, rms_norm): one call for the whole
   stack instead of ~25 torch ops and kernel calls per block. cs, sn [M, hd]; table [M, nbmax]; qpos [M];
   wrow [M]: the cache row of each row's new key and value; ws: scratch of M * (2D + 3 H hd + 2 Hkv hd + 2F)
   floats. D, H hd and F are multiples of 8, M within the GEMV kernel's rows. */
/* g = silu(g) * u over n floats, 8 lanes at a time on every thread (one row's scalar expf loop was ~4 ms of a
   16-row decode step) */
static void silu_mul(float* g, const float* u, long n, int nt) {
  long n8 = n / 8 * 8;
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (long i = 0; i < n8; i += 8) {
    __m256 gv = _mm256_loadu_ps(g + i);
    __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                          _mm256_loadu_ps(u + i)));
  }
  for (long i = n8; i < n; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

void decode_layers(float* x, const dlayer* L, int nl, int M, int D, int H, int Hkv, int hd, int F,
                   const float* cs, const float* sn, const int64_t* table, int nbmax, const int64_t* qpos,
                   const int64_t* wrow, int bs, float eps, float scale, float* ws, const int32_t* rows, int rmax,
                   float* btmp, int nt) {
  const long NQ = (long)H * hd, NK = (long)Hkv * hd;
  float *h = ws, *q0 = h + M * D, *k0 = q0 + M * NQ, *v0 = k0 + M * NK, *q1 = v0 + M * NK,
        *att = q1 + M * NQ, *g = att + M * NQ, *u = g + (long)M * F, *t = u + (long)M * F;
  for (int l = 0; l < nl; l++) {
    const dlayer* P = L + l;
    float *kc = (float*)P->kc, *vc = (float*)P->vc;
    rms_norm(x, (const float*)P->ln1, h, M, D, eps);
    int64_t W3[3] = {P->wq, P->wk, P->wv}, b3[3] = {P->bq, P->bk, P->bv},
            y3[3] = {(int64_t)q0, (int64_t)k0, (int64_t)v0};
    int32_t N3[3] = {(int32_t)NQ, (int32_t)NK, (int32_t)NK};
    gemv_many(h, W3, b3, y3, N3, 3, M, D, nt);
    LORA(0, h, D, q0, (int)NQ) LORA(1, h, D, k0, (int)NK) LORA(2, h, D, v0, (int)NK)
    decode_attend(q0, k0, v0, q1, att, kc, vc, M, H, Hkv, hd, cs, sn, table, nbmax, qpos, wrow, bs, P->window,
                  scale, nt);
    gemv(att, (const float*)P->wo, (const float*)P->bo, t, M, D, (int)NQ, nt);
    LORA(3, att, (int)NQ, t, D)
    for (long i = 0; i < (long)M * D; i++) x[i] += t[i];
    rms_norm(x, (const float*)P->ln2, h, M, D, eps);
    int64_t W2[2] = {P->wg, P->wu}, b2[2] = {P->bg, P->bu}, y2[2] = {(int64_t)g, (int64_t)u};
    int32_t N2[2] = {F, F};
    gemv_many(h, W2, b2, y2, N2, 2, M, D, nt);
    LORA(4, h, D, g, F) LORA(5, h, D, u, F)
    silu_mul(g, u, (long)M * F, nt);
    gemv(g, (const float*)P->wd, (const float*)P->bd, t, M, D, F, nt);
    LORA(6, g, F, t, D)
    for (long i = 0; i < (long)M * D; i++) x[i] += t[i];
  }
}
"""

_lib = None
_error: str | None = None
_enabled = True


def build_library(src: str, stem: str, what: str) -> tuple[ctypes.CDLL | None, str | None]:
    """Compile C source `src` once into the cache (`kernels/{stem}-{hash}.so`, -O3 -mavx2 -mfma -fopenmp) and
    load it: (library, None), or (None, why not) on a CPU without AVX2+FMA or a machine without a compiler.
    Shared by these kernels and rftkit.quantize's."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
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
    global _lib, _error, _wide_blas
    if _lib is not None or _error is not None:
        return _lib
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    _wide_blas = " avx512f" in cpuinfo and "GenuineIntel" in cpuinfo
    lib, _error = build_library(_SRC, "decode", "decode kernels")
    if lib is None:
        return None
    P, I, Fl = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.gemv.argtypes = [P, P, P, P, I, I, I, I]
    lib.gemv_many.argtypes = [P, P, P, P, P, I, I, I, I]
    lib.paged_attn.argtypes = [P, P, P, P, P, P, I, I, I, I, I, I, I, Fl, I]
    lib.rms_norm.argtypes = [P, P, P, I, I, Fl]
    lib.rope.argtypes = [P, P, P, P, I, I, I]
    lib.sample_rows.argtypes = [P, P, P, P, P, I, I, I]
    lib.softmax_rows.argtypes = [P, P, Fl, P, P, P, P, I, I, I]
    lib.lora_bgmv.argtypes = [P, P, P, P, P, P, P, P, P, I, I, I, I, I]
    lib.decode_layers.argtypes = [P, P, I, I, I, I, I, I, I, P, P, P, I, P, P, I, Fl, Fl, P, P, I, P, I]
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
    return "avx2 C kernels" if _load() is not None else f"torch reference ({_error})"


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
    """F.linear(x, weight, bias); x [.., K], weight [N, K]. Few rows on CPU (_gemv_rows_ok): the GEMV kernel."""
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    if not _gemv_rows_ok(M, K, weight.shape[0]) or K % 8 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    lib = _usable(x, weight) if bias is None else _usable(x, weight, bias)
    if lib is None:
        return F.linear(x, weight, bias)
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
DECODE_MAX_ROWS_WIDE_BLAS = 16               # where MKL beats the kernel from 2 rows (Intel, _wide_blas), the one-call
                                             # stack keeps the limit it was measured at (16, Xeon) and larger batches
                                             # run op by op through MKL


def decode_max_rows() -> int:
    """The most rows decode_layers takes on this CPU."""
    if _wide_blas is None:
        _load()
    return DECODE_MAX_ROWS_WIDE_BLAS if _wide_blas else DECODE_MAX_ROWS


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
                  bank_rank: int = 0) -> bool:
    """Run len(layers) plain decoder blocks (RMSNorm, q/k/v, RoPE, paged attention, o, RMSNorm, SwiGLU; each
    linear with its unmerged LoRA or none) on x [M, D] in place, one new token per row, writing each block's
    new key and value to cache row write[m]: the model's per-op decode path in one call. `layers` is a
    DecodeLayer array the caller built (and keeps) from fp32 CPU contiguous weights. cos, sin [M, head_dim];
    table [M, nb], qpos, write [M] int64. bank_rows (int32 [M], a slot per row) adds the adapter bank's
    per-row adapters (lora_bgmv over each module's slot table in bA..bS, ranks <= bank_rank) after each
    linear and its own LoRA, as BankLinear does. False where the kernel does not apply (the caller runs its
    blocks)."""
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
    btmp = torch.empty(M * rmax) if rows is not None else None
    lib.decode_layers(x.data_ptr(), ctypes.addressof(layers), len(layers), M, D, n_heads, n_kv, head_dim, ffn_dim,
                      cos.data_ptr(), sin.data_ptr(), table.data_ptr(), table.shape[1], qpos.data_ptr(),
                      write.data_ptr(), block_size, eps, head_dim ** -0.5, ws.data_ptr(),
                      0 if rows is None else rows.data_ptr(), rmax,
                      0 if btmp is None else btmp.data_ptr(), torch.get_num_threads())
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

class SlotTable:
    """Per-module pointer table of the bank's slots for `lora_bgmv`: A [R, K] and B [N, R] of each slot (slot 0
    = none) with its scale. Keeps the tensors alive; `set` / `clear` when a slot changes. A slot loaded from
    files also keeps B transposed ([R, N], the kernel's fast layout); a live slot (`live=True`: a trainer
    updates A and B in place) is read as it is, so the kernel always sees the current weights."""

    def __init__(self, n_slots: int):
        self.tensors: list[tuple | None] = [None] * (n_slots + 1)
        self._bt: list[torch.Tensor | None] = [None] * (n_slots + 1)
        self.A = torch.zeros(n_slots + 1, dtype=torch.int64)
        self.B = torch.zeros(n_slots + 1, dtype=torch.int64)
        self.T = torch.zeros(n_slots + 1, dtype=torch.int32)       # 1: B pointer is the [R, N] transpose
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
        self._bt[slot] = None if live or B.device.type != "cpu" else B.t().contiguous()
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
    R = max(table.max_rank, 1)
    tmp = torch.empty(M, R)
    lib.lora_bgmv(x.data_ptr(), y.data_ptr(), rows.data_ptr(), table.A.data_ptr(), table.B.data_ptr(),
                  table.T.data_ptr(), table.R.data_ptr(), table.s.data_ptr(), tmp.data_ptr(), M, K, y.shape[1], R,
                  torch.get_num_threads())
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
