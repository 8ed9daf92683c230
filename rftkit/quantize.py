"""Weight-only quantization: int8 per output channel, int4 in groups along the input, stored in low-bit form.

    quantize(model, bits=4, group_size=32)       # swaps every nn.Linear (and a tied embedding) in place
    y = QuantLinear.from_linear(linear, bits=8)(x)

int8:  w[n, k] = q[n, k] * s[n]                  q int8 [N, K], s [N]         (symmetric, absmax / 127)
int4:  w[n, k] = q[n, k] * d[n, g] + m[n, g]     q in 0..15, g = k // group  (min/max, llama.cpp's Q4_1)
       two 4-bit values per byte: in each run of 32 inputs, byte j holds k = j (low nibble) and k = j + 16.

The embedded SmolLM2 is a Q4_1 GGUF: its linear weights already sit on a 16-level grid per block of 32 with
exactly this min/max rule, so int4 with group_size=32 gives back that grid (the error is the fp16 rounding of
its scales), and the accuracy cost of int4 here is ~0 by construction. Larger groups or other models pay the
usual RTN error.

Matmul. torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` run a scalar loop on CPUs without
AVX-512 (measured on this AVX2 machine: 0.16x / 0.07x of fp32 `F.linear` for a 576x576 weight at M = 1), and
`torch.compile` of a dequantize-multiply-sum was 0.1x. So a small C kernel (AVX2 + FMA, compiled once with
the system `cc` into the cache, loaded with ctypes: no torch headers, ~0.3 s to build) does both cases:
- few rows (decode, M <= 8): the low-bit weights are read as they are and never become fp32 ones; the
  activations are rounded to int8 per block of 32 (scale absmax / 127) and the dot products run on integers
  (`maddubs`), llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 scheme; the int4 min term uses the exact sums of x.
  That rounding costs ~0.5% relative error on a layer's output (measured in tests/test_compress.py) and
  made decode 1.7-2.8x faster than the same kernel on fp32 activations.
- more rows (prefill, large batches: compute-bound): 8 MB of weight rows at a time are dequantized into one
  reused buffer, which stays in cache, and multiplied by MKL; the fp32 weight never exists whole.
With autograd recording (training LoRA on a quantized model) the layer multiplies the dequantized weight in
torch, exact fp32, the reference path the kernel is tested against. Without a compiler, or on a CPU without
AVX2, or on GPU, every call takes the reference path (`kernel_available()` says which).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

from rftkit.kernels import C_HELPERS

BITS = (4, 8)
KERNEL_MAX_ROWS = 8            # the C kernel keeps one accumulator per row in registers
CHUNK_BYTES = 8 << 20          # more rows: weight rows dequantized this many bytes at a time (fits in L3)
_buffer: torch.Tensor | None = None


def _fusable(A: torch.Tensor, B: torch.Tensor, scale) -> bool:
    """Whether lora_add can take this LoRA: fp32, contiguous, rank <= 64, outside autograd."""
    return A.shape[0] <= 64 and A.is_contiguous() and B.is_contiguous() and A.dtype == B.dtype == torch.float32 \
        and not (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad))


def _scratch(numel: int) -> torch.Tensor:
    """One float32 buffer reused by every quantized layer's many-row matmul (grown when needed)."""
    global _buffer
    if _buffer is None or _buffer.numel() < numel:
        _buffer = torch.empty(numel)
    return _buffer

_KERNEL_SRC = C_HELPERS + r"""
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
/* y[M,N] = x[M,K] @ (q[N,K] * s[N])^T, x quantized to int8 per block of 32 (llama.cpp's Q8_0 x Q8_0 dot);
   K % 32 == 0, M <= 8 */
void gemm_i8(const float* x, const int8_t* q, const float* s, float* y, int M, int N, int K, int nt) {
  int B = K / 32;
  int8_t* xq = (int8_t*)malloc((size_t)M * K + 64);
  float* xd = (float*)malloc(sizeof(float) * 2 * (size_t)M * B);
  float* xs = xd + (size_t)M * B;
  quant_x8(x, M, K, xq, xd, xs);
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int n = 0; n < N; n++) {
    const int8_t* qr = q + (long)n * K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[8];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    if (M == 1) {
      __m256 c[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int b = 0; b < B; b++) {
        __m256i w = _mm256_loadu_si256((const __m256i*)(qr + b * 32));
        __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + b * 32));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w)), ones);
        c[b & 3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xd[b]), c[b & 3]);
      }
      acc[0] = _mm256_add_ps(_mm256_add_ps(c[0], c[1]), _mm256_add_ps(c[2], c[3]));
    } else
    for (int b = 0; b < B; b++) {
      __m256i w = _mm256_loadu_si256((const __m256i*)(qr + b * 32));
      __m256i aw = _mm256_sign_epi8(w, w);                       /* |w| as unsigned, the sign moved to x */
      for (int m = 0; m < M; m++) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (long)m * K + b * 32));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xd[(long)m * B + b]), acc[m]);
      }
    }
    for (int m = 0; m < M; m++) y[(long)m * N + n] = hsum(acc[m]) * s[n];
  }
  free(xq); free(xd);
}
/* int4: w = q * d[n, g] + m[n, g], group = 32 * sub: y = sum_g d * (q . x8) + m * sum(x), the dot over x
   quantized to int8 per block of 32 (llama.cpp's Q4_1 x Q8_1), the min term on the exact sums; M <= 8 */
void gemm_i4(const float* x, const uint8_t* q, const float* d, const float* mn,
             float* y, int M, int N, int K, int sub, int nt) {
  int B = K / 32, G = K / (32 * sub);
  int8_t* xq = (int8_t*)malloc((size_t)M * K + 64);
  float* xd = (float*)malloc(sizeof(float) * (2 * (size_t)M * B + (size_t)M * G));
  float* xs = xd + (size_t)M * B;
  float* xg = xs + (size_t)M * B;
  quant_x8(x, M, K, xq, xd, xs);
  for (int m = 0; m < M; m++) for (int g = 0; g < G; g++) {
    float t = 0.0f;
    for (int j = 0; j < sub; j++) t += xs[(long)m * B + g * sub + j];
    xg[(long)m * G + g] = t;
  }
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int n = 0; n < N; n++) {
    const uint8_t* qr = q + (long)n * K / 2;
    const __m128i m15 = _mm_set1_epi8(15);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[8];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    if (M == 1) {             /* one row: four independent FMA chains (one chain waits on the FMA latency) */
      __m256 c[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int g = 0, b = 0; g < G; g++) {
        float dw = d[(long)n * G + g];
        for (int j = 0; j < sub; j++, b++) {
          __m128i qb = _mm_loadu_si128((const __m128i*)(qr + b * 16));
          __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qb, 4), m15), _mm_and_si128(qb, m15));
          __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i*)(xq + b * 32))), ones);
          c[b & 3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xd[b]), c[b & 3]);
        }
      }
      acc[0] = _mm256_add_ps(_mm256_add_ps(c[0], c[1]), _mm256_add_ps(c[2], c[3]));
    } else
    for (int b = 0; b < B; b++) {
      __m128i qb = _mm_loadu_si128((const __m128i*)(qr + b * 16));
      /* low half: k = 0..15 of the block (low nibbles), high half: k = 16..31 */
      __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qb, 4), m15), _mm_and_si128(qb, m15));
      float dw = d[(long)n * G + (sub == 1 ? b : b / sub)];
      for (int m = 0; m < M; m++) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (long)m * K + b * 32));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xd[(long)m * B + b]), acc[m]);
      }
    }
    for (int m = 0; m < M; m++) {
      float t = hsum(acc[m]);
      for (int g = 0; g < G; g++) t += mn[(long)n * G + g] * xg[(long)m * G + g];
      y[(long)m * N + n] = t;
    }
  }
  free(xq); free(xd);
}
/* y[M, N] += scale * (x[M, K] @ A[r, K]^T) @ B[N, r]^T: an unmerged LoRA on top of the layer's output in the
   same call (decode rows, M <= 8, r <= 64) */
void lora_add(const float* x, const float* A, const float* Bw, float* y, int M, int N, int K, int r, float scale,
              int nt) {
  float t[8 * 64];
  for (int m = 0; m < M; m++)
    for (int j = 0; j < r; j++) t[m * 64 + j] = dot(A + (long)j * K, x + (long)m * K, K) * scale;
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int n = 0; n < N; n++) {
    const float* b = Bw + (long)n * r;
    for (int m = 0; m < M; m++) {
      __m256 s = _mm256_setzero_ps();
      int j = 0;
      for (; j + 8 <= r; j += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(b + j), _mm256_loadu_ps(t + m * 64 + j), s);
      float v = hsum(s);
      for (; j < r; j++) v += b[j] * t[m * 64 + j];
      y[(long)m * N + n] += v;
    }
  }
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
"""

_lib = None
_lib_error: str | None = None


def _load_kernel():
    """Build (once, into the cache) and load the C kernel; None when this machine cannot."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    from rftkit.kernels import build_library
    lib, _lib_error = build_library(_KERNEL_SRC, "qgemm", "int8/int4 kernel")
    if lib is None:
        return None
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.gemm_i8.argtypes = [P, P, P, P, I, I, I, I]
    lib.gemm_i4.argtypes = [P, P, P, P, P, I, I, I, I, I]
    lib.dequant_i4.argtypes = [P, P, P, P, I, I, I, I, I]
    lib.dequant_i8.argtypes = [P, P, P, I, I, I, I]
    lib.lora_add.argtypes = [P, P, P, P, I, I, I, I, ctypes.c_float, I]
    _lib = lib
    return lib


def kernel_available() -> bool:
    return _load_kernel() is not None


def kernel_status() -> str:
    return "avx2 C kernel" if kernel_available() else f"reference only ({_lib_error})"


# ----------------------------------------------------------------------------------------------------------
# quantize / dequantize a matrix

def check_bits(bits: int, group_size: int, in_features: int | None = None) -> None:
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits!r}: weight-only quantization supports {BITS}")
    if bits == 4:
        if group_size < 32 or group_size % 32:
            raise ValueError(f"int4 group_size must be a positive multiple of 32, got {group_size}")
        if in_features is not None and in_features % group_size:
            raise ValueError(f"int4 group_size {group_size} does not divide in_features={in_features}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], s [N]) with w ~ q * s[:, None]."""
    s = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s.float()


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K/2], d [N, G], m [N, G]) with w ~ q * d + m, q in 0..15 per group."""
    N, K = w.shape
    check_bits(4, group_size, K)
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    d = (hi - lo) / 15
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((wg - lo[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(N, K)), d, lo


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 -> [N, K/2]: per run of 32, byte j = q[j] | q[j + 16] << 4."""
    N, K = q.shape
    b = q.reshape(N, K // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    N, half = packed.shape
    b = packed.reshape(N, half // 16, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(N, half * 2)


# ----------------------------------------------------------------------------------------------------------
# modules

class QuantLinear(nn.Module):
    """A linear layer whose weight is stored as int8 or int4 (+ scales). `weight` is a read-only dequantized
    view (for code that asks for a dtype or device, or multiplies by hand); LoRA wraps this module unmerged
    and hands it its A, B and scale (`forward(x, lora=...)`, `fuses_lora`)."""

    fuses_lora = True

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int = 32,
                 bias: bool = False, device=None):
        super().__init__()
        check_bits(bits, group_size, in_features)
        if in_features % 32:
            raise ValueError(f"quantized linears need in_features divisible by 32, got {in_features}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(N, device=device))
        else:
            G = K // group_size
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(N, G, device=device))
            self.register_buffer("mins", torch.zeros(N, G, device=device))
        self.bias = nn.Parameter(torch.zeros(N, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 32) -> "QuantLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, w.device)
        m.set_weight(w)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        if self.bits == 8:
            self.qweight, self.scales = quantize_int8(w.float())
        else:
            self.qweight, self.scales, self.mins = quantize_int4(w.float(), self.group_size)

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scales[:, None]
        N, K, g = self.out_features, self.in_features, self.group_size
        q = unpack_int4(self.qweight).float().reshape(N, K // g, g)
        return (q * self.scales[..., None] + self.mins[..., None]).reshape(N, K)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    @weight.setter
    def weight(self, value):
        raise ValueError("a QuantLinear's weight is read-only: keep LoRA unmerged on a quantized model, or merge "
                         "before quantizing")

    def forward(self, x: torch.Tensor, lora: tuple | None = None) -> torch.Tensor:
        """y = x W^T (+ bias); `lora` = (A [r, K], B [N, r], scale) adds scale * x A^T B^T, in the same kernel
        call at decode rows (LoRALinear passes it: one call instead of five torch ops)."""
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        lib = _load_kernel() if (x.device.type == "cpu" and x.dtype == torch.float32 and M > 0) else None
        if lib is None or (torch.is_grad_enabled() and x.requires_grad):   # autograd keeps the weight it used
            y = F.linear(x2, self.dequantize().to(x.dtype), self.bias)
        else:
            x2 = x2.contiguous()
            nt = torch.get_num_threads()
            if M > KERNEL_MAX_ROWS:
                y = self._dequantized_matmul(lib, x2, nt)
            else:
                y = torch.empty(M, self.out_features)
                if self.bits == 8:
                    lib.gemm_i8(x2.data_ptr(), self.qweight.data_ptr(), self.scales.data_ptr(), y.data_ptr(),
                                M, self.out_features, K, nt)
                else:
                    lib.gemm_i4(x2.data_ptr(), self.qweight.data_ptr(), self.scales.data_ptr(),
                                self.mins.data_ptr(), y.data_ptr(), M, self.out_features, K, self.group_size // 32, nt)
            if self.bias is not None:
                y += self.bias
            if lora is not None and M <= KERNEL_MAX_ROWS and _fusable(*lora):
                lib.lora_add(x2.data_ptr(), lora[0].data_ptr(), lora[1].data_ptr(), y.data_ptr(), M,
                             self.out_features, K, lora[0].shape[0], float(lora[2]), nt)
                lora = None
        if lora is not None:
            y = y + F.linear(F.linear(x2, lora[0]), lora[1]) * lora[2]
        return y.reshape(*lead, self.out_features)

    def _dequantized_matmul(self, lib, x2: torch.Tensor, nt: int) -> torch.Tensor:
        """Many rows: dequantize CHUNK_BYTES of weight rows at a time into one reused buffer (it stays in
        cache) and multiply with MKL; the fp32 weight never exists whole."""
        N, K = self.out_features, self.in_features
        rows = max(1, min(N, CHUNK_BYTES // (4 * K)))
        buf = _scratch(rows * K)
        outs = []
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            w = buf[:(n1 - n0) * K].view(n1 - n0, K)
            if self.bits == 8:
                lib.dequant_i8(self.qweight.data_ptr(), self.scales.data_ptr(), w.data_ptr(), n0, n1, K, nt)
            else:
                lib.dequant_i4(self.qweight.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(), w.data_ptr(),
                               n0, n1, K, self.group_size // 32, nt)
            outs.append(x2 @ w.T)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"


class QuantEmbedding(nn.Module):
    """int8 embedding, one scale per row; with tied embeddings the lm_head QuantLinear shares its tensors."""

    def __init__(self, num_embeddings: int, dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, device=device))

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * self.scales[ids][..., None]


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def quantize(model: nn.Module, bits: int = 8, group_size: int = 32, head_bits: int | None = 8,
             skip: tuple[str, ...] = ()) -> dict:
    """Swap every nn.Linear for a QuantLinear of `bits`; the lm_head (and a tied embedding, int8 only) gets
    `head_bits` (None = left fp32). Returns {module path: {"kind": "quant", "bits", "group_size"}}."""
    check_bits(bits, group_size)
    if head_bits is not None:
        check_bits(head_bits, group_size)
    record = {}
    tied = model.cfg.tie_embeddings
    for path, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear) or path in skip or path == "lm_head":
            continue
        _swap(model, path, QuantLinear.from_linear(m, bits, group_size))
        record[path] = {"kind": "quant", "bits": bits, "group_size": group_size}
    if head_bits is not None:
        head = QuantLinear.from_linear(model.lm_head, head_bits, group_size)
        model.lm_head = head
        record["lm_head"] = {"kind": "quant", "bits": head_bits, "group_size": group_size}
        if tied and head_bits == 8:           # one int8 matrix serves the embedding and the lm_head
            emb = QuantEmbedding(head.out_features, head.in_features, head.qweight.device)
            emb.qweight, emb.scales = head.qweight, head.scales
            model.model.embed_tokens = emb
            record["model.embed_tokens"] = {"kind": "quant_embedding", "bits": 8}
    return record
