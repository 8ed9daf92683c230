/* The machine's compute roof for bench/roofline.py: fp32 FMA throughput (AVX2, 8 lanes), the int8 block
   product our int8 decode kernel runs per 32 weights (maddubs + madd + cvt + FMA), and the int4 tile product
   of the int4 kernel per 8 rows x 32 weights (8 maddubs summed in int16 + madd + cvt + FMA; both in
   rftkit/kernels/qgemm.c), each with independent chains in registers, on 1..nt threads. Built by
   bench/roofline.py with the system compiler. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>

/* lane 0 of the sum of n accumulators: kept, so that the compiler cannot drop the chains */
static float keep(const __m256* a, int n) {
  __m256 s = a[0];
  for (int i = 1; i < n; i++) s = _mm256_add_ps(s, a[i]);
  float f[8];
  _mm256_storeu_ps(f, s);
  return f[0];
}

/* Each probe runs its chains for iters iterations on the calling thread and returns lane 0 of their sum (kept,
   so that the compiler cannot drop them). */

/* 12 independent 8-lane FMA chains: 12 x 8 FMAs an iteration */
static float fma_chains(long iters) {
  __m256 a[12], b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(0.001f);
  for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
  for (long it = 0; it < iters; it++) {
    #pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
    __asm__ volatile("" : "+x"(b));
  }
  return keep(a, 12);
}

/* the int8 block product (32 multiply-adds each) with 8 independent accumulators: 8 x 32 an iteration */
static float int8_blocks(long iters) {
  __m256i w[4], x[2], ones = _mm256_set1_epi16(1);
  __m256 acc[8], s = _mm256_set1_ps(1e-9f);
  for (int i = 0; i < 4; i++) w[i] = _mm256_set1_epi8((char)(i + 1));
  for (int i = 0; i < 2; i++) x[i] = _mm256_set1_epi8((char)(i + 3));
  for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
  for (long it = 0; it < iters; it++) {
    #pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
      __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w[i & 3], x[i >> 2]), ones);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[i]);
    }
    __asm__ volatile("" : "+x"(w[0]), "+x"(x[0]));
  }
  return keep(acc, 8);
}

/* the int4 tile product (8 maddubs added in int16, madd, cvt, FMA: 8 x 32 multiply-adds), four x rows against
   eight weight vectors, as the kernel's tile of 4 x rows runs it: 4 x 256 an iteration */
static float int4_tiles(long iters) {
  __m256i w[8], x[4], ones = _mm256_set1_epi16(1);
  __m256 acc[4], s = _mm256_set1_ps(1e-9f);
  for (int i = 0; i < 8; i++) w[i] = _mm256_set1_epi8((char)(i + 1));
  for (int i = 0; i < 4; i++) { x[i] = _mm256_set1_epi8((char)(i + 3)); acc[i] = _mm256_setzero_ps(); }
  for (long it = 0; it < iters; it++) {
    __asm__ volatile("" : "+x"(x[0]), "+x"(x[1]), "+x"(x[2]), "+x"(x[3]));
    #pragma GCC unroll 4
    for (int m = 0; m < 4; m++) {
      __m256i p = _mm256_maddubs_epi16(w[0], x[m]);
      #pragma GCC unroll 8
      for (int t = 1; t < 8; t++) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w[t], x[m]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), s, acc[m]);
    }
  }
  return keep(acc, 4);
}

/* billions of `per_iter` units a second of probe f on nt threads */
static double rate(float (*f)(long), long iters, int nt, double per_iter) {
  double t0 = omp_get_wtime();
  float sink = 0.f;
  #pragma omp parallel num_threads(nt) reduction(+:sink)
  sink += f(iters);
  double dt = omp_get_wtime() - t0;
  if (sink == 12345.f) printf("%g", sink);
  return (double)nt * iters * per_iter / dt / 1e9;
}

int main(int argc, char** argv) {
  int nt = argc > 1 ? atoi(argv[1]) : 2;
  for (int t = 1; t <= nt; t++) {
    rate(fma_chains, 20000000, t, 1);                    /* warm-up: clocks up */
    double f = rate(fma_chains, 100000000, t, 12 * 16), q = rate(int8_blocks, 50000000, t, 8 * 32),
           q4 = rate(int4_tiles, 10000000, t, 4 * 256);
    printf("threads %d: fp32 FMA %.1f GFLOP/s (%.1f GMAC/s); int8 block product %.1f GMAC/s; int4 tile product "
           "%.1f GMAC/s\n", t, f, f / 2, q, q4);
  }
  return 0;
}
