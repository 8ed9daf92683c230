/* Punica BGMV: every row's adapter of the bank in one call, the slots' A and B read in place. Python:
   rftkit/kernels/bgmv.py. */
#include "kernels.h"

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
   blocks of BC columns (bgmv.py's blocked_t; then the expand is R_k axpys along N, vectorised; the [N, R_k]
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
    const int blk = kernels_wide && K % 16 == 0 ? 6 : 3;
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
        case 1: gemv_tile(xb, a, 0, t, 0, R[k], Rmax, K, 1, 4, 0, 0, 0, 0); break;
        case 2: gemv_tile(xb, a, 0, t, 0, R[k], Rmax, K, 2, 4, 0, 0, 0, 0); break;
        default: gemv_tile(xb, a, 0, t, 0, R[k], Rmax, K, 3, 4, 0, 0, 0, 0); break;
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
          if (kernels_wide) expand16(yq, tq, b, Rk, N, n0, n1, Q);
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
