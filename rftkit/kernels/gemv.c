/* The GEMV kernels: y = x W^T (+ bias) for a few rows, weights read once from memory (8 lanes; 16 on CPUs
   with AVX-512 after set_wide(1)), several weights of one x in one call, and g @ W for a frozen linear's
   input gradient. Python: rftkit/kernels/gemv.py. */
#include "kernels.h"

/* One tile of four weight rows w.. against M x rows over columns [k0, k1): the tile's twelve accumulators come from
   acc (zero where first) and go back there; the same FMA chain per output as gemv_tile's, cut in two */
static inline void gemv_tile_part(const float* x, const float* w, __m256* acc_io, int K, int k0, int k1, int first,
                                  const float* pf, int plo, int phi, const int M) {
  __m256 acc[12];
  for (int i = 0; i < M * 4; i++) acc[i] = first ? _mm256_setzero_ps() : acc_io[i];
  for (int k = k0; k < k1; k += 8) {
    __m256 xv[3];
    for (int m = 0; m < M; m++) xv[m] = _mm256_loadu_ps(x + (long)m * K + k);
    if (pf && !(k & 15) && k >= plo && k < phi)
      for (int r = 0; r < 4; r++) _mm_prefetch((const char*)(pf + (long)r * K + k), _MM_HINT_T1);
    for (int r = 0; r < 4; r++) {
      __m256 wv = _mm256_loadu_ps(w + (long)r * K + k);
      for (int m = 0; m < M; m++) acc[m * 4 + r] = _mm256_fmadd_ps(xv[m], wv, acc[m * 4 + r]);
    }
  }
  for (int i = 0; i < M * 4; i++) acc_io[i] = acc[i];
}

/* gemv_rows for a long K and a few rows (K > KLONG, 1 < M <= SPREAD: four weight rows and three x rows no
   longer fit L1 together and the weights went back to L2 every pass; down_proj at 16 rows ran at 60% of
   gate/up's rate): each tile of four weight rows goes over the columns in blocks of <= KLONG, every pass of x
   rows per block, the accumulators kept between blocks, so a block of the four rows stays in L1 over all
   passes, and each pass prefetches a slice of the next four rows' block inside its k loop. Each output is the
   same FMA chain as gemv_tile's (k ascending, one 8-lane accumulator, one hsum): the same bits whatever M is.
   At 24 and 64 rows this was 0.9-0.96x the plain path, so more rows take that. */
#define KLONG 768
#define SPREAD 16
static void gemv_rows_long(const float* x, const float* w, const float* bias, float* y, long n0, long n1, int N,
                           int K, int M) {
  const int nkb = (K + KLONG - 1) / KLONG, KB = (K / nkb + 7) / 8 * 8;
  int pm[SPREAD / 2], np = 0;                              /* the passes' row counts: pairs first, as gemv_rows */
  for (int m0 = 0; m0 < M; np++) {
    int left = M - m0;
    pm[np] = left == 1 ? 1 : left == 2 || left % 3 == 1 ? 2 : 3;
    m0 += pm[np];
  }
  __m256 acc[SPREAD / 2 * 12];
  long n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* wt = w + n * K;
    const char* next = n + 8 <= N ? (const char*)(wt + 4L * K) : 0;   /* the next four rows, over the passes */
    for (int kb = 0; kb < nkb; kb++) {
      int k0 = kb * KB, k1 = k0 + KB < K ? k0 + KB : K;
      for (int p = 0, m0 = 0; p < np; m0 += pm[p], p++) {
        const float* pf = (const float*)next;
        int plo = (k0 + (k1 - k0) * p / np) & ~15, phi = p == np - 1 ? k1 : (k0 + (k1 - k0) * (p + 1) / np) & ~15;
        const float* xb = x + (long)m0 * K;
        if (pm[p] == 1) gemv_tile_part(xb, wt, acc + p * 12, K, k0, k1, kb == 0, pf, plo, phi, 1);
        else if (pm[p] == 2) gemv_tile_part(xb, wt, acc + p * 12, K, k0, k1, kb == 0, pf, plo, phi, 2);
        else gemv_tile_part(xb, wt, acc + p * 12, K, k0, k1, kb == 0, pf, plo, phi, 3);
      }
    }
    for (int p = 0, m0 = 0; p < np; m0 += pm[p], p++)
      for (int m = 0; m < pm[p]; m++)
        for (int r = 0; r < 4; r++)
          y[(long)(m0 + m) * N + n + r] = hsum(acc[p * 12 + m * 4 + r]) + (bias ? bias[n + r] : 0.f);
  }
  for (int m0 = 0, p = 0; n < n1 && m0 < M; m0 += pm[p], p++) {   /* the last rows of N, one at a time */
    const float* xb = x + (long)m0 * K;
    float* yb = y + (long)m0 * N;
    if (pm[p] == 1) gemv_tile(xb, w, bias, yb, n, n1, N, K, 1, 4, 0, 0, 0, 0);
    else if (pm[p] == 2) gemv_tile(xb, w, bias, yb, n, n1, N, K, 2, 4, 0, 0, 0, 0);
    else gemv_tile(xb, w, bias, yb, n, n1, N, K, 3, 4, 0, 0, 0, 0);
  }
}

/* rows [n0, n1) of weight w into y, M picked at run time: x rows three at a time against four weight rows
   (7 loads per 12 FMAs, where eight rows against one took 9 per 8 and ran load-bound), pairs first where the
   count leaves one over (64 = 2 + 2 + 20 x 3: no one-row pass, 4 FMAs per 5 loads), against four. The rows go
   in sub-runs of S rows (~24 KB, at least 4) that stay in L1 over every pass of x, while the next sub-run (or
   the next run's first, the rows this thread likely gets next) comes into L2: up to SPREAD rows, where memory
   and FMAs take about as long, each tile prefetches the rows one sub-run below its own inside its k loop, a
   line per row every other k step (one pass: every column; more passes: each pass after the first a slice of
   the columns); with more rows, where the FMAs bind and a test in the k loop cost 4-10%, each pass after the
   first prefetches its slice in one burst before its tiles. On the AVX2 Zen 3: the burst at 64 rows 1.4-1.5x
   on q/o, gate/up and down; the prefetch in the k loop up to 1.1x at 1-16 rows, 0.92-1.04x at 24
   (docs/benchmarks.md). A long K with a few rows goes to gemv_rows_long; one row of a long K prefetches
   nothing (0.97x with it). */
static void gemv_rows(const float* x, const float* w, const float* bias, float* y, long n0, long n1, int N, int K,
                      int M) {
  if (K > KLONG && M > 1 && M <= SPREAD) { gemv_rows_long(x, w, bias, y, n0, n1, N, K, M); return; }
  long S = 24576 / (4L * K) / 4 * 4;
  if (S < 4) S = 4;
  int passes = (M + 2) / 3;
  for (long s0 = n0; s0 < n1; s0 += S) {
    long s1 = s0 + S < n1 ? s0 + S : n1, nx = s1 + (s1 - s0);
    const char* next = nx <= N && passes > 1 ? (const char*)(w + s1 * K) : 0;
    long bytes = (s1 - s0) * K * 4L;
    for (int m0 = 0, pass = 0; m0 < M; pass++) {
      const float* pf = 0;
      int klo = 0, khi = 0;
      if (M <= SPREAD && passes == 1 && K <= KLONG && s1 + S <= N) { pf = w + (s0 + S) * K; khi = K; }
      else if (M <= SPREAD && next && pass) {
        pf = (const float*)next;
        klo = (int)((long)K * (pass - 1) / (passes - 1)) & ~15;
        khi = pass == passes - 1 ? K : (int)((long)K * pass / (passes - 1)) & ~15;
      } else if (next && pass) {
        long lo = bytes * (pass - 1) / (passes - 1), hi = bytes * pass / (passes - 1);
        for (long o = lo & ~63L; o < hi; o += 64) _mm_prefetch(next + o, _MM_HINT_T1);
      }
      const float* xb = x + (long)m0 * K;
      float* yb = y + (long)m0 * N;
      int left = M - m0;
      int take = left == 1 ? 1 : left == 2 || left % 3 == 1 ? 2 : 3;
#define TILE(Mt, PF) gemv_tile(xb, w, bias, yb, s0, s1, N, K, Mt, 4, PF, pf, klo, khi)
      if (pf) { if (take == 1) TILE(1, 1); else if (take == 2) TILE(2, 1); else TILE(3, 1); }
      else { if (take == 1) TILE(1, 0); else if (take == 2) TILE(2, 0); else TILE(3, 0); }
#undef TILE
      m0 += take;
    }
  }
}

/* The same at 16 lanes on CPUs with AVX-512 (set_wide(1), K % 16 == 0): 32 registers hold six x rows against
   four weight rows (10 loads per 24 FMAs). Again every output is one FMA chain over K (16 lanes) and one
   reduction whatever M and R are, so a row's result does not depend on its batch. */
int kernels_wide = 0;
void set_wide(int on) { kernels_wide = on; }
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
      if (a < e && kernels_wide && K % 16 == 0)
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

