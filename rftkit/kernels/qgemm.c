/* int8 / int4 weight-only layers: the decode-row kernel on integer dot products (llama.cpp's Q8_0 x Q8_0
   and Q4_1 x Q8_1) with an unmerged LoRA added in the same call, and row-wise dequantization for many
   rows. Python: rftkit/kernels/qgemm.py. */
#include "kernels.h"

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
/* the horizontal sums of acc[0 .. n), n <= 8, as one vector (hsum8's tree for every output, zeros past n) */
static inline __attribute__((always_inline)) __m256 qsums(const __m256* acc, const int n) {
  __m256 v[8];
  _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) v[i] = i < n ? acc[i] : _mm256_setzero_ps();
  return hsum8(v);
}
/* A tile of outputs of one int8 or int4 layer: x rows m0 .. m0 + MT - 1 against weight rows n .. n + NT - 1
   (MT, NT compile-time, MT * NT <= 8), out[m * NT + r] (8 floats written). Every output is one 8-lane
   accumulator over the blocks in order and one horizontal sum by one tree, whatever the tile: a row's result does not depend on which rows share its call (seeded
   requests stay batch-invariant); tiles of several weight rows give one x row independent FMA chains.
   int8 (w = q * s[n]): sum_b xd[m, b] * (q_b . x8_b), llama.cpp's Q8_0 x Q8_0 (|w| unsigned, its sign on x);
   int4 (w = q * d[n, g] + mn[n, g], group = 32 * sub): sum_b d * xd * (q_b . x8_b) + sum_g mn * (exact sum of
   x over g), llama.cpp's Q4_1 x Q8_1. */
static inline __attribute__((always_inline)) void qtile(int bits, const void* qw, const float* d, const float* mn,
    long n, const int8_t* xq, const float* xd, const float* xg, int m0, int K, int sub, float* sc, float* out,
    const int MT, const int NT) {
  const int B = K / 32, G = K / (32 * sub);
  const __m128i m15 = _mm_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[8];                   /* MT * NT <= 8; fixed sizes: a VLA would live in memory */
  _Pragma("GCC unroll 8") for (int i = 0; i < MT * NT; i++) acc[i] = _mm256_setzero_ps();
  if (bits == 4) {               /* sc[(m NT + r) B + b] = d[n + r, b / sub] * xd[m0 + m, b]: the block's scale */
    for (int m = 0; m < MT; m++) for (int r = 0; r < NT; r++) {
      float* s = sc + (long)(m * NT + r) * B;
      const float* dr = d + (n + r) * G;
      const float* xm = xd + (long)(m0 + m) * B;
      if (sub == 1) for (int b = 0; b < B; b++) s[b] = dr[b] * xm[b];
      else for (int b = 0; b < B; b++) s[b] = dr[b / sub] * xm[b];
    }
    const uint8_t* q = (const uint8_t*)qw;
    for (int b = 0; b < B; b++) {
      __m256i w[4];
      _Pragma("GCC unroll 4") for (int r = 0; r < NT; r++) {
        __m128i qb = _mm_loadu_si128((const __m128i*)(q + (n + r) * K / 2 + b * 16));
        /* low half: k = 0..15 of the block (low nibbles), high half: k = 16..31 */
        w[r] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qb, 4), m15), _mm_and_si128(qb, m15));
      }
      _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (long)(m0 + m) * K + b * 32));
        _Pragma("GCC unroll 4") for (int r = 0; r < NT; r++) {
          __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w[r], xv), ones);
          acc[m * NT + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(sc + (long)(m * NT + r) * B + b),
                                            acc[m * NT + r]);
        }
      }
    }
    __m256 v = qsums(acc, MT * NT);
    _mm256_storeu_ps(out, v);
    _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) _Pragma("GCC unroll 4") for (int r = 0; r < NT; r++)
      out[m * NT + r] += dot(mn + (n + r) * G, xg + (long)(m0 + m) * G, G);
    return;
  }
  const int8_t* q = (const int8_t*)qw;
  for (int b = 0; b < B; b++) {
    __m256i w[4], aw[4];
    _Pragma("GCC unroll 4") for (int r = 0; r < NT; r++) {
      w[r] = _mm256_loadu_si256((const __m256i*)(q + (n + r) * K + b * 32));
      aw[r] = _mm256_sign_epi8(w[r], w[r]);                    /* |w| as unsigned, the sign moved to x */
    }
    _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {
      __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (long)(m0 + m) * K + b * 32));
      __m256 s = _mm256_broadcast_ss(xd + (long)(m0 + m) * B + b);
      _Pragma("GCC unroll 4") for (int r = 0; r < NT; r++) {
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, w[r])), ones);
        acc[m * NT + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[m * NT + r]);
      }
    }
  }
  _mm256_storeu_ps(out, qsums(acc, MT * NT));
  _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) _Pragma("GCC unroll 4") for (int r = 0; r < NT; r++)
    out[m * NT + r] *= d[n + r];
}
/* out [M, NT] for weight rows n .. n + NT - 1: x rows 4 at a time against NT weight rows (1 to 3 x rows, the
   tail, against them too); NT = 4 only for one x row */
#define QTILE_ROWS(NT) \
  for (int m0 = 0; m0 < M; m0 += 4) { \
    float o[8]; int mt = M - m0 < 4 ? M - m0 : 4; \
    if (mt == 4) qtile(bits, q, d, mn, n, xq, xd, xg, m0, K, sub, sc, o, 4, NT); \
    else if (mt == 3) qtile(bits, q, d, mn, n, xq, xd, xg, m0, K, sub, sc, o, 3, NT); \
    else if (mt == 2) qtile(bits, q, d, mn, n, xq, xd, xg, m0, K, sub, sc, o, 2, NT); \
    else qtile(bits, q, d, mn, n, xq, xd, xg, m0, K, sub, sc, o, 1, NT); \
    for (int m = 0; m < mt; m++) for (int r = 0; r < NT; r++) out[(long)(m0 + m) * NT + r] = o[m * NT + r]; \
  }
static void qrows(int bits, const void* q, const float* d, const float* mn, long n, int nt_rows, const int8_t* xq,
                  const float* xd, const float* xg, int M, int K, int sub, float* sc, float* out) {
  if (nt_rows == 4) qtile(bits, q, d, mn, n, xq, xd, xg, 0, K, sub, sc, out, 1, 4);     /* M == 1 */
  else if (nt_rows == 2) { QTILE_ROWS(2) }
  else { QTILE_ROWS(1) }
}
#undef QTILE_ROWS
/* Up to 4 quantized layers of the same bits, group and in_features sharing x [M, K] (q/k/v, gate/up; or one):
   x is rounded to int8 once and every layer's rows run in one parallel loop. Per layer j: y_j[M, N_j] =
   x W_j^T (+ bias_j) (+ scale_j * (x A_j^T) B_j^T, an unmerged LoRA of rank r_j <= 64, r_j = 0 for none).
   Addresses are 0 where absent; for int8 layers d holds the row scales and mn is unused. M <= QLINEAR_MAX_ROWS
   (64), K % 32 == 0. Weight rows go 4 at a time for one x row (independent FMA chains), else 2 (the tiles'
   accumulators and weight vectors fit the 16 registers). */
#define QRUN 16
void qlinear_many(const float* x, int M, int K, int bits, int sub, int nl, const qlayer* L, int nt) {
  int B = K / 32, G = K / (32 * sub);
  int8_t* xq = (int8_t*)malloc((size_t)M * K + 64);
  float* xd = (float*)malloc(sizeof(float) * (2 * (size_t)M * B + (size_t)M * G + (size_t)nl * M * 64));
  float* xs = xd + (size_t)M * B;
  float* xg = xs + (size_t)M * B;
  float* t = xg + (size_t)M * G;            /* t[j, m, :] = scale_j * x[m] A_j^T */
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
      t[((long)j * M + m) * 64 + i] = dot((const float*)L[j].A + (long)i * K, x + (long)m * K, K) * L[j].scale;
  }
  start[nl] = total;
  long runs = (total + QRUN - 1) / QRUN;
  const int NT = M == 1 ? 4 : 2;
  #pragma omp parallel num_threads(nt)
  {
    float* sc = (float*)malloc(sizeof(float) * 8 * (size_t)B);     /* the int4 tile's block scales */
    float* out = (float*)malloc(sizeof(float) * (4 * (size_t)M + 8));
    #pragma omp for schedule(guided, 1)
    for (long c = 0; c < runs; c++) {
      long r0 = c * QRUN, r1 = r0 + QRUN < total ? r0 + QRUN : total;
      for (int j = 0; j < nl; j++) {
        long a = r0 > start[j] ? r0 : start[j], e = r1 < start[j + 1] ? r1 : start[j + 1];
        const float* bj = (const float*)L[j].bias;
        const float* Bj = (const float*)L[j].B;
        float* yj = (float*)L[j].y;
        int rj = L[j].r, Nj = L[j].N;
        for (long n = a - start[j]; n < e - start[j];) {
          int nr = e - start[j] - n >= NT ? NT : 1;
          qrows(bits, (const void*)L[j].q, (const float*)L[j].d, (const float*)L[j].mn, n, nr, xq, xd, xg, M, K,
                sub, sc, out);
          for (int r = 0; r < nr; r++, n++)
            for (int m = 0; m < M; m++) {
              float v = out[(long)m * nr + r] + (bj ? bj[n] : 0.0f);
              if (rj) {
                const float* bn = Bj + n * rj;
                const float* tm = t + ((long)j * M + m) * 64;
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
    free(sc); free(out);
  }
  free(xq); free(xd);
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

