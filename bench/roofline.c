/* The machine's compute roof for bench/roofline.py: fp32 FMA throughput (AVX2, 8 lanes), the int8 block
   product our int8 decode kernel runs per 32 weights (maddubs + madd + cvt + FMA), and the int4 tile product
   of the int4 kernel per 8 rows x 32 weights (8 maddubs summed in int16 + madd + cvt + FMA; both in
   rftkit/kernels/qgemm.c), each with independent chains in registers; then the whole int4 and int8 tiles as
   the kernels run them, every op included, hot in L1 (what a kernel could reach if memory were free), on 1..nt
   threads. Built by bench/roofline.py with the system compiler. */
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
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

/* The whole int4 tile as rftkit/kernels/qgemm.c's q4tile runs it at four x rows and group 32, hot in L1: each
   block's 128 bytes of eight weight rows unpacked (4 loads, 4 and, 4 shifts, 4 and), then per x row eight x
   words broadcast from memory, 8 maddubs added in int16, madd, cvt, the two scales' product, the block's FMA
   and the group minimum's FMA: 4 x 256 multiply-adds a block */
/* x's four bytes at p in every 32-bit lane: a broadcast load (no ALU op, where a GPR move and vpbroadcastd cost two) */
#define X4(p) _mm256_castps_si256(_mm256_broadcast_ss((const float*)(p)))
static float int4_kernel(long iters) {
  static uint8_t qb[16 * 128] __attribute__((aligned(64)));
  static int8_t xb[4 * 16 * 32] __attribute__((aligned(64)));
  static float sc[4 * 16 * 3] __attribute__((aligned(64)));
  for (int i = 0; i < 16 * 128; i++) qb[i] = (uint8_t)(i * 37);
  for (int i = 0; i < 4 * 16 * 32; i++) xb[i] = (int8_t)(i * 11 - 60);
  for (int i = 0; i < 4 * 16 * 3; i++) sc[i] = 1e-9f;
  const __m256i m15 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[4];
  for (int m = 0; m < 4; m++) acc[m] = _mm256_setzero_ps();
  for (long it = 0; it < iters; it++) {
    const int b = (int)(it & 15);
    const uint8_t* p = qb + b * 128;
    __asm__ volatile("" : "+r"(p));
    __m256i w[8];
    #pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 * j));
      w[j] = _mm256_and_si256(v, m15);
      w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
    }
    const __m256 dv = _mm256_loadu_ps(sc + b * 8), mv = _mm256_loadu_ps(sc + 64 + b * 8);
    #pragma GCC unroll 4
    for (int m = 0; m < 4; m++) {
      const int8_t* x = xb + (m * 16 + b) * 32;
      __m256i s = _mm256_maddubs_epi16(w[0], X4(x));
      #pragma GCC unroll 8
      for (int t = 1; t < 8; t++) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[t], X4(x + 4 * t)));
      __m256 f = _mm256_mul_ps(dv, _mm256_broadcast_ss(sc + 128 + m * 16 + b));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)), f, acc[m]);
      acc[m] = _mm256_fmadd_ps(mv, _mm256_broadcast_ss(sc + 160 + m * 16 + b), acc[m]);
    }
  }
  return keep(acc, 4);
}

/* The int8 tile as qgemm.c's qtile runs the int8 lm_head at many rows (four x rows against two weight rows, hot
   in L1): per block |w| of the two weight rows, then per pair the sign moved to x, maddubs, madd, cvt and the
   FMA with x's block scale: 8 x 32 multiply-adds a block */
static float int8_kernel(long iters) {
  static int8_t wb[16 * 64] __attribute__((aligned(64)));
  static int8_t xb[4 * 16 * 32] __attribute__((aligned(64)));
  static float sc[4 * 16] __attribute__((aligned(64)));
  for (int i = 0; i < 16 * 64; i++) wb[i] = (int8_t)(i * 37);
  for (int i = 0; i < 4 * 16 * 32; i++) xb[i] = (int8_t)(i * 11 - 60);
  for (int i = 0; i < 4 * 16; i++) sc[i] = 1e-9f;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[8];
  for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
  for (long it = 0; it < iters; it++) {
    const int b = (int)(it & 15);
    const int8_t* p = wb + b * 64;
    __asm__ volatile("" : "+r"(p));
    __m256i w[2], aw[2];
    #pragma GCC unroll 2
    for (int r = 0; r < 2; r++) {
      w[r] = _mm256_loadu_si256((const __m256i*)(p + 32 * r));
      aw[r] = _mm256_sign_epi8(w[r], w[r]);
    }
    #pragma GCC unroll 4
    for (int m = 0; m < 4; m++) {
      __m256i xv = _mm256_loadu_si256((const __m256i*)(xb + (m * 16 + b) * 32));
      __m256 s = _mm256_broadcast_ss(sc + m * 16 + b);
      #pragma GCC unroll 2
      for (int r = 0; r < 2; r++) {
        __m256i q = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, w[r])), ones);
        acc[m * 2 + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, acc[m * 2 + r]);
      }
    }
  }
  return keep(acc, 8);
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
           q4 = rate(int4_tiles, 10000000, t, 4 * 256), k4 = rate(int4_kernel, 10000000, t, 4 * 256),
           k8 = rate(int8_kernel, 20000000, t, 8 * 32);
    printf("threads %d: fp32 FMA %.1f GFLOP/s (%.1f GMAC/s); int8 block product %.1f GMAC/s; int4 tile product "
           "%.1f GMAC/s; whole tiles (hot in L1): int4 kernel %.1f GMAC/s (%.2fx fp32 FMA), int8 head kernel %.1f "
           "GMAC/s (%.2fx)\n", t, f, f / 2, q, q4, k4, k4 / (f / 2), k8, k8 / (f / 2));
  }
  return 0;
}
