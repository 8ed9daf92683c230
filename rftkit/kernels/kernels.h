/* rftkit's CPU kernels: the one header. Every entry point the library exports and every struct Python mirrors
   (rftkit/kernels/decode.py, qgemm.py; tests/test_kernels.py checks the mirrors against struct_layout), plus
   the small inline helpers several families share. fp32, AVX2 + FMA (16-lane AVX-512 paths where noted),
   OpenMP; built as one shared library by rftkit/kernels/build.py. */
#ifndef RFTKIT_KERNELS_H
#define RFTKIT_KERNELS_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>
#include <omp.h>

/* ---------------------------------------------------------------------------------------------------------
   structs */

/* One decoder block's weights for decode_layers: addresses, 0 for an absent bias (mirrored by
   rftkit.kernels.DecodeLayer). kc, vc: the block's paged cache, [slots, Hkv, hd]. */
typedef struct {
  int64_t ln1, wq, wk, wv, bq, bk, bv, wo, bo, ln2, wg, wu, wd, bg, bu, bd, kc, vc;
  int64_t la[7], lb[7];          /* unmerged LoRA of q, k, v, o, gate, up, down: A [r, K], B [N, r]; 0 = none */
  float ls[7];                   /* its scale */
  int32_t lr[7];                 /* its rank, <= 64 */
  int32_t window, pad;
  int64_t bA[7], bB[7], bT[7], bR[7], bS[7];   /* the adapter bank's slot table of each (SlotTable); 0 = none */
} dlayer;


/* One layer of a qlinear_many call (mirrored by rftkit.kernels.QLayer): its tensors' addresses, 0 where absent;
   for int8 layers d holds the row scales and mn is unused; r = 0 for no LoRA. */
typedef struct { int64_t q, d, mn, bias, A, B, y; float scale; int32_t r, N; } qlayer;

/* One decoder block of a quantized model for decode_layers_q (mirrored by rftkit.kernels.QBlock): its norms' weights,
   its paged cache pools, and its seven layers as qlinear_many takes them (output addresses set per call). */
typedef struct {
  int64_t ln1, ln2, kc, vc;
  qlayer qkv[3], o, gu[2], down;
  int32_t window, pad;
} qblock;


/* ---------------------------------------------------------------------------------------------------------
   entry points, by family (the .c file that defines them) */

/* gemv.c: y = x W^T for few rows (8 lanes, or 16 after set_wide(1)), several weights of one x, g @ W */
void set_wide(int on);
void gemv(const float* x, const float* W, const float* bias, float* y, int M, int N, int K, int nt);
void gemv_many(const float* x, const int64_t* W, const int64_t* b, const int64_t* y, const int32_t* N, int nw,
               int M, int K, int nt);
void gemm_nn(const float* g, const float* W, float* y, int M, int N, int K, int nt);
/* rowops.c: a decode step's per-row RMSNorm and RoPE */
void rms_norm(const float* x, const float* w, float* y, int M, int D, float eps);
/* swiglu.c: silu(gate) * up and its gradients (the MLP, decode and training) */
void swiglu_fwd(const float* g, const float* u, float* h, long n, int nt);
void swiglu_bwd(const float* dh, const float* g, const float* u, float* dg, float* du, long n, int nt);
void rope(const float* x, const float* cs, const float* sn, float* y, int BT, int n, int hd);
/* attention.c: one query per row over a paged KV cache, read in place */
void paged_attn(const float* q, const float* kc, const float* vc, const int64_t* table, const int64_t* qpos,
                float* out, int B, int H, int Hkv, int hd, int nbmax, int bs, int window, float scale, int nt);
/* bgmv.c: every row's adapter of the bank (Punica BGMV) */
void lora_bgmv(const float* x, float* y, const int32_t* rows, const int64_t* A, const int64_t* Bw,
               const int32_t* Tr, const int32_t* R, const float* s, float* xs, float* tmp, int32_t* idx, int M,
               int K, int N, int Rmax, int S, int nt);
/* softmax.c: sampling and the training log-probs */
void sample_rows(const float* logits, const float* inv_t, const float* u, int64_t* tok, float* logp,
                 int B, int V, int nt);
void softmax_rows(float* z, const int64_t* t, float inv_t, float* logp, float* lse, float* ent, float* s_out,
                  int B, int V, int nt);
/* packed_attention.c: causal attention over packed sequences, forward and backward (training) */
void packed_attn_fwd(const float* q, const float* k, const float* v, float* o, float* lse, const int32_t* lens,
                     int nseq, int N, int H, int Hkv, int hd, float scale, int nt);
void packed_attn_bwd(const float* q, const float* k, const float* v, const float* o, const float* dout,
                     const float* lse, float* dq, float* dk, float* dv, const int32_t* lens, int nseq, int N, int H,
                     int Hkv, int hd, float scale, int nt);
/* qgemm.c: int8 / int4 weight-only layers */
void qlinear_many(const float* x, int M, int K, int bits, int sub, int nl, const qlayer* L, int nt);
void dequant_i4(const uint8_t* q, const float* d, const float* mn, float* w, int n0, int n1, int K, int sub, int nt);
void dequant_i8(const int8_t* q, const float* s, float* w, int n0, int n1, int K, int nt);
/* decode.c: a whole stack of decoder blocks in one call, plain or quantized; the structs' layout */
void decode_layers(float* x, const dlayer* L, int nl, int M, int D, int H, int Hkv, int hd, int F,
                   const float* cs, const float* sn, const int64_t* table, int nbmax, const int64_t* qpos,
                   const int64_t* wrow, int bs, float eps, float scale, float* ws, const int32_t* rows, int rmax,
                   int nslots, float* bxs, float* btmp, int32_t* bidx, int nt);
void decode_layers_q(float* x, qblock* L, int nl, int M, int D, int H, int Hkv, int hd, int F, int bits, int sub,
                     const float* cs, const float* sn, const int64_t* table, int nbmax, const int64_t* qpos,
                     const int64_t* wrow, int bs, float eps, float scale, float* ws, int nt);
int struct_layout(int which, int64_t* out, int n);

/* ---------------------------------------------------------------------------------------------------------
   shared between the files, not exported */

/* 1 after set_wide(1): the GEMV and BGMV kernels run 16 lanes wide (gemv.c) */
extern int kernels_wide __attribute__((visibility("hidden")));

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

/* the 8 horizontal sums of v[0..7], as one vector */
static inline __m256 hsum8(const __m256* v) {
  __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
/* rows [n0, n1) of y[M, N] = x[M, K] @ W[N, K]^T (+ bias), R weight rows at a time; M <= 3, R <= 4 compile-time.
   Each k step loads the M x vectors once and each of the R weight vectors once for M * R FMAs. Every output is
   one 8-lane FMA chain over K and a horizontal sum, whatever M and R are: a row's result does not depend on
   which rows share its call (seeded requests stay batch-invariant). PF (compile-time; 0: none): each tile also
   prefetches columns [klo, khi) of the R rows at pf + (n - n0) K into L2, a line per row every other k step. */
__attribute__((always_inline)) static inline void gemv_tile(const float* x, const float* W, const float* bias, float* y,
                             long n0, long n1, int N, int K, const int M, const int R, const int PF, const float* pf,
                             int klo, int khi) {
  long n = n0;
  for (; n + R <= n1; n += R) {
    __m256 acc[12];
    for (int i = 0; i < M * R; i++) acc[i] = _mm256_setzero_ps();
    const float* w = W + n * K;
    const float* p = PF ? pf + (n - n0) * K : 0;
    for (int k = 0; k < K; k += 8) {
      __m256 xv[3];
      for (int m = 0; m < M; m++) xv[m] = _mm256_loadu_ps(x + (long)m * K + k);
      if (PF && !(k & 15) && k >= klo && k < khi)
        for (int r = 0; r < R; r++) _mm_prefetch((const char*)(p + (long)r * K + k), _MM_HINT_T1);
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

#endif
