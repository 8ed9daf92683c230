"""SwiGLU's elementwise middle, silu(gate) * up, forward and backward in one pass each (swiglu.c), or torch's ops
where the kernel does not apply.

    h = swiglu(gate, up)          # autograd-aware: the backward is one kernel pass too

In a training step at ~1,500 packed tokens torch runs silu and a product forward, and silu_backward and two
products backward, each a pass over [tokens, ffn_dim] (9.6 MB a tensor for the embedded model, past what the
caches keep between ops); the kernel reads gate and up once forward and dh, gate and up once backward, and
autograd keeps gate and up instead of gate, silu(gate) and up.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

import rftkit.kernels.build as build

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
build.declare({
    "swiglu_fwd": ([_P, _P, _P, _L, _I], None),
    "swiglu_bwd": ([_P, _P, _P, _P, _P, _L, _I], None),
})


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _lib(gate: torch.Tensor, up: torch.Tensor):
    """The library when the kernel applies: CPU fp32 contiguous tensors of one shape, kernels enabled."""
    if not build._enabled or gate.shape != up.shape:
        return None
    for t in (gate, up):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            return None
    return build.load()


def _forward(lib, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(gate)
    lib.swiglu_fwd(gate.data_ptr(), up.data_ptr(), h.data_ptr(), gate.numel(), torch.get_num_threads())
    return h


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _forward(build.load(), gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        dg = torch.empty_like(gate) if ctx.needs_input_grad[0] else None
        du = torch.empty_like(up) if ctx.needs_input_grad[1] else None
        build.load().swiglu_bwd(dh.data_ptr(), gate.data_ptr(), up.data_ptr(), 0 if dg is None else dg.data_ptr(),
                                0 if du is None else du.data_ptr(), gate.numel(), torch.get_num_threads())
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (F.silu(gate) * up where the kernel does not apply: another device or dtype, shapes that
    broadcast, strided tensors, no kernels)."""
    lib = _lib(gate, up)
    if lib is None:
        return swiglu_reference(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return _forward(lib, gate, up)
