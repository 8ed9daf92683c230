"""Where and in what precision a trainer holds its model: device, weight dtype, an int4 base (QLoRA) and
activation checkpointing. `rft sft` and `rft train` call the same three functions, so their flags mean the same.

    device, dtype = resolve_device("auto"), resolve_dtype("bf16")
    model, tok = load(spec, device=device, dtype=dtype)
    prepare_base(model, base_bits=4, grad_checkpointing=True)     # before apply_lora
    apply_lora(model, ...); adapter_to_fp32(model)                # after

bf16 halves the weights' memory; the adapter stays fp32 (its AdamW updates of ~lr x 1e-2 would mostly round
away in bf16's 8-bit mantissa: PEFT keeps adapters fp32 for the same reason), and its output is cast to the
base's dtype. On CPU, bf16 matmuls are far slower than fp32 ones (DESIGN.md): bf16 is for GPUs.

QLoRA: the frozen base linears (not the lm_head, not the embeddings) become rftkit.compress.quantize's int4
QuantLinear, groups of 32 along the input (llama.cpp's Q4_1 rule); LoRA wraps them unmerged. The quantizer sits
above the trainers, so it registers itself here when imported (`register_base_quantizer`; the rft command
imports it), as the compressed folder format registers with rftkit.loading. In training
the layer multiplies its dequantized weight in torch (exact), so QLoRA's gradients are LoRA's over the
dequantized base (tested). Rollouts go through the engine, whose decode uses the int4 kernels.

Checkpointing: each block keeps only its input; backward re-runs it (rftkit.model: one more forward of the
blocks, much less activation memory at long completions or large groups).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from rftkit.layers import is_quantized
from rftkit.lora import lora_parameters

_QUANTIZER: list[Callable] = []  # quantize(model, bits, group_size): rftkit.compress.quantize registers it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASE_BITS = (0, 4, 8)            # 0 = the base as loaded


def resolve_device(name: str, local_rank: int | None = None) -> str:
    """cpu, cuda, cuda:N, or auto (cuda when torch sees one); under torchrun (`local_rank` given) plain cuda is
    this process's GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device here (use --device cpu)")
    return name


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_base_bits(bits: int, dtype: str) -> None:
    if bits not in BASE_BITS:
        raise ValueError(f"base_bits must be one of {BASE_BITS} (0 = not quantized), got {bits}")
    if bits and dtype != "fp32":
        raise ValueError(f"base_bits {bits} dequantizes to fp32 in training: use it with dtype fp32, got {dtype!r}")


def register_base_quantizer(fn: Callable) -> None:
    """fn(model, bits, group_size) swaps the model's linears but the lm_head for quantized ones, in place."""
    _QUANTIZER[:] = [fn]


def prepare_base(model: nn.Module, base_bits: int = 0, grad_checkpointing: bool = False) -> nn.Module:
    """Quantize the base linears to `base_bits` (QLoRA; before apply_lora) and switch activation checkpointing
    on or off. Returns the model."""
    if base_bits:
        if not _QUANTIZER:
            raise ValueError(f"base_bits {base_bits} needs the quantizer: import rftkit.compress.quantize first "
                             f"(it registers itself here; the rft command does)")
        if any(is_quantized(m) for m in model.modules()):
            raise ValueError(f"base_bits {base_bits}: the model is quantized already (a compressed folder)")
        _QUANTIZER[0](model, base_bits, 32)
    model.grad_checkpointing = grad_checkpointing
    return model


def adapter_to_fp32(model: nn.Module) -> None:
    """The LoRA weights in fp32 whatever the base's dtype (after apply_lora)."""
    for p in lora_parameters(model):
        if p.dtype != torch.float32:
            p.data = p.data.float()
