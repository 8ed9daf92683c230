/* A decode step's whole stack of decoder blocks in one call, plain (decode_layers, with unmerged LoRA and
   the bank's adapters) or quantized (decode_layers_q), and the layout of the structs it reads. Python:
   rftkit/kernels/decode.py. */
#include <stddef.h>
#include "kernels.h"

/* The attention of a decode step after q/k/v: RoPE on q0 (into q1) and k0, the new keys and values into cache
   rows wrow of the pools kc, vc, then paged attention into att [M, H, hd] (decode_layers and decode_layers_q) */
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
    swiglu_fwd(g, u, g, (long)M * F, nt);
    gemv(g, (const float*)P->wd, (const float*)P->bd, t, M, D, F, nt);
    LORA(6, g, F, t, D)
    for (long i = 0; i < (long)M * D; i++) x[i] += t[i];
  }
}

/* decode_layers for quantized blocks (every layer of one bits and group, each with its
   unmerged LoRA or none): nl blocks for M <= 64 decode rows over a paged cache, in place on x [M, D]; one call
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
    swiglu_fwd(g, u, g, (long)M * F, nt);
    P->down.y = (int64_t)t;
    qlinear_many(g, M, F, bits, sub, 1, &P->down, nt);
    for (long i = 0; i < (long)M * D; i++) x[i] += t[i];
  }
}

/* The layout of the structs Python mirrors with ctypes (tests/test_kernels.py compares them): out[0] = the
   size of struct `which` (0 dlayer, 1 qlayer, 2 qblock), then the offset of each field in declaration order.
   Returns the count written, or -1 for an unknown struct or an n too small. */
#define FIELD(S, f) out[k++] = (int64_t)offsetof(S, f);
int struct_layout(int which, int64_t* out, int n) {
  int k = 0;
  if (n < 32) return -1;
  if (which == 0) {
    out[k++] = sizeof(dlayer);
    FIELD(dlayer, ln1) FIELD(dlayer, wq) FIELD(dlayer, wk) FIELD(dlayer, wv) FIELD(dlayer, bq) FIELD(dlayer, bk)
    FIELD(dlayer, bv) FIELD(dlayer, wo) FIELD(dlayer, bo) FIELD(dlayer, ln2) FIELD(dlayer, wg) FIELD(dlayer, wu)
    FIELD(dlayer, wd) FIELD(dlayer, bg) FIELD(dlayer, bu) FIELD(dlayer, bd) FIELD(dlayer, kc) FIELD(dlayer, vc)
    FIELD(dlayer, la) FIELD(dlayer, lb) FIELD(dlayer, ls) FIELD(dlayer, lr) FIELD(dlayer, window) FIELD(dlayer, pad)
    FIELD(dlayer, bA) FIELD(dlayer, bB) FIELD(dlayer, bT) FIELD(dlayer, bR) FIELD(dlayer, bS)
  } else if (which == 1) {
    out[k++] = sizeof(qlayer);
    FIELD(qlayer, q) FIELD(qlayer, d) FIELD(qlayer, mn) FIELD(qlayer, bias) FIELD(qlayer, A) FIELD(qlayer, B)
    FIELD(qlayer, y) FIELD(qlayer, scale) FIELD(qlayer, r) FIELD(qlayer, N)
  } else if (which == 2) {
    out[k++] = sizeof(qblock);
    FIELD(qblock, ln1) FIELD(qblock, ln2) FIELD(qblock, kc) FIELD(qblock, vc) FIELD(qblock, qkv) FIELD(qblock, o)
    FIELD(qblock, gu) FIELD(qblock, down) FIELD(qblock, window) FIELD(qblock, pad)
  } else {
    return -1;
  }
  return k;
}
#undef FIELD
