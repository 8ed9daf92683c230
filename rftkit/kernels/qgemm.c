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

