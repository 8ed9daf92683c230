/* Row softmax kernels: inverse-CDF sampling of a decode step and the training log-probs' statistics.
   Python: rftkit/kernels/softmax.py. */
#include "kernels.h"

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
/* Softmax statistics of logits z [B, V] at 1/T = inv_t, in place (the training log-probs, rftkit.logprobs):
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
