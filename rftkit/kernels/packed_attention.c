/* Causal attention over sequences packed back to back (SFT and GRPO training, prompt prefill), forward and
   backward, grouped-query heads. Python: rftkit/kernels/packed_attention.py.

   Layouts as the model holds them: q, o, dq, do [N, H, hd]; k, v, dk, dv [N, Hkv, hd] (N = the packed tokens),
   lens [nseq] (sum = N); lse [H, N] (the forward's log-sum-exp of the scaled scores, for the backward). A task
   is one sequence and one kv head with its H / Hkv query heads, so the backward's dk and dv sums stay in one
   thread. Per task the keys and values go transposed into scratch (kt, vt [hd, Lp], Lp = L rounded up to 16),
   and query rows go four at a time: a row of scores is 8-lane FMAs of a broadcast query element against kt's
   row, a row of outputs the probabilities broadcast against value rows. Every score row is materialised
   (4 x Lp floats), so the softmax is exact in one pass, not online. hd % 16 == 0. */
#include "kernels.h"

#define QB 4                             /* query rows at a time */

/* out[r, 0 .. jn) = alpha * x_r . t[:, j] for r < nq query rows x (row stride xs) against t [hd, Lp] (jn % 16 == 0) */
static inline __attribute__((always_inline)) void rows_t_n(const float* x, long xs, const float* t, int Lp, int hd,
    int jn, float alpha, float* out, const int nq) {
  for (int j = 0; j < jn; j += 16) {
    __m256 a[QB][2];
    for (int r = 0; r < nq; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int d = 0; d < hd; d++) {
      const __m256 t0 = _mm256_loadu_ps(t + (long)d * Lp + j), t1 = _mm256_loadu_ps(t + (long)d * Lp + j + 8);
      for (int r = 0; r < nq; r++) {
        const __m256 xv = _mm256_broadcast_ss(x + r * xs + d);
        a[r][0] = _mm256_fmadd_ps(xv, t0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(xv, t1, a[r][1]);
      }
    }
    const __m256 al = _mm256_set1_ps(alpha);
    for (int r = 0; r < nq; r++) {
      _mm256_storeu_ps(out + (long)r * Lp + j, _mm256_mul_ps(a[r][0], al));
      _mm256_storeu_ps(out + (long)r * Lp + j + 8, _mm256_mul_ps(a[r][1], al));
    }
  }
}

/* y_r = alpha * sum_{j < jn} w[r, j] * rows_j for r < nq (rows: row stride rs, hd floats each; w [nq, Lp]),
   16 columns at a time */
static inline __attribute__((always_inline)) void w_rows_n(const float* w, int Lp, const float* rows, long rs, int hd,
    int jn, float alpha, float* y, long ys, const int nq) {
  for (int c = 0; c < hd; c += 16) {
    __m256 a[QB][2];
    for (int r = 0; r < nq; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int j = 0; j < jn; j++) {
      const float* v = rows + j * rs + c;
      const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
      for (int r = 0; r < nq; r++) {
        const __m256 p = _mm256_broadcast_ss(w + (long)r * Lp + j);
        a[r][0] = _mm256_fmadd_ps(p, v0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(p, v1, a[r][1]);
      }
    }
    const __m256 al = _mm256_set1_ps(alpha);
    for (int r = 0; r < nq; r++) {
      _mm256_storeu_ps(y + r * ys + c, _mm256_mul_ps(a[r][0], al));
      _mm256_storeu_ps(y + r * ys + c + 8, _mm256_mul_ps(a[r][1], al));
    }
  }
}

/* acc[j] += alpha * sum_r w[r, j] * x_r for j < jn (acc [.., hd] contiguous; x: nq rows of stride xs) */
static inline __attribute__((always_inline)) void outer_add_n(const float* w, int Lp, const float* x, long xs, int hd,
    int jn, float alpha, float* acc, const int nq) {
  for (int c = 0; c < hd; c += 16) {
    __m256 x0[QB], x1[QB];
    for (int r = 0; r < nq; r++) {
      x0[r] = _mm256_mul_ps(_mm256_loadu_ps(x + r * xs + c), _mm256_set1_ps(alpha));
      x1[r] = _mm256_mul_ps(_mm256_loadu_ps(x + r * xs + c + 8), _mm256_set1_ps(alpha));
    }
    for (int j = 0; j < jn; j++) {
      float* o = acc + (long)j * hd + c;
      __m256 a0 = _mm256_loadu_ps(o), a1 = _mm256_loadu_ps(o + 8);
      for (int r = 0; r < nq; r++) {
        const __m256 p = _mm256_broadcast_ss(w + (long)r * Lp + j);
        a0 = _mm256_fmadd_ps(p, x0[r], a0);
        a1 = _mm256_fmadd_ps(p, x1[r], a1);
      }
      _mm256_storeu_ps(o, a0);
      _mm256_storeu_ps(o + 8, a1);
    }
  }
}

/* the three above with the row count a compile-time constant (their accumulators stay in registers) */
#define NQ_DISPATCH(call) switch (nq) { case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; \
                                        default: call(4); }
static void rows_t(const float* x, long xs, const float* t, int Lp, int hd, int jn, float alpha, float* out, int nq) {
#define C(n) rows_t_n(x, xs, t, Lp, hd, jn, alpha, out, n)
  NQ_DISPATCH(C)
#undef C
}
static void w_rows(const float* w, int Lp, const float* rows, long rs, int hd, int jn, float alpha, float* y, long ys,
                   int nq) {
#define C(n) w_rows_n(w, Lp, rows, rs, hd, jn, alpha, y, ys, n)
  NQ_DISPATCH(C)
#undef C
}
static void outer_add(const float* w, int Lp, const float* x, long xs, int hd, int jn, float alpha, float* acc,
                      int nq) {
#define C(n) outer_add_n(w, Lp, x, xs, hd, jn, alpha, acc, n)
  NQ_DISPATCH(C)
#undef C
}

/* row[0 .. n) -> softmax(row[0 .. n)), row[n .. jn) -> 0; returns the log-sum-exp */
static float softmax_row(float* row, int n, int jn) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int j = 0;
  for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + j));
  float f[8], m = -INFINITY;
  _mm256_storeu_ps(f, mv);
  for (int i = 0; i < 8; i++) m = f[i] > m ? f[i] : m;
  for (; j < n; j++) m = row[j] > m ? row[j] : m;
  const __m256 mm = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + j), mm));
    _mm256_storeu_ps(row + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float l = hsum(sv);
  for (; j < n; j++) { row[j] = expf(row[j] - m); l += row[j]; }
  for (; j < jn; j++) row[j] = 0.f;
  const __m256 il = _mm256_set1_ps(1.f / l);
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), il));
  for (; j < n; j++) row[j] *= 1.f / l;
  return m + logf(l);
}

/* p[0 .. n) = exp(p - lse), ds[0 .. n) = p (ds - D), both zero on [n, jn) */
static void grad_row(float* p, float* ds, int n, int jn, float lse, float D) {
  const __m256 lv = _mm256_set1_ps(lse), dv = _mm256_set1_ps(D);
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), lv));
    _mm256_storeu_ps(p + j, e);
    _mm256_storeu_ps(ds + j, _mm256_mul_ps(e, _mm256_sub_ps(_mm256_loadu_ps(ds + j), dv)));
  }
  for (; j < n; j++) { p[j] = expf(p[j] - lse); ds[j] = p[j] * (ds[j] - D); }
  for (; j < jn; j++) p[j] = ds[j] = 0.f;
}

/* t [hd, Lp] = the L rows (stride rs) transposed, zeros past L */
static void transpose_rows(const float* rows, long rs, int L, int Lp, int hd, float* t) {
  for (int d = 0; d < hd; d++) {
    float* td = t + (long)d * Lp;
    for (int j = 0; j < L; j++) td[j] = rows[j * rs + d];
    for (int j = L; j < Lp; j++) td[j] = 0.f;
  }
}

/* the tasks (sequence, kv head), longest sequences first, and each sequence's first token */
static int* plan_tasks(const int32_t* lens, int nseq, int Hkv, long* start) {
  int* order = (int*)malloc(sizeof(int) * nseq);
  long s = 0;
  for (int i = 0; i < nseq; i++) { order[i] = i; start[i] = s; s += lens[i]; }
  for (int i = 1; i < nseq; i++)
    for (int j = i; j > 0 && lens[order[j]] > lens[order[j - 1]]; j--) {
      int t = order[j];
      order[j] = order[j - 1];
      order[j - 1] = t;
    }
  int* tasks = (int*)malloc(sizeof(int) * nseq * Hkv);
  for (int i = 0; i < nseq; i++)
    for (int g = 0; g < Hkv; g++) tasks[i * Hkv + g] = order[i] * Hkv + g;
  free(order);
  return tasks;
}

void packed_attn_fwd(const float* q, const float* k, const float* v, float* o, float* lse, const int32_t* lens,
                     int nseq, int N, int H, int Hkv, int hd, float scale, int nt) {
  long* start = (long*)malloc(sizeof(long) * nseq);
  int* tasks = plan_tasks(lens, nseq, Hkv, start);
  const int G = H / Hkv;
  const long qs = (long)H * hd, ks = (long)Hkv * hd;
  #pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int c = 0; c < nseq * Hkv; c++) {
    const int s = tasks[c] / Hkv, g = tasks[c] % Hkv, L = lens[s], Lp = (L + 15) / 16 * 16;
    if (L == 0) continue;
    float* kt = (float*)malloc(sizeof(float) * ((size_t)hd * Lp + QB * (size_t)Lp));
    float* sc = kt + (size_t)hd * Lp;
    const long s0 = start[s];
    transpose_rows(k + s0 * ks + g * hd, ks, L, Lp, hd, kt);
    for (int h = g * G; h < (g + 1) * G; h++)
      for (int i0 = 0; i0 < L; i0 += QB) {
        const int nq = L - i0 < QB ? L - i0 : QB, jn = (i0 + nq + 15) / 16 * 16;
        const float* qr = q + (s0 + i0) * qs + h * hd;
        rows_t(qr, qs, kt, Lp, hd, jn, scale, sc, nq);
        for (int r = 0; r < nq; r++)                  /* the row's softmax over keys 0 .. i, zeros after */
          lse[(long)h * N + s0 + i0 + r] = softmax_row(sc + (long)r * Lp, i0 + r + 1, jn);
        w_rows(sc, Lp, v + s0 * ks + g * hd, ks, hd, i0 + nq, 1.f, o + (s0 + i0) * qs + h * hd, qs, nq);
      }
    free(kt);
  }
  free(tasks); free(start);
}

/* The gradients for dout: dq [N, H, hd], dk, dv [N, Hkv, hd] (every row written). Per query row block: the
   probabilities again from the scores and lse, dP = dO V^T, dS = P (dP - rowsum(dO o)), dq = scale dS K, and
   dk += scale dS^T q, dv += P^T dO into the task's accumulators. */
void packed_attn_bwd(const float* q, const float* k, const float* v, const float* o, const float* dout,
                     const float* lse, float* dq, float* dk, float* dv, const int32_t* lens, int nseq, int N, int H,
                     int Hkv, int hd, float scale, int nt) {
  long* start = (long*)malloc(sizeof(long) * nseq);
  int* tasks = plan_tasks(lens, nseq, Hkv, start);
  const int G = H / Hkv;
  const long qs = (long)H * hd, ks = (long)Hkv * hd;
  #pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int c = 0; c < nseq * Hkv; c++) {
    const int s = tasks[c] / Hkv, g = tasks[c] % Hkv, L = lens[s], Lp = (L + 15) / 16 * 16;
    if (L == 0) continue;
    float* kt = (float*)malloc(sizeof(float) * (2 * (size_t)hd * Lp + 2 * QB * (size_t)Lp + 2 * (size_t)Lp * hd));
    float *vt = kt + (size_t)hd * Lp, *p = vt + (size_t)hd * Lp, *ds = p + QB * (size_t)Lp;
    float *dka = ds + QB * (size_t)Lp, *dva = dka + (size_t)Lp * hd;
    const long s0 = start[s];
    const float *kr = k + s0 * ks + g * hd, *vr = v + s0 * ks + g * hd;
    transpose_rows(kr, ks, L, Lp, hd, kt);
    transpose_rows(vr, ks, L, Lp, hd, vt);
    memset(dka, 0, sizeof(float) * 2 * (size_t)Lp * hd);
    for (int h = g * G; h < (g + 1) * G; h++)
      for (int i0 = 0; i0 < L; i0 += QB) {
        const int nq = L - i0 < QB ? L - i0 : QB, jn = (i0 + nq + 15) / 16 * 16, n = i0 + nq;
        const long row0 = (s0 + i0) * qs + h * hd;
        rows_t(q + row0, qs, kt, Lp, hd, jn, scale, p, nq);
        rows_t(dout + row0, qs, vt, Lp, hd, jn, 1.f, ds, nq);
        for (int r = 0; r < nq; r++)
          grad_row(p + (long)r * Lp, ds + (long)r * Lp, i0 + r + 1, jn, lse[(long)h * N + s0 + i0 + r],
                   dot(dout + row0 + r * qs, o + row0 + r * qs, hd));
        w_rows(ds, Lp, kr, ks, hd, n, scale, dq + row0, qs, nq);
        outer_add(ds, Lp, q + row0, qs, hd, n, scale, dka, nq);
        outer_add(p, Lp, dout + row0, qs, hd, n, 1.f, dva, nq);
      }
    for (int j = 0; j < L; j++) {
      memcpy(dk + (s0 + j) * ks + g * hd, dka + (long)j * hd, sizeof(float) * hd);
      memcpy(dv + (s0 + j) * ks + g * hd, dva + (long)j * hd, sizeof(float) * hd);
    }
    free(kt);
  }
  free(tasks); free(start);
}
