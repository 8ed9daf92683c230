/* Decode attention: one query per row over the paged KV cache, read in place. Python:
   rftkit/kernels/attention.py. */
#include "kernels.h"

/* One query per row over a paged cache, read in place. q [B, H, hd]; kc, vc [slots, Hkv, hd] (token-major
   pool: cache row of position t of batch row b = table[b, t / bs] * bs + t % bs); qpos [B]: the query's
   position, keys t in [max(0, qpos - window + 1), qpos] (window 0 = all); out [B, H, hd]. Online softmax
   over chunks of 64 keys; one task per (row, kv head), its G = H / Hkv query heads share each key and value
   load, a row's heads dealt to one thread in turn. A decode batch's keys and values are scattered blocks the
   hardware prefetcher does not follow: each key prefetches the key PD positions ahead and its own value
   (64 rows x 101 positions x 30 layers: 22 -> 14 ms). A row's first head prefetches the whole token rows
   (every head's key and value lines), and the row's other heads, next on the same thread, read them from
   cache: one stream of whole rows instead of three interleaved partial ones (30 layers of 64 rows x 101
   positions out of memory, 768-byte rows: 1.08-1.14x). A thread claims its next row when it starts one (a
   shared counter: as balanced as a dynamic schedule, where a static one measured 0.93x), and the row's later
   heads, which compute from cache, prefetch the next row's token rows into L2 meanwhile (1.03-1.09x more).
   hd % 8 == 0, hd <= 256, G <= 16. */
#define CH 64
#define PD 16                                               /* keys ahead a key prefetches */
#define WIDE 512                    /* a row's first head prefetches all heads' lines up to this many floats */
void paged_attn(const float* q, const float* kc, const float* vc, const int64_t* table, const int64_t* qpos,
                float* out, int B, int H, int Hkv, int hd, int nbmax, int bs, int window, float scale, int nt) {
  const int G = H / Hkv, D8 = hd / 8;
  const long row = (long)Hkv * hd;                       /* floats between consecutive tokens of the pool */
  int next = 0;                                          /* rows are claimed one ahead: the row a thread */
  #pragma omp parallel num_threads(nt)                   /* takes next is known while it works on this one */
  {
    int b, bn;
    #pragma omp atomic capture
    b = next++;
    for (; b < B; b = bn) {
      #pragma omp atomic capture
      bn = next++;
      for (int h = 0; h < Hkv; h++) {
        long p = qpos[b];
        float* o = out + ((long)b * H + (long)h * G) * hd;
        if (p < 0) { for (int i = 0; i < G * hd; i++) o[i] = 0.f; continue; }
        long t0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        /* the row this thread takes next: the heads after the first, whose keys come from cache, fetch its whole
           token rows into L2 meanwhile, a share each, spread over their keys */
        const long L = p - t0 + 1;
        const int64_t* tbn = table + (long)bn * nbmax;
        long nx0 = 0, share = 0, issued = 0;
        if (h > 0 && row <= WIDE && bn < B && qpos[bn] >= 0) {
          long pn = qpos[bn], t0n = window > 0 && pn - window + 1 > 0 ? pn - window + 1 : 0, Ln = pn - t0n + 1;
          nx0 = t0n + Ln * (h - 1) / (Hkv - 1);
          share = t0n + Ln * h / (Hkv - 1) - nx0;
        }
        const float* qh = q + ((long)b * H + (long)h * G) * hd;
        const int64_t* tb = table + (long)b * nbmax;
        float mx[16], l[16], sc[16][CH] __attribute__((aligned(32)));
        float acc[16][256] __attribute__((aligned(32)));
        const float* kp[CH]; const float* vp[CH];
        for (int g = 0; g < G; g++) { mx[g] = -INFINITY; l[g] = 0.f; for (int d = 0; d < hd; d++) acc[g][d] = 0.f; }
        long blk = t0 / bs, off = t0 % bs;
        for (long c0 = t0; c0 <= p; c0 += CH) {
          int n = p - c0 + 1 < CH ? (int)(p - c0 + 1) : CH;
          for (int j = 0; j < n; j++) {                       /* the chunk's key/value rows, walking the blocks */
            long r = (tb[blk] * bs + off) * row + (long)h * hd;
            kp[j] = kc + r; vp[j] = vc + r;
            if (++off == bs) { off = 0; blk++; }
          }
          for (int j = 0; j < n; j++) {
            long ta = c0 + j + PD;                            /* this head's lines of key ta and value c0 + j: */
            if (h == 0 && row <= WIDE) {                      /* the row's first head fetches every head's */
              if (ta <= p) {                                  /* lines of the key and value rows, so the next */
                long ra = (tb[ta / bs] * bs + ta % bs) * row; /* heads (the same thread) find them in cache */
                for (long d = 0; d < row; d += 16) {
                  _mm_prefetch((const char*)(kc + ra + d), _MM_HINT_T0);
                  _mm_prefetch((const char*)(vc + ra + d), _MM_HINT_T1);
                }
              }
            } else if (ta <= p) {
              const float* ka = kc + (tb[ta / bs] * bs + ta % bs) * row + (long)h * hd;
              for (int d = 0; d < hd; d += 16) _mm_prefetch((const char*)(ka + d), _MM_HINT_T0);
            }
            for (int d = 0; d < hd; d += 16) _mm_prefetch((const char*)(vp[j] + d), _MM_HINT_T0);
            if (share) {
              long a = c0 + j - t0, want = 2 * a >= L - 1 ? share : 2 * (a + 1) * share / L;
              for (; issued < want; issued++) {
                long tn = nx0 + issued, rn = (tbn[tn / bs] * bs + tn % bs) * row;
                for (long d = 0; d < row; d += 16) {
                  _mm_prefetch((const char*)(kc + rn + d), _MM_HINT_T1);
                  _mm_prefetch((const char*)(vc + rn + d), _MM_HINT_T1);
                }
              }
            }
            if (j % 8 == 7)                                   /* eight keys' scores share one reduction */
              for (int g = 0; g < G; g++) {
                __m256 a[8];
                for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
                for (int d = 0; d < hd; d += 8) {
                  __m256 qv = _mm256_loadu_ps(qh + (long)g * hd + d);
                  for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[j - 7 + i] + d), a[i]);
                }
                _mm256_store_ps(&sc[g][j - 7], _mm256_mul_ps(hsum8(a), _mm256_set1_ps(scale)));
              }
          }
          for (int j = n / 8 * 8; j < n; j++)
            for (int g = 0; g < G; g++) sc[g][j] = dot(qh + (long)g * hd, kp[j], hd) * scale;
          for (int g = 0; g < G; g++) {
            float cm = mx[g];
            for (int j = 0; j < n; j++) cm = sc[g][j] > cm ? sc[g][j] : cm;
            float f = mx[g] == -INFINITY ? 0.f : expf(mx[g] - cm);
            mx[g] = cm;
            __m256 cv = _mm256_set1_ps(cm), sum = _mm256_setzero_ps();
            int j = 0;
            for (; j + 8 <= n; j += 8) {
              __m256 e = exp256(_mm256_sub_ps(_mm256_load_ps(&sc[g][j]), cv));
              _mm256_store_ps(&sc[g][j], e);
              sum = _mm256_add_ps(sum, e);
            }
            float ls = hsum(sum);
            for (; j < n; j++) { sc[g][j] = expf(sc[g][j] - cm); ls += sc[g][j]; }
            l[g] = l[g] * f + ls;
            if (f != 1.f) { __m256 fv = _mm256_set1_ps(f); for (int d = 0; d < D8; d++) _mm256_store_ps(&acc[g][d * 8], _mm256_mul_ps(_mm256_load_ps(&acc[g][d * 8]), fv)); }
          }
          for (int d = 0; d < D8; d += 2) {                   /* acc[g] += p[g, j] * v_j: 4 heads x 16 lanes per */
            for (int g0 = 0; g0 < G; g0 += 4) {               /* pass, 8 FMA chains (4 were latency-bound) */
              int gn = G - g0 < 4 ? G - g0 : 4, two = d + 1 < D8;
              __m256 a[8];
              for (int i = 0; i < 8; i++) a[i] = _mm256_load_ps(&acc[g0 + (i % 4 < gn ? i % 4 : 0)][(d + (two ? i / 4 : 0)) * 8]);
              for (int j = 0; j < n; j++) {
                __m256 v0 = _mm256_loadu_ps(vp[j] + d * 8), v1 = two ? _mm256_loadu_ps(vp[j] + d * 8 + 8) : v0;
                for (int i = 0; i < 4; i++)
                  if (i < gn) {
                    __m256 pj = _mm256_set1_ps(sc[g0 + i][j]);
                    a[i] = _mm256_fmadd_ps(pj, v0, a[i]);
                    a[4 + i] = _mm256_fmadd_ps(pj, v1, a[4 + i]);
                  }
              }
              for (int i = 0; i < gn; i++) {
                _mm256_store_ps(&acc[g0 + i][d * 8], a[i]);
                if (two) _mm256_store_ps(&acc[g0 + i][d * 8 + 8], a[4 + i]);
              }
            }
          }
        }
        for (int g = 0; g < G; g++) {
          __m256 inv = _mm256_set1_ps(1.f / l[g]);
          for (int d = 0; d < D8; d++) _mm256_storeu_ps(o + (long)g * hd + d * 8, _mm256_mul_ps(_mm256_load_ps(&acc[g][d * 8]), inv));
        }
      }
    }
  }
}
