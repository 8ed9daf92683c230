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

Matmul. torch's int8/int4 matmuls run a scalar loop on CPUs without AVX-512, so rftkit.kernels' qgemm kernels
(C, built once into the cache) do both cases (measurements: docs/benchmarks.md, "Kernel design notes"):
- up to 64 rows (decode and batched decode): the low-bit weights are read as they are and never become fp32 ones; the
  activations are rounded to int8 per block of 32 (scale absmax / 127) and the dot products run on integers,
  llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 scheme; the int4 min term uses the exact sums of x. That rounding
  costs ~0.5% relative error on a layer's output (tests/test_compress.py). Layers sharing an input (q/k/v,
  gate/up: `linear_many`) run in one call, each with its unmerged LoRA added inside it; the call's arguments
  are a plan built once per group of layers and kept.
- more rows (prefill, large batches: compute-bound): 8 MB of weight rows at a time are dequantized into one
  reused buffer, which stays in cache, and multiplied by MKL; the fp32 weight never exists whole.
With autograd recording (training LoRA on a quantized model) the layer multiplies the dequantized weight in
torch, exact fp32, the reference path the kernel is tested against. Without a compiler, or on a CPU without
AVX2, or on GPU, every call takes the reference path (`kernel_available()` says which).
"""
from __future__ import annotations

import ctypes
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from rftkit import kernels
from rftkit.layers import register_linears, register_quantized
from rftkit.precision import register_base_quantizer

BITS = (4, 8)
KERNEL_MAX_ROWS = kernels.QLINEAR_MAX_ROWS   # rows the integer kernel takes (64); more: dequantize + MKL
CHUNK_BYTES = 8 << 20          # more rows: weight rows dequantized this many bytes at a time (fits in L3)
_buffer: torch.Tensor | None = None


def _fusable(A: torch.Tensor, B: torch.Tensor, scale) -> bool:
    """Whether the kernel can add this LoRA in its call: fp32, contiguous, rank <= 64, outside autograd."""
    return A.shape[0] <= 64 and A.is_contiguous() and B.is_contiguous() and A.dtype == B.dtype == torch.float32 \
        and not (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad))


def _scratch(numel: int) -> torch.Tensor:
    """One float32 buffer reused by every quantized layer's many-row matmul (grown when needed)."""
    global _buffer
    if _buffer is None or _buffer.numel() < numel:
        _buffer = torch.empty(numel)
    return _buffer

def _load_kernel():
    """The C kernels (rftkit.kernels: qgemm.c, built once into the cache); None when this machine cannot."""
    return kernels.load()


def kernel_available() -> bool:
    return _load_kernel() is not None


def kernel_status() -> str:
    return "avx2 C kernel" if kernel_available() else f"reference only ({kernels.build.error()})"


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


def repack_int4(packed: torch.Tensor, d: torch.Tensor, mn: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The stored int4 layout -> the kernel's (qgemm.c, q4tile): rows in tiles of 8 (zero rows pad N to a multiple
    of 8); per tile and block of 32 inputs, 4-byte word j * 8 + i = row i's bytes 4j .. 4j + 3 of the block; d
    and mn [tiles, G, 8]. A pure reordering: the stored bytes are kept as they are."""
    N, half = packed.shape
    pad = -N % 8
    q = F.pad(packed, (0, 0, 0, pad)).reshape((N + pad) // 8, 8, half // 16, 4, 4)    # tile, row, block, word, byte
    qp = q.permute(0, 2, 3, 1, 4).contiguous().reshape(-1)
    G = d.shape[1]
    dp, mp = (F.pad(t.float(), (0, 0, 0, pad)).reshape(-1, 8, G).transpose(1, 2).contiguous() for t in (d, mn))
    return qp, dp, mp


def _versions(tensors: tuple) -> tuple:
    """Which tensors, at which in-place version: a cache made from them is current while this is unchanged."""
    return tuple((id(t), t._version) for t in tensors)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    N, half = packed.shape
    b = packed.reshape(N, half // 16, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(N, half * 2)


# ----------------------------------------------------------------------------------------------------------
# modules

class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b, W the layer's dequantized weight, frozen. Backward dequantizes W again for dx instead of
    autograd keeping each layer's fp32 copy until backward: that kept a whole fp32 model per forward, and
    QLoRA's peak memory above plain LoRA's (bench/step_memory.py)."""

    @staticmethod
    def forward(ctx, x2, layer):
        ctx.layer = layer
        return F.linear(x2, layer.dequantize().to(x2.dtype), layer.bias)

    @staticmethod
    def backward(ctx, gy):
        return gy @ ctx.layer.dequantize().to(gy.dtype), None


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
        lib = self._kernel_for(x2)
        if lib is None:                                  # reference path
            frozen = self.bias is None or not self.bias.requires_grad
            if torch.is_grad_enabled() and x2.requires_grad and frozen:      # training: keep no fp32 weight
                y = _DequantizedLinear.apply(x2, self)
            else:
                y = F.linear(x2, self.dequantize().to(x.dtype), self.bias)
        elif x2.shape[0] > KERNEL_MAX_ROWS:
            y = self._dequantized_matmul(lib, x2.contiguous(), torch.get_num_threads())
            if self.bias is not None:
                y += self.bias
        else:
            fused = lora is not None and _fusable(*lora)
            y = _decode(lib, x2.contiguous(), [(self, lora if fused else None)])[0]
            lora = None if fused else lora
        if lora is not None:
            y = y + F.linear(F.linear(x2, lora[0]), lora[1]) * lora[2]
        return y.reshape(*lead, self.out_features)

    def _load_from_state_dict(self, *args, **kwargs):
        """load_state_dict copies into the buffers in place: the kernel's int4 copy is refreshed in place too, so
        plans that hold its addresses (rftkit.decode_stack) read the loaded weights."""
        super()._load_from_state_dict(*args, **kwargs)
        cache = self.__dict__.get("_repacked")
        if cache is None:
            return
        src = self._int4_buffers()
        fresh = repack_int4(*src)
        if any(old.shape != new.shape for old, new in zip(cache[1], fresh)):
            del self.__dict__["_repacked"]
            return
        with torch.no_grad():
            for old, new in zip(cache[1], fresh):
                old.copy_(new)
        self.__dict__["_repacked"] = (_versions(src), cache[1])

    def _int4_buffers(self) -> tuple:
        b = self._buffers
        return b["qweight"], b["scales"], b["mins"]

    def kernel_tensors(self) -> tuple:
        """(qweight, scales, mins or None, bias or None): what the kernels read (rftkit.kernels.QLayer.fill); for
        int4 in the kernel's layout (repack_int4), made on first use and again whenever a buffer changes. Read
        from the module's own dicts: nn.Module.__getattr__ costs ~1 us a lookup, on every decode call."""
        bias = self._parameters.get("bias")
        if self.bits == 8:
            return self._buffers["qweight"], self._buffers["scales"], None, bias
        src = self._int4_buffers()
        cache = self.__dict__.get("_repacked")
        if cache is None or cache[0] != _versions(src):
            with torch.inference_mode(False):      # normal tensors (a decode may run in inference mode): updatable
                cache = self.__dict__["_repacked"] = (_versions(src), repack_int4(*src))
        return (*cache[1], bias)

    def _kernel_for(self, x2: torch.Tensor):
        """The C kernel library when it may run on x2 [M, K] (CPU fp32, outside autograd), else None. In
        training (grad enabled) every layer takes the exact path, the first one too, whose input needs no
        gradient: QLoRA's forward is then LoRA's over the dequantized base (tests/test_precision.py)."""
        if x2.device.type != "cpu" or x2.dtype != torch.float32 or x2.shape[0] == 0 or torch.is_grad_enabled():
            return None
        return _load_kernel()

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


_plans: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def fill_layer(L: kernels.QLayer, m: "QuantLinear", lora: tuple | None) -> None:
    """Point L at QuantLinear m's tensors and its fused LoRA (A, B, scale) or none (the output is set per call)."""
    L.fill(*m.kernel_tensors(), m.out_features, lora)


def _plan(parts: list[tuple]):
    """The qlinear_many arguments for these (QuantLinear, lora) parts, built once per group of layers and kept
    (weakly, on the first layer) while every tensor and LoRA scale it was built from is still the one in use."""
    tens = [(m.kernel_tensors(), lo) for m, lo in parts]
    key = tuple(id(t) for ts, lo in tens for t in (*ts, *(lo[:2] if lo else ()))) \
        + tuple(float(lo[2]) if lo else None for _, lo in tens)
    groups = _plans.get(parts[0][0])
    if groups is None:
        groups = _plans[parts[0][0]] = {}
    ids = tuple(id(m) for m, _ in parts)
    plan = groups.get(ids)
    if plan is not None and plan[0] == key:
        return plan[1]
    layers = (kernels.QLayer * len(parts))()
    for L, (m, lo) in zip(layers, parts):
        fill_layer(L, m, lo)
    groups[ids] = (key, (layers, tens))              # tens keeps the tensors alive, so their ids stay theirs
    return layers, tens


def _decode(lib, x2: torch.Tensor, parts: list[tuple]) -> list[torch.Tensor]:
    """Decode rows (M <= KERNEL_MAX_ROWS): [x2 W^T (+ bias) (+ LoRA) for (QuantLinear, lora or None) in parts],
    up to 4 layers of one bits / group / in_features in one call of the kernel (x2 rounded to int8 once). The
    plan's output addresses are set here: one model is driven by one thread at a time (the engine's)."""
    M, K = x2.shape
    first = parts[0][0]
    layers, _ = _plan(parts)
    ys = []
    for L, (m, _) in zip(layers, parts):
        y = torch.empty(M, m.out_features)
        L.y = y.data_ptr()
        ys.append(y)
    lib.qlinear_many(x2.data_ptr(), M, K, first.bits, first.group_size // 32 if first.bits == 4 else 1,
                     len(parts), ctypes.addressof(layers), torch.get_num_threads())
    return ys


def _quant_part(m: nn.Module) -> tuple | None:
    """(QuantLinear, fusable LoRA or None) for a QuantLinear or a LoRALinear on one; None for anything else."""
    if isinstance(m, QuantLinear):
        return m, None
    parts = m.quant_parts() if hasattr(m, "quant_parts") else None
    if parts is None or (parts[1] is not None and not _fusable(*parts[1])):
        return None
    return parts


def linear_many(mods: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor] | None:
    """[m(x) for m in mods] in one kernel call (x rounded to int8 once, one parallel loop) when every module is a
    QuantLinear, or a LoRALinear on one, of one bits / group / in_features, at decode rows: q/k/v and gate/up of
    a quantized model. None where that does not apply (the caller runs them one by one)."""
    if not 0 < len(mods) <= 4:
        return None
    parts = [_quant_part(m) for m in mods]
    if any(p is None for p in parts):
        return None
    first = parts[0][0]
    if any((m.bits, m.group_size, m.in_features) != (first.bits, first.group_size, first.in_features)
           for m, _ in parts):
        return None
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    lib = first._kernel_for(x2) if x2.shape[0] <= KERNEL_MAX_ROWS else None
    if lib is None:
        return None
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in _decode(lib, x2.contiguous(), parts)]


def _grouped(mods: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor] | None:
    return linear_many(mods, x)          # looked up per call, so an A/B test can swap linear_many


register_linears(_grouped)               # the model's q/k/v and gate/up of quantized layers, in one call
register_quantized(QuantLinear)          # the engine's one-call decode stack reads its kernel_tensors()


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


def _quantize_base(model: nn.Module, bits: int, group_size: int) -> None:
    quantize(model, bits, group_size, head_bits=None)


register_base_quantizer(_quantize_base)   # QLoRA: rft train / rft sft --base-bits quantize through this
