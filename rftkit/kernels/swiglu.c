/* SwiGLU's elementwise middle for training: h = silu(g) * u forward, and its gradients, each in one pass over
   the tensors (torch runs silu, a product, and in the backward silu_backward and two products, each a pass over
   [tokens, ffn_dim]). Python: rftkit/kernels/swiglu.py. */
#include "kernels.h"

#define SWIGLU_CHUNK 4096              /* floats a thread takes at a time */

/* 1 + exp(-g) */
static inline __m256 denom256(__m256 g) {
  return _mm256_add_ps(_mm256_set1_ps(1.f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g)));
}

/* h = silu(g) * u over n floats, silu(g) = g / (1 + exp(-g)); h may be g (in place: the decode stack) */
void swiglu_fwd(const float* g, const float* u, float* h, long n, int nt) {
  long chunks = (n + SWIGLU_CHUNK - 1) / SWIGLU_CHUNK;
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (long c = 0; c < chunks; c++) {
    long i = c * SWIGLU_CHUNK, e = i + SWIGLU_CHUNK < n ? i + SWIGLU_CHUNK : n;
    for (; i + 8 <= e; i += 8) {
      __m256 gv = _mm256_loadu_ps(g + i);
      _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_div_ps(gv, denom256(gv)), _mm256_loadu_ps(u + i)));
    }
    for (; i < e; i++) h[i] = g[i] / (1.f + expf(-g[i])) * u[i];
  }
}

/* The gradients of h = silu(g) * u for dh: dg = dh * u * s * (1 + g * (1 - s)) with s = sigmoid(g), du = dh *
   silu(g); either output may be 0 (not wanted) */
void swiglu_bwd(const float* dh, const float* g, const float* u, float* dg, float* du, long n, int nt) {
  long chunks = (n + SWIGLU_CHUNK - 1) / SWIGLU_CHUNK;
  const __m256 one = _mm256_set1_ps(1.f);
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (long c = 0; c < chunks; c++) {
    long i = c * SWIGLU_CHUNK, e = i + SWIGLU_CHUNK < n ? i + SWIGLU_CHUNK : n;
    for (; i + 8 <= e; i += 8) {
      __m256 gv = _mm256_loadu_ps(g + i), d = _mm256_loadu_ps(dh + i);
      __m256 s = _mm256_div_ps(one, denom256(gv)), a = _mm256_mul_ps(gv, s);
      if (du) _mm256_storeu_ps(du + i, _mm256_mul_ps(d, a));
      if (dg) {
        __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one));
        _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u + i)), ds));
      }
    }
    for (; i < e; i++) {
      float s = 1.f / (1.f + expf(-g[i]));
      if (du) du[i] = dh[i] * (g[i] * s);
      if (dg) dg[i] = dh[i] * u[i] * (s * (1.f + g[i] * (1.f - s)));
    }
  }
}
