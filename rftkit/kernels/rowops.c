/* The per-row RMSNorm and RoPE of a decode step (single-threaded: at a few rows dispatch dominates).
   Python: rftkit/kernels/rowops.py. */
#include "kernels.h"

/* y[m] = w * x[m] / sqrt(mean(x[m]^2) + eps); x, y [M, D] */
void rms_norm(const float* x, const float* w, float* y, int M, int D, float eps) {
  for (int m = 0; m < M; m++) {
    const float* xr = x + (long)m * D;
    float* yr = y + (long)m * D;
    float r = 1.f / sqrtf(dot(xr, xr, D) / D + eps);
    for (int d = 0; d < D; d++) yr[d] = w[d] * (xr[d] * r);
  }
}

/* Rotary embedding, rotate-half convention: x [BT, n, hd], cos, sin [BT, hd] -> y = x cos + rot(x) sin,
   rot(x) = (-x[hd/2:], x[:hd/2]) */
void rope(const float* x, const float* cs, const float* sn, float* y, int BT, int n, int hd) {
  const int half = hd / 2;
  for (long bt = 0; bt < BT; bt++) {
    const float* c = cs + bt * hd; const float* s = sn + bt * hd;
    for (int h = 0; h < n; h++) {
      const float* xi = x + (bt * n + h) * hd;
      float* yi = y + (bt * n + h) * hd;
      for (int d = 0; d < half; d++) {
        yi[d] = xi[d] * c[d] - xi[d + half] * s[d];
        yi[d + half] = xi[d + half] * c[d + half] + xi[d] * s[d + half];
      }
    }
  }
}

