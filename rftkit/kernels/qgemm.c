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
/* A tile of outputs of one int8 layer: x rows m0 .. m0 + MT - 1 against weight rows n .. n + NT - 1 (MT, NT
   compile-time, MT * NT <= 8), out[m * NT + r] (8 floats written). Every output is one 8-lane accumulator over
   the blocks in order and one horizontal sum by one tree, whatever the tile: a row's result does not depend on
   which rows share its call (seeded requests stay batch-invariant); tiles of several weight rows give one x row
   independent FMA chains. w = q * s[n]: sum_b xd[m, b] * (q_b . x8_b), llama.cpp's Q8_0 x Q8_0 (|w| unsigned,
   its sign on x). */
static inline __attribute__((always_inline)) void qtile(const int8_t* q, const float* d, long n, const int8_t* xq,
    const float* xd, int m0, int K, float* out, const int MT, const int NT) {
  const int B = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[8];                   /* MT * NT <= 8; fixed sizes: a VLA would live in memory */
  _Pragma("GCC unroll 8") for (int i = 0; i < MT * NT; i++) acc[i] = _mm256_setzero_ps();
  for (int b = 0; b < B; b++) {
    __m256i w[4], aw[4];
    if (m0 == 0 && !(b & 1))         /* the next weight rows, a cache line each, while these are multiplied */
      _Pragma("GCC unroll 4") for (int r = 0; r < NT; r++)
        _mm_prefetch((const char*)(q + (n + NT + r) * K + b * 32), _MM_HINT_T0);
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
/* out [M, NT] for int8 weight rows n .. n + NT - 1: x rows 4 at a time against NT weight rows (1 to 3 x rows,
   the tail, against them too); NT = 4 only for one x row */
#define QTILE_ROWS(NT) \
  for (int m0 = 0; m0 < M; m0 += 4) { \
    float o[8]; int mt = M - m0 < 4 ? M - m0 : 4; \
    if (mt == 4) qtile(q, d, n, xq, xd, m0, K, o, 4, NT); \
    else if (mt == 3) qtile(q, d, n, xq, xd, m0, K, o, 3, NT); \
    else if (mt == 2) qtile(q, d, n, xq, xd, m0, K, o, 2, NT); \
    else qtile(q, d, n, xq, xd, m0, K, o, 1, NT); \
    for (int m = 0; m < mt; m++) for (int r = 0; r < NT; r++) out[(long)(m0 + m) * NT + r] = o[m * NT + r]; \
  }
static void qrows(const int8_t* q, const float* d, long n, int nt_rows, const int8_t* xq, const float* xd, int M,
                  int K, float* out) {
  if (nt_rows == 4) qtile(q, d, n, xq, xd, 0, K, out, 1, 4);     /* M == 1 */
  else if (nt_rows == 2) { QTILE_ROWS(2) }
  else { QTILE_ROWS(1) }
}
#undef QTILE_ROWS
/* int4, repacked for this kernel (rftkit.compress.quantize.repack_int4): weight rows in tiles of 8 (N padded
   with zero rows to a multiple of 8). Per tile and block of 32 inputs, 128 bytes: 4-byte word j * 8 + i holds
   row i's bytes 4j .. 4j + 3 of the block (the stored layout's: low nibbles inputs 4j .. 4j + 3, high nibbles
   16 + 4j .. 16 + 4j + 3); then d, mn [tiles, G, 8]. Unpacked, vector t (0..7) has in lane i row i's four
   weights of inputs 4t .. 4t + 3, so one vpmaddubsw against x's 4 bytes broadcast serves 8 rows, eight of them
   add up in int16 (each lane two products of at most 15 * 128, eight such 30,720 < 32,767: exact), and one vpmaddwd, one conversion and one FMA finish a
   block for 8 outputs (llama.cpp's repacked Q4 gemm does the same). A tile of MT x rows (compile-time, <= 4)
   reuses the unpacked weights. res[m] = the 8 outputs of x row m0 + m: sum over groups of (sum over the
   group's blocks of d * xd * (q_b . x8_b)) + mn * (the exact sum of x over the group), in that order for every
   tile: batch-invariant. */
#define QPF 1024                     /* how far ahead the int4 kernel prefetches its weights, in bytes */
static inline __attribute__((always_inline)) void q4tile(const uint8_t* qp, const float* dp, const float* mp,
    const int8_t* xq, const float* xd, const float* xg, int m0, int K, int sub, const float* bt, const float* t,
    int r, __m256* res, const int MT) {
  const int B = K / 32, G = B / sub;
  const __m256i m15 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[4];
  _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    const __m256 dv = _mm256_loadu_ps(dp + g * 8);
    for (int b = g * sub; b < (g + 1) * sub; b++) {
      const uint8_t* p = qp + (long)b * 128;
      __m256i w[8];
      if (m0 == 0) {                 /* tiles lie one after another: the bytes QPF ahead, on the first x tile */
        _mm_prefetch((const char*)(p + QPF), _MM_HINT_T0);
        _mm_prefetch((const char*)(p + QPF + 64), _MM_HINT_T0);
      }
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 * j));
        w[j] = _mm256_and_si256(v, m15);
        w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
      }
      _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {
        const int8_t* xb = xq + (long)(m0 + m) * K + b * 32;
        int32_t x4;
        memcpy(&x4, xb, 4);
        __m256i s = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(x4));
        _Pragma("GCC unroll 8") for (int t = 1; t < 8; t++) {
          memcpy(&x4, xb + 4 * t, 4);
          s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[t], _mm256_set1_epi32(x4)));
        }
        __m256 sc = _mm256_mul_ps(dv, _mm256_broadcast_ss(xd + (long)(m0 + m) * B + b));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)), sc, acc[m]);
      }
    }
    const __m256 mv = _mm256_loadu_ps(mp + g * 8);
    _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++)
      acc[m] = _mm256_fmadd_ps(mv, _mm256_broadcast_ss(xg + (long)(m0 + m) * G + g), acc[m]);
  }
  _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) res[m] = acc[m];
  if (!r) return;
  /* the LoRA: lo[m] = sum_i bt[i] * t[m, i], even and odd i in two chains (2 MT independent FMA chains) */
  __m256 lo[4], le[4];
  _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) lo[m] = le[m] = _mm256_setzero_ps();
  int i = 0;
  for (; i + 2 <= r; i += 2) {
    const __m256 b0 = _mm256_loadu_ps(bt + i * 8), b1 = _mm256_loadu_ps(bt + i * 8 + 8);
    _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {
      const float* tm = t + (long)(m0 + m) * 64 + i;
      le[m] = _mm256_fmadd_ps(b0, _mm256_broadcast_ss(tm), le[m]);
      lo[m] = _mm256_fmadd_ps(b1, _mm256_broadcast_ss(tm + 1), lo[m]);
    }
  }
  if (i < r) {
    const __m256 b0 = _mm256_loadu_ps(bt + i * 8);
    _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++)
      le[m] = _mm256_fmadd_ps(b0, _mm256_broadcast_ss(t + (long)(m0 + m) * 64 + i), le[m]);
  }
  _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) res[m + 4] = _mm256_add_ps(le[m], lo[m]);
}
/* bt[i * 8 + l] = B[n + l, i] for i < r, l < 8 (zeros past row N): a LoRA B's 8 rows, transposed, so each of
   the tile's x rows adds its LoRA with r FMAs of 8 lanes */
static void lora_bt(const float* B, long n, int N, int r, float* bt) {
  int i = 0;
  if (n + 8 <= N)
    for (; i + 8 <= r; i += 8) {
      __m256 v[8];
      _Pragma("GCC unroll 8") for (int l = 0; l < 8; l++) v[l] = _mm256_loadu_ps(B + (n + l) * r + i);
      __m256 a0 = _mm256_unpacklo_ps(v[0], v[1]), a1 = _mm256_unpackhi_ps(v[0], v[1]);
      __m256 a2 = _mm256_unpacklo_ps(v[2], v[3]), a3 = _mm256_unpackhi_ps(v[2], v[3]);
      __m256 a4 = _mm256_unpacklo_ps(v[4], v[5]), a5 = _mm256_unpackhi_ps(v[4], v[5]);
      __m256 a6 = _mm256_unpacklo_ps(v[6], v[7]), a7 = _mm256_unpackhi_ps(v[6], v[7]);
      __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
      __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
      __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
      __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
      float* o = bt + i * 8;
      _mm256_storeu_ps(o, _mm256_permute2f128_ps(b0, b4, 0x20));
      _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(b1, b5, 0x20));
      _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(b2, b6, 0x20));
      _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(b3, b7, 0x20));
      _mm256_storeu_ps(o + 32, _mm256_permute2f128_ps(b0, b4, 0x31));
      _mm256_storeu_ps(o + 40, _mm256_permute2f128_ps(b1, b5, 0x31));
      _mm256_storeu_ps(o + 48, _mm256_permute2f128_ps(b2, b6, 0x31));
      _mm256_storeu_ps(o + 56, _mm256_permute2f128_ps(b3, b7, 0x31));
    }
  for (; i < r; i++)
    for (int l = 0; l < 8; l++) bt[i * 8 + l] = n + l < N ? B[(n + l) * r + i] : 0.0f;
}
/* y[:, n .. n + 8) of one int4 layer (its tile n / 8), every x row, with bias and LoRA (t: scale * x A^T) */
static void q4rows(const qlayer* L, long n, const int8_t* xq, const float* xd, const float* xg, const float* t,
                   int M, int K, int sub, float* bt) {
  const int B = K / 32, G = B / sub, N = L->N, r = L->r;
  const long tile = n / 8;
  const uint8_t* qp = (const uint8_t*)L->q + tile * B * 128;
  const float *dp = (const float*)L->d + tile * G * 8, *mp = (const float*)L->mn + tile * G * 8;
  const float* bias = (const float*)L->bias;
  float* y = (float*)L->y;
  float bb[8] = {0};
  if (bias) for (int l = 0; l < 8 && n + l < N; l++) bb[l] = bias[n + l];
  if (r) lora_bt((const float*)L->B, n, N, r, bt);
  for (int m0 = 0; m0 < M; m0 += 4) {
    __m256 res[8];                         /* res[m]: the product; res[m + 4]: the LoRA (with r) */
    int mt = M - m0 < 4 ? M - m0 : 4;
    if (mt == 4) q4tile(qp, dp, mp, xq, xd, xg, m0, K, sub, bt, t, r, res, 4);
    else if (mt == 3) q4tile(qp, dp, mp, xq, xd, xg, m0, K, sub, bt, t, r, res, 3);
    else if (mt == 2) q4tile(qp, dp, mp, xq, xd, xg, m0, K, sub, bt, t, r, res, 2);
    else q4tile(qp, dp, mp, xq, xd, xg, m0, K, sub, bt, t, r, res, 1);
    for (int m = 0; m < mt; m++) {
      __m256 v = _mm256_add_ps(res[m], _mm256_loadu_ps(bb));
      if (r) v = _mm256_add_ps(v, res[m + 4]);
      float o[8];
      _mm256_storeu_ps(o, v);
      float* ym = y + (long)(m0 + m) * N + n;
      for (int l = 0; l < 8 && n + l < N; l++) ym[l] = o[l];
    }
  }
}
/* out[i] = scale * dot(A_i, x) for i < n <= 4 rows of a LoRA A [.., K]: the x loads shared, each dot summed
   as dot() sums it (kernels.h: two 8-lane chains, then the tail), so the value does not depend on n */
static void lora_shrink(const float* A, const float* x, int K, int n, float scale, float* out) {
  __m256 s0[4], s1[4];
  for (int i = 0; i < 4; i++) s0[i] = s1[i] = _mm256_setzero_ps();
  int k = 0;
  if (n == 4)
    for (; k + 16 <= K; k += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
        s0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(A + (long)i * K + k), x0, s0[i]);
        s1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(A + (long)i * K + k + 8), x1, s1[i]);
      }
    }
  for (int i = 0; i < n; i++) {
    if (n < 4) { out[i] = dot(A + (long)i * K, x, K) * scale; continue; }
    float r = hsum(_mm256_add_ps(s0[i], s1[i]));
    for (int kk = k; kk < K; kk++) r += A[(long)i * K + kk] * x[kk];
    out[i] = r * scale;
  }
}
/* Up to 4 quantized layers of the same bits, group and in_features sharing x [M, K] (q/k/v, gate/up; or one):
   x is rounded to int8 once and every layer's rows run in one parallel loop. Per layer j: y_j[M, N_j] =
   x W_j^T (+ bias_j) (+ scale_j * (x A_j^T) B_j^T, an unmerged LoRA of rank r_j <= 64, r_j = 0 for none).
   Addresses are 0 where absent; for int8 layers d holds the row scales and mn is unused; int4 layers are in
   the repacked layout above. M <= QLINEAR_MAX_ROWS (64), K % 32 == 0. int8 weight rows go 4 at a time for one
   x row (independent FMA chains), else 2 (the tiles' accumulators and weight vectors fit the 16 registers);
   int4 rows 8 at a time. */
#define QRUN 16
void qlinear_many(const float* x, int M, int K, int bits, int sub, int nl, const qlayer* L, int nt) {
  int B = K / 32, G = K / (32 * sub);
  int8_t* xq = (int8_t*)malloc((size_t)M * K + 64);
  float* xd = (float*)malloc(sizeof(float) * (2 * (size_t)M * B + (size_t)M * G + (size_t)nl * M * 64));
  float* xs = xd + (size_t)M * B;
  float* xg = xs + (size_t)M * B;
  float* t = xg + (size_t)M * G;            /* t[j, m, :] = scale_j * x[m] A_j^T */
  long total = 0, start[5], lo_rows = 0, lo_start[5];   /* rows of all layers; LoRA items (layer, x row, 4 ranks) */
  for (int j = 0; j < nl; j++) {
    start[j] = total; total += bits == 4 ? (L[j].N + 7) / 8 * 8 : L[j].N;
    lo_start[j] = lo_rows; lo_rows += (long)M * ((L[j].r + 3) / 4);
  }
  start[nl] = total; lo_start[nl] = lo_rows;
  long runs = (total + QRUN - 1) / QRUN;
  const int NT = M == 1 ? 4 : 2;
  #pragma omp parallel num_threads(nt)
  {
    #pragma omp for schedule(static) nowait
    for (int m = 0; m < M; m++) {                 /* x rounded to int8, and its sums per group */
      quant_x8(x + (long)m * K, 1, K, xq + (long)m * K, xd + (long)m * B, xs + (long)m * B);
      for (int g = 0; g < G; g++) {
        float s = 0.0f;
        for (int i = 0; i < sub; i++) s += xs[(long)m * B + g * sub + i];
        xg[(long)m * G + g] = s;
      }
    }
    #pragma omp for schedule(static)
    for (long c = 0; c < lo_rows; c++) {          /* the LoRAs' x A^T: items of up to 4 ranks of one x row */
      int j = 0;
      while (c >= lo_start[j + 1]) j++;
      long k = c - lo_start[j], g4 = (L[j].r + 3) / 4;
      int m = (int)(k / g4), i = (int)(k % g4) * 4, n4 = L[j].r - i < 4 ? L[j].r - i : 4;
      lora_shrink((const float*)L[j].A + (long)i * K, x + (long)m * K, K, n4, L[j].scale,
                  t + ((long)j * M + m) * 64 + i);
    }
    float* out = (float*)malloc(sizeof(float) * (4 * (size_t)M + 8 * 64 + 8));   /* int8 tile; int4 B^T */
    #pragma omp for schedule(guided, 1)
    for (long c = 0; c < runs; c++) {
      long r0 = c * QRUN, r1 = r0 + QRUN < total ? r0 + QRUN : total;
      for (int j = 0; j < nl; j++) {
        long a = r0 > start[j] ? r0 : start[j], e = r1 < start[j + 1] ? r1 : start[j + 1];
        if (bits == 4) {
          for (long n = a - start[j]; n < e - start[j]; n += 8)
            q4rows(L + j, n, xq, xd, xg, t + (long)j * M * 64, M, K, sub, out);
          continue;
        }
        const float* bj = (const float*)L[j].bias;
        const float* Bj = (const float*)L[j].B;
        float* yj = (float*)L[j].y;
        int rj = L[j].r, Nj = L[j].N;
        for (long n = a - start[j]; n < e - start[j];) {
          int nr = e - start[j] - n >= NT ? NT : 1;
          qrows((const int8_t*)L[j].q, (const float*)L[j].d, n, nr, xq, xd, M, K, out);
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
    free(out);
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

