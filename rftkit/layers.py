"""The layer pieces rftkit.model and rftkit.moe share: a linear layer's dispatch to the decode kernels and the
SwiGLU feed-forward (the dense layers' MLP, and the shared expert of MoE layers).

    y = linear(m, x)                               # m(x), plain nn.Linear layers through rftkit.kernels.linear
    q, k, v = linears([q_proj, k_proj, v_proj], x)      # layers sharing x, in one kernel call where one applies

A layer type defined above the model (rftkit.compress.quantize's QuantLinear) registers itself here: its grouped
call, so several of its layers sharing one input run in one call (`register_linears`), and its type, so the
engine's one-call decode stack (rftkit.decode_stack) takes its kernel parts (`register_quantized`). Neither this
module, the model nor the decode stack imports it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rftkit import kernels

_GROUPED: list[Callable] = []        # (mods, x) -> [m(x) for m in mods] in one call, or None where it does not apply
_QUANTIZED: tuple[type, ...] = ()    # quantized linear layer types (register_quantized)


def register_linears(fn: Callable) -> None:
    """Let `linears` offer a group of layers that are not all plain nn.Linear to fn(mods, x), which returns
    their outputs or None (then they run one by one)."""
    if fn not in _GROUPED:
        _GROUPED.append(fn)


def register_quantized(cls: type) -> None:
    """Declare cls a quantized linear layer: its instances have `bits`, `group_size`, `out_features` and
    `kernel_tensors()` -> (qweight, scales, mins or None, bias or None), as rftkit.kernels.QLayer.fill takes them."""
    global _QUANTIZED
    if cls not in _QUANTIZED:
        _QUANTIZED = (*_QUANTIZED, cls)


def is_quantized(m: nn.Module) -> bool:
    """m is an instance of a registered quantized linear layer type (register_quantized)."""
    return isinstance(m, _QUANTIZED)


def linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x), with plain nn.Linear layers through the decode kernel (rftkit.kernels.linear)."""
    if type(m) is nn.Linear:
        return kernels.linear(x, m.weight, m.bias)
    return m(x)


def linears(mods: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """[m(x) for m in mods]; the layers of a decode step that share x (q/k/v, gate/up) in one kernel call when
    they are all plain nn.Linear, or all of a registered kind (quantized, with or without LoRA)."""
    if all(type(m) is nn.Linear for m in mods):
        ys = kernels.linear_many(x, [m.weight for m in mods], [m.bias for m in mods])
        if ys is not None:
            return ys
    else:
        for fn in _GROUPED:
            ys = fn(mods, x)
            if ys is not None:
                return ys
    return [linear(m, x) for m in mods]


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x):
        gate, up = linears([self.gate_proj, self.up_proj], x)
        return linear(self.down_proj, kernels.swiglu(gate, up))
