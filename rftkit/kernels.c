/* rftkit's CPU kernels for the decode path and the training log-probs (fp32, AVX2 + FMA, OpenMP), loaded by
   rftkit/kernels.py, which prepends its C_HELPERS (includes, hsum, dot) and documents each entry point. */
#include <string.h>

/* rows [n0, n1) of y[M, N] = x[M, K] @ W[N, K]^T (+ bias), R weight rows at a time; M <= 3, R <= 4 compile-time.
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

/* The same at 16 lanes on CPUs with AVX-512 (set_wide(1), K % 16 == 0): 32 registers hold six x rows against
   four weight rows (10 loads per 24 FMAs). Again every output is one FMA chain over K (16 lanes) and one
   reduction whatever M and R are, so a row's result does not depend on its batch. */
static int wide = 0;
void set_wide(int on) { wide = on; }
/* the sums of a, b, c, d (16 lanes each) as one 4-vector, by the same tree for each of them (zero vectors in
   place of the ones a tile does not have leave the others' sums bit for bit): 9 shuffles for 4 outputs, where
   one _mm512_reduce_add_ps each took 4 */
__attribute__((target("avx512f"), always_inline)) static inline __m128 red4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));  /* a02 a13 b02 b13 */
  __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD)); /* a b c d */
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), s));
}
/* rows [n0, n1) of y = x W^T (+ bias) for M <= 6 x rows, R <= 4 weight rows at a time (M, R compile-time).
   Tile i also prefetches lines [klo, khi) of rows pf + i R .. pf + i R + R - 1 (pf 0: none). */
__attribute__((target("avx512f"), always_inline)) static inline void gemv_tile16(const float* x, const float* W,
    const float* bias, float* y, long n0, long n1, int N, int K, const int M, const int R, const float* pf,
    int klo, int khi, const int H) {
  long n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[24];
    _Pragma("GCC unroll 24") for (int i = 0; i < M * R; i++) acc[i] = _mm512_setzero_ps();
    const float* w = W + n * K;
    const float* p = pf ? pf + (n - n0) * K : 0;
    for (int k = 0; k < K; k += 16) {
      __m512 xv[6];
      _Pragma("GCC unroll 6") for (int m = 0; m < M; m++) xv[m] = _mm512_loadu_ps(x + (long)m * K + k);
      int fetch = p && k >= klo && k < khi;
      _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {
        if (fetch) _mm_prefetch((const char*)(p + (long)r * K + k), H);
        __m512 wv = _mm512_loadu_ps(w + (long)r * K + k);
        _Pragma("GCC unroll 6") for (int m = 0; m < M; m++) acc[m * R + r] = _mm512_fmadd_ps(xv[m], wv, acc[m * R + r]);
      }
    }
    _Pragma("GCC unroll 6") for (int m = 0; m < M; m++) {
      __m128 sum;
      if (R == 4) sum = red4(acc[m * 4], acc[m * 4 + 1], acc[m * 4 + 2], acc[m * 4 + 3]);
      else { __m512 z = _mm512_setzero_ps(); sum = red4(acc[m], z, z, z); }
      if (R == 4) _mm_storeu_ps(y + (long)m * N + n, bias ? _mm_add_ps(sum, _mm_loadu_ps(bias + n)) : sum);
      else y[(long)m * N + n] = _mm_cvtss_f32(sum) + (bias ? bias[n] : 0.f);
    }
  }
}
/* one to six x rows (M at compile time): four weight rows at a time, the rest one at a time; the prefetch goes
   to L1 (near: rows of this run, about to be read) or L2 (the next run, which would crowd this one out of L1) */
__attribute__((target("avx512f"), always_inline)) static inline void gemv_m16(const float* x, const float* w,
    const float* bias, float* y, long n0, long n1, int N, int K, const int M, const float* pf, int klo, int khi,
    int near) {
  long n4 = n0 + (n1 - n0) / 4 * 4;
  if (near) gemv_tile16(x, w, bias, y, n0, n4, N, K, M, 4, pf, klo, khi, _MM_HINT_T0);
  else gemv_tile16(x, w, bias, y, n0, n4, N, K, M, 4, pf, klo, khi, _MM_HINT_T1);
  gemv_tile16(x, w, bias, y, n4, n1, N, K, M, 1, 0, 0, 0, _MM_HINT_T0);
}
/* Prefetch, so that the weights come from memory while the FMAs run rather than before them: up to six rows
   (one pass over the weights) each tile prefetches the weight rows two tiles ahead; with more rows the first
   six find this run in cache and the later passes prefetch the next run of the same weight (the next rows
   this thread likely gets), each pass a slice of its columns. Without it the first pass over a run waited
   for memory with too few FMAs per load to hide it (4-16 rows: 1.2-1.6x slower) */
__attribute__((target("avx512f"))) static void gemv_rows16(const float* x, const float* w, const float* bias,
    float* y, long n0, long n1, int N, int K, int M) {
  const float* next = n1 + (n1 - n0) <= N ? w + n1 * K : 0;
  int passes = (M + 5) / 6;
  for (int m0 = 0, pass = 0; m0 < M; pass++) {
    int take = M - m0 < 6 ? M - m0 : 6, klo = 0, khi = K;
    const float* pf = passes == 1 ? w + (n0 + 8) * K : pass ? next : 0;
    if (passes > 1 && pass) { klo = (int)((long)K * (pass - 1) / (passes - 1)) / 16 * 16;
                              khi = pass == passes - 1 ? K : (int)((long)K * pass / (passes - 1)) / 16 * 16; }
    const float* xb = x + (long)m0 * K;
    float* yb = y + (long)m0 * N;
    switch (take) {
      case 1: gemv_m16(xb, w, bias, yb, n0, n1, N, K, 1, pf, klo, khi, passes == 1); break;
      case 2: gemv_m16(xb, w, bias, yb, n0, n1, N, K, 2, pf, klo, khi, passes == 1); break;
      case 3: gemv_m16(xb, w, bias, yb, n0, n1, N, K, 3, pf, klo, khi, passes == 1); break;
      case 4: gemv_m16(xb, w, bias, yb, n0, n1, N, K, 4, pf, klo, khi, passes == 1); break;
      case 5: gemv_m16(xb, w, bias, yb, n0, n1, N, K, 5, pf, klo, khi, passes == 1); break;
      default: gemv_m16(xb, w, bias, yb, n0, n1, N, K, 6, pf, klo, khi, passes == 1);
    }
    m0 += take;
  }
}

/* Several GEMVs of the same x (q, k, v; gate, up) in one parallel region: weight j is W[j] [N[j], K] with
   bias b[j] (or 0) into y[j] [M, N[j]]; K % 8 == 0, M >= 1 (8 at a time), nw <= 4. The concatenated rows are dealt in
   runs of 16, guided: long contiguous stretches first, short ones last, so the threads finish together even
   when the OS holds one of them up. */
#define RUN 16
#define MCHUNK 64 /* more rows go in chunks of 64 (each chunk's x stays in L2 over the weight runs): at 592 rows of
                     K = 1536, 250 GFLOP/s in one pass, 355 in chunks (2-core EPYC, 16 lanes) */
static void gemv_chunk(const float* x, const int64_t* W, const int64_t* b, const int64_t* y, const int32_t* N,
                       int nw, int M, int K, int nt) {
  long total = 0, start[5];
  for (int j = 0; j < nw; j++) { start[j] = total; total += N[j]; }
  start[nw] = total;
  long runs = (total + RUN - 1) / RUN;
  #pragma omp parallel for schedule(guided, 1) num_threads(nt)
  for (long c = 0; c < runs; c++) {
    long r0 = c * RUN, r1 = r0 + RUN < total ? r0 + RUN : total;
    for (int j = 0; j < nw; j++) {
      long a = r0 > start[j] ? r0 : start[j], e = r1 < start[j + 1] ? r1 : start[j + 1];
      if (a < e && wide && K % 16 == 0)
        gemv_rows16(x, (const float*)W[j], (const float*)b[j], (float*)y[j], a - start[j], e - start[j], N[j], K, M);
      else if (a < e)
        gemv_rows(x, (const float*)W[j], (const float*)b[j], (float*)y[j], a - start[j], e - start[j], N[j], K, M);
    }
  }
}

void gemv_many(const float* x, const int64_t* W, const int64_t* b, const int64_t* y, const int32_t* N, int nw,
               int M, int K, int nt) {
  for (int m0 = 0; m0 < M; m0 += MCHUNK) {
    int64_t yc[4];
    for (int j = 0; j < nw; j++) yc[j] = y[j] + (int64_t)m0 * N[j] * (int64_t)sizeof(float);
    gemv_chunk(x + (long)m0 * K, W, b, yc, N, nw, M - m0 < MCHUNK ? M - m0 : MCHUNK, K, nt);
  }
}
/* y[M, N] = x[M, K] @ W[N, K]^T + bias (bias may be 0) */
void gemv(const float* x, const float* W, const float* bias, float* y, int M, int N, int K, int nt) {
  int64_t w = (int64_t)W, bb = (int64_t)bias, yy = (int64_t)y;
  int32_t n = N;
  gemv_many(x, &w, &bb, &yy, &n, 1, M, K, nt);
}

/* y [M, K] = g [M, N] @ W [N, K] (a frozen linear's input gradient; W as the forward reads it, no transpose), 16
   lanes: tiles of up to 6 rows x 32 columns of y, each a run over n of 6 broadcasts of g and 2 loads of W's row
   segment into 12 FMAs; a thread takes column blocks of 32, and n runs in slices of NNB so a block's W[n0:n1,
   k0:k0+32] (256 KB) stays in L2 over all rows (the vocabulary's 49152 rows in one run: 1.5x slower than MKL).
   K % 16 == 0. */
#define NNB 2048
__attribute__((target("avx512f"))) static void gemm_nn_tile(const float* g, const float* W, float* y, int N,
                                                              int K, int n0, int n1, int k0, int nk, const int Mt) {
  __m512 acc[6][2];
  for (int m = 0; m < Mt; m++) {
    acc[m][0] = n0 ? _mm512_loadu_ps(y + (long)m * K + k0) : _mm512_setzero_ps();
    acc[m][1] = n0 && nk > 16 ? _mm512_loadu_ps(y + (long)m * K + k0 + 16) : _mm512_setzero_ps();
  }
  for (int n = n0; n < n1; n++) {
    const float* w = W + (long)n * K + k0;
    __m512 w0 = _mm512_loadu_ps(w), w1 = nk > 16 ? _mm512_loadu_ps(w + 16) : _mm512_setzero_ps();
    for (int m = 0; m < Mt; m++) {
      __m512 gv = _mm512_set1_ps(g[(long)m * N + n]);
      acc[m][0] = _mm512_fmadd_ps(gv, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(gv, w1, acc[m][1]);
    }
  }
  for (int m = 0; m < Mt; m++) {
    _mm512_storeu_ps(y + (long)m * K + k0, acc[m][0]);
    if (nk > 16) _mm512_storeu_ps(y + (long)m * K + k0 + 16, acc[m][1]);
  }
}
__attribute__((target("avx512f"))) void gemm_nn(const float* g, const float* W, float* y, int M, int N, int K,
                                                 int nt) {
  const int nkb = (K + 31) / 32;
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int kb = 0; kb < nkb; kb++) {
    int k0 = kb * 32, nk = K - k0 < 32 ? K - k0 : 32;
    for (int n0 = 0; n0 < N; n0 += NNB) {
      int n1 = n0 + NNB < N ? n0 + NNB : N;
      for (int m0 = 0; m0 < M; m0 += 6) {
        const float* gm = g + (long)m0 * N;
        float* ym = y + (long)m0 * K;
        switch (M - m0 < 6 ? M - m0 : 6) {
          case 1: gemm_nn_tile(gm, W, ym, N, K, n0, n1, k0, nk, 1); break;
          case 2: gemm_nn_tile(gm, W, ym, N, K, n0, n1, k0, nk, 2); break;
          case 3: gemm_nn_tile(gm, W, ym, N, K, n0, n1, k0, nk, 3); break;
          case 4: gemm_nn_tile(gm, W, ym, N, K, n0, n1, k0, nk, 4); break;
          case 5: gemm_nn_tile(gm, W, ym, N, K, n0, n1, k0, nk, 5); break;
          default: gemm_nn_tile(gm, W, ym, N, K, n0, n1, k0, nk, 6);
        }
      }
    }
  }
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
   load, a row's heads dealt to one thread in turn. A decode batch's keys and values are scattered blocks the
   hardware prefetcher does not follow: each key prefetches the key PD positions ahead and its own value
   (64 rows x 101 positions x 30 layers: 22 -> 14 ms). hd % 8 == 0, hd <= 256, G <= 16. */
/* the 8 horizontal sums of v[0..7], as one vector */
static inline __m256 hsum8(const __m256* v) {
  __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#define CH 64
#define PD 16                                               /* keys ahead a key prefetches */
void paged_attn(const float* q, const float* kc, const float* vc, const int64_t* table, const int64_t* qpos,
                float* out, int B, int H, int Hkv, int hd, int nbmax, int bs, int window, float scale, int nt) {
  const int G = H / Hkv, D8 = hd / 8;
  const long row = (long)Hkv * hd;                       /* floats between consecutive tokens of the pool */
  #pragma omp parallel for schedule(dynamic, Hkv) num_threads(nt)
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
      for (int j = 0; j < n; j++) {
        long ta = c0 + j + PD;                            /* this head's lines of key ta and value c0 + j: */
        if (ta <= p) {                                    /* the rows are scattered over blocks, too few */
          const float* ka = kc + (tb[ta / bs] * bs + ta % bs) * row + (long)h * hd;   /* per page for the */
          for (int d = 0; d < hd; d += 16) _mm_prefetch((const char*)(ka + d), _MM_HINT_T0);  /* prefetcher */
        }
        for (int d = 0; d < hd; d += 16) _mm_prefetch((const char*)(vp[j] + d), _MM_HINT_T0);
        if (j % 8 == 7)                                   /* eight keys' scores share one reduction */
          for (int g = 0; g < G; g++) {
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int d = 0; d < hd; d += 8) {
              __m256 qv = _mm256_loadu_ps(qh + (long)g * hd + d);
              for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[j - 7 + i] + d), a[i]);
            }
            _mm256_store_ps(&sc[g][j - 7], _mm256_mul_ps(hsum8(a), _mm256_set1_ps(scale)));
          }
      }
      for (int j = n / 8 * 8; j < n; j++)
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
      for (int d = 0; d < D8; d += 2) {                   /* acc[g] += p[g, j] * v_j: 4 heads x 16 lanes per */
        for (int g0 = 0; g0 < G; g0 += 4) {               /* pass, 8 FMA chains (4 were latency-bound) */
          int gn = G - g0 < 4 ? G - g0 : 4, two = d + 1 < D8;
          __m256 a[8];
          for (int i = 0; i < 8; i++) a[i] = _mm256_load_ps(&acc[g0 + (i % 4 < gn ? i % 4 : 0)][(d + (two ? i / 4 : 0)) * 8]);
          for (int j = 0; j < n; j++) {
            __m256 v0 = _mm256_loadu_ps(vp[j] + d * 8), v1 = two ? _mm256_loadu_ps(vp[j] + d * 8 + 8) : v0;
            for (int i = 0; i < 4; i++)
              if (i < gn) {
                __m256 pj = _mm256_set1_ps(sc[g0 + i][j]);
                a[i] = _mm256_fmadd_ps(pj, v0, a[i]);
                a[4 + i] = _mm256_fmadd_ps(pj, v1, a[4 + i]);
              }
          }
          for (int i = 0; i < gn; i++) {
            _mm256_store_ps(&acc[g0 + i][d * 8], a[i]);
            if (two) _mm256_store_ps(&acc[g0 + i][d * 8 + 8], a[4 + i]);
          }
        }
      }
    }
    for (int g = 0; g < G; g++) {
      __m256 inv = _mm256_set1_ps(1.f / l[g]);
      for (int d = 0; d < D8; d++) _mm256_storeu_ps(o + (long)g * hd + d * 8, _mm256_mul_ps(_mm256_load_ps(&acc[g][d * 8]), inv));
    }
  }
}

/* t [nb, ldt] = x [nb, K] A^T for one slot's A [R, K] at 16 lanes (nb <= 6 rows, K % 16 == 0), prefetching the
   first R rows of pf (the next block's A, or 0) into L2 while the FMAs run */
__attribute__((target("avx512f"))) static void shrink16(const float* x, const float* a, float* t, int R, int ldt,
                                                      int K, int nb, const float* pf) {
  switch (nb) {
    case 1: gemv_m16(x, a, 0, t, 0, R, ldt, K, 1, pf, 0, K, 0); break;
    case 2: gemv_m16(x, a, 0, t, 0, R, ldt, K, 2, pf, 0, K, 0); break;
    case 3: gemv_m16(x, a, 0, t, 0, R, ldt, K, 3, pf, 0, K, 0); break;
    case 4: gemv_m16(x, a, 0, t, 0, R, ldt, K, 4, pf, 0, K, 0); break;
    case 5: gemv_m16(x, a, 0, t, 0, R, ldt, K, 5, pf, 0, K, 0); break;
    default: gemv_m16(x, a, 0, t, 0, R, ldt, K, 6, pf, 0, K, 0);
  }
}
/* y[q][c] += sum_r t[q][r] b[r][c] over c in [n0, n1) for Q <= 4 rows q of one slot, b = B^T in blocks of BC:
   each load of B feeds the Q rows' FMAs (one row at a time was one load per FMA, load-bound). Per output the same FMA chain
   over r as one row alone, so rows do not change each other's sums. */
#define BC 32     /* a bank slot's B^T is stored in blocks of BC columns, [ceil(N / BC)][R][BC]: a task's run of
                     columns is one contiguous stream instead of R strided ones */
#define XPFD 1024 /* floats of B^T prefetched ahead into L2 (4 KB; 0, 512, 2048-8192 measured slower): the 16-slot
                     expand of a 64-row decode step went from 8.0 to 6.2 ms (20 to 25 GB/s of its 159 MB) */
#define EXPAND_ROWS(V, W, LOAD, STORE, FMA, SET1, ZERO)                                                         \
  int c = n0;                                                                                                  \
  for (; c + 2 * W <= n1; c += 2 * W) {                                                                        \
    V acc[4][2];                                                                                               \
    for (int q = 0; q < 4; q++) { acc[q][0] = q < Q ? LOAD(y[q] + c) : ZERO(); acc[q][1] = q < Q ? LOAD(y[q] + c + W) : ZERO(); } \
    const float* bc = b + (long)(c / BC) * R * BC + c % BC;                                                    \
    for (int r = 0; r < R; r++) {                                                                              \
      _mm_prefetch((const char*)(bc + XPFD + r * BC), _MM_HINT_T1);                                            \
      _mm_prefetch((const char*)(bc + XPFD + r * BC + 16), _MM_HINT_T1);                                       \
      V b0 = LOAD(bc + r * BC), b1 = LOAD(bc + r * BC + W);                                                    \
      for (int q = 0; q < 4; q++) if (q < Q) {                                                                 \
        V tv = SET1(t[q][r]);                                                                                  \
        acc[q][0] = FMA(tv, b0, acc[q][0]); acc[q][1] = FMA(tv, b1, acc[q][1]);                                \
      }                                                                                                        \
    }                                                                                                          \
    for (int q = 0; q < Q; q++) { STORE(y[q] + c, acc[q][0]); STORE(y[q] + c + W, acc[q][1]); }                \
  }                                                                                                            \
  for (; c < n1; c++)                                                                                          \
    for (int q = 0; q < Q; q++) {                                                                              \
      float a = y[q][c];                                                                                       \
      for (int r = 0; r < R; r++) a = fmaf(t[q][r], b[(long)(c / BC) * R * BC + r * BC + c % BC], a);           \
      y[q][c] = a;                                                                                             \
    }
static inline void expand_rows8(float* const* y, const float* const* t, const float* b, int R, int N, int n0, int n1,
                                const int Q) {
  EXPAND_ROWS(__m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, _mm256_set1_ps, _mm256_setzero_ps)
}
__attribute__((target("avx512f"))) static inline void expand_rows16(float* const* y, const float* const* t,
                                                                   const float* b, int R, int N, int n0, int n1,
                                                                   const int Q) {
  EXPAND_ROWS(__m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_setzero_ps)
}
__attribute__((target("avx512f"))) static void expand16(float* const* y, const float* const* t, const float* b, int R,
                                                      int N, int n0, int n1, int Q) {
  switch (Q) {
    case 1: expand_rows16(y, t, b, R, N, n0, n1, 1); break;
    case 2: expand_rows16(y, t, b, R, N, n0, n1, 2); break;
    case 3: expand_rows16(y, t, b, R, N, n0, n1, 3); break;
    default: expand_rows16(y, t, b, R, N, n0, n1, 4);
  }
}
static void expand8(float* const* y, const float* const* t, const float* b, int R, int N, int n0, int n1, int Q) {
  switch (Q) {
    case 1: expand_rows8(y, t, b, R, N, n0, n1, 1); break;
    case 2: expand_rows8(y, t, b, R, N, n0, n1, 2); break;
    case 3: expand_rows8(y, t, b, R, N, n0, n1, 3); break;
    default: expand_rows8(y, t, b, R, N, n0, n1, 4);
  }
}

/* Punica BGMV over slots: y[m] += s[k] * B_k (A_k x[m]) with k = rows[m], for rows whose slot has weights
   (A[k] != 0). x [M, K] (K % 8 == 0), y [M, N]; A_k [R_k, K]; B_k [N, R_k], or where Tr[k] its transpose in
   blocks of BC columns (kernels.py's blocked_t; then the expand is R_k axpys along N, vectorised; the [N, R_k]
   layout of live tensors costs a dot per output).
   The rows are grouped by slot first (a stable counting sort), so each slot's A and B come from memory once
   per call and from cache for the slot's other rows: with 16 adapters of r = 16 on every linear layer of a
   135M model, the adapters are ~310 MB, and reading them once per row instead of once per slot made a
   64-row decode step read them 4 times. A slot's rows shrink in blocks of 6 against its A at 16 lanes (3 at
   8), prefetching the next block's A, reading x's rows in place when the block's rows are consecutive there
   (else copying them to xs first), and expand four at a time against its B^T; a 512-row prefill of 16
   adapters (32 rows each) took 0.12-0.39 ms a module against 0.23-0.48 for blocks of 3 and one row at a time
   (2-core Sapphire Rapids). S: the slots (rows[m] < S); xs [M, K], tmp [M, Rmax] float and idx [M + 3 S + 1]
   int32 scratch. */
void lora_bgmv(const float* x, float* y, const int32_t* rows, const int64_t* A, const int64_t* Bw,
               const int32_t* Tr, const int32_t* R, const float* s, float* xs, float* tmp, int32_t* idx, int M,
               int K, int N, int Rmax, int S, int nt) {
  int32_t *order = idx, *first = idx + M, *cur = first + S + 1, *gk = cur + S;  /* first [S+1], cur [S], gk [S] */
  for (int k = 0; k <= S; k++) first[k] = 0;
  for (int m = 0; m < M; m++)
    if (rows[m] >= 0 && rows[m] < S && A[rows[m]]) first[rows[m] + 1]++;
  int G = 0;
  for (int k = 0; k < S; k++) {
    if (first[k + 1]) gk[G++] = k;
    first[k + 1] += first[k];
    cur[k] = first[k];
  }
  const int n = first[S];                                 /* rows with an adapter, sorted by slot */
  for (int m = 0; m < M; m++)
    if (rows[m] >= 0 && rows[m] < S && A[rows[m]]) order[cur[rows[m]]++] = m;
  if (!n) return;
  #pragma omp parallel num_threads(nt)
  {
    /* shrink: tmp[j] = s * A_k xs[j] for blocks of one slot's rows (6 at 16 lanes, else 3) against A_k's rows */
    const int blk = wide && K % 16 == 0 ? 6 : 3;
    #pragma omp for schedule(static)
    for (int j0 = 0; j0 < n; j0++) {                      /* a block starts every blk-th row of its slot */
      int k = rows[order[j0]];
      if ((j0 - first[k]) % blk) continue;
      int nb = first[k + 1] - j0 < blk ? first[k + 1] - j0 : blk;
      const float* a = (const float*)A[k];
      int run = 1;                                        /* the block's rows are consecutive in x: read them there */
      while (run < nb && order[j0 + run] == order[j0] + run) run++;
      const float* xb = run == nb ? x + (long)order[j0] * K : xs + (long)j0 * K;
      if (run < nb)
        for (int q = 0; q < nb; q++) memcpy(xs + (long)(j0 + q) * K, x + (long)order[j0 + q] * K, K * sizeof(float));
      float* t = tmp + (long)j0 * Rmax;
      if (blk == 6) {
        int k1 = j0 + nb < n ? rows[order[j0 + nb]] : k;      /* the next block's slot: prefetch its A */
        shrink16(xb, a, t, R[k], Rmax, K, nb, k1 != k && R[k1] >= R[k] ? (const float*)A[k1] : 0);
      } else switch (nb) {
        case 1: gemv_tile(xb, a, 0, t, 0, R[k], Rmax, K, 1, 4); break;
        case 2: gemv_tile(xb, a, 0, t, 0, R[k], Rmax, K, 2, 4); break;
        default: gemv_tile(xb, a, 0, t, 0, R[k], Rmax, K, 3, 4); break;
      }
      for (int q = 0; q < nb; q++)
        for (int r = 0; r < R[k]; r++) t[(long)q * Rmax + r] *= s[k];
    }
    /* expand: tasks of (slot, run of up to 256 outputs), the slot's rows inside, so a run of B stays in L1; shorter
       runs when there are few slots, so every thread has work (one slot and N = 192 was one task) */
    const int runs = (4 * nt + G - 1) / G;                /* runs a slot for about four tasks a thread */
    int NC = (N + runs - 1) / runs;
    NC = NC < 32 ? 32 : NC > 256 ? 256 : (NC + 31) / 32 * 32;
    const int nc = (N + NC - 1) / NC;
    #pragma omp for schedule(static)
    for (long i = 0; i < (long)G * nc; i++) {
      int k = gk[i / nc], Rk = R[k];
      int n0 = (i % nc) * NC, n1 = n0 + NC < N ? n0 + NC : N;
      const float* b = (const float*)Bw[k];
      if (Tr[k]) {                                        /* b = blocked B^T: four rows at a time share its loads */
        for (int j = first[k]; j < first[k + 1]; j += 4) {
          int Q = first[k + 1] - j < 4 ? first[k + 1] - j : 4;
          float* yq[4];
          const float* tq[4];
          for (int q = 0; q < Q; q++) { yq[q] = y + (long)order[j + q] * N; tq[q] = tmp + (long)(j + q) * Rmax; }
          if (wide) expand16(yq, tq, b, Rk, N, n0, n1, Q);
          else expand8(yq, tq, b, Rk, N, n0, n1, Q);
        }
        continue;
      }
      for (int j = first[k]; j < first[k + 1]; j++) {
        const float* t = tmp + (long)j * Rmax;
        float* yr = y + (long)order[j] * N;
        for (int c = n0; c < n1; c++) yr[c] += dot(b + (long)c * Rk, t, Rk);   /* b [N, R] */
      }
    }
  }
}
/* the largest of z[0..V) */
static inline float row_max(const float* z, int V) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int v = 0;
  for (; v + 8 <= V; v += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(z + v));
  float mx = -INFINITY, tmp[8];
  _mm256_storeu_ps(tmp, mv);
  for (int i = 0; i < 8; i++) mx = tmp[i] > mx ? tmp[i] : mx;
  for (; v < V; v++) mx = z[v] > mx ? z[v] : mx;
  return mx;
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
    float mx = row_max(z, V);
    int v;
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
    float mx = row_max(r, V);
    int v;
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
                                  (const int32_t*)P->bR[j], (const float*)P->bS[j], bxs, btmp, bidx, M, K, N, rmax, nslots, nt);

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
                   int nslots, float* bxs, float* btmp, int32_t* bidx, int nt) {
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
