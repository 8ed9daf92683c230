"""The one-call decode stack: every decoder block of a decode step in one kernel call, on the engine's paged cache.

    PagedCache.run_blocks(model, x, cos, sin)  ->  run(model, x, cos, sin, cache)   # True: the blocks ran

With a handful of rows a decode step is a chain of small products bound by memory bandwidth, and ~25 torch ops
per block are mostly dispatch; rftkit.kernels.decode_layers runs the whole stack with the same kernels as the
per-op path. The model stays pure: it asks its cache to run the blocks (`run_blocks`), and only the engine's
cache, in decode mode, comes here. Plain blocks (nn.Linear layers, fp32, CPU, no autograd) run with their
unmerged LoRA and the adapter bank's per-row adapters; quantized blocks (all one bits / group size) run
`decode_layers_q` with their unmerged LoRA but without the bank; MoE layers, q/k norms, training, CUDA, mixed
layer kinds and more rows than the kernels take go op by op (`run` returns False).

The kernels read C pointer tables (rftkit.kernels.DecodeLayer / QBlock), built once per model and cache and kept
while everything they were built from is still the one in use. The plan reads each layer through public
accessors only (LoRALinear.kernel_parts, BankLinear.slots / bank / inner, and the kernel_tensors of the quantized
layer types registered with rftkit.layers.register_quantized, so this module imports nothing from compress), and
records them: a module swapped, a parameter reassigned, `.to()`, an adapter switched off or merged all rebuild it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from rftkit import kernels
from rftkit.bank import BankLinear
from rftkit.layers import is_quantized
from rftkit.lora import LoRALinear
from rftkit.model import MLP, Attention, Block, RMSNorm, Transformer

BLOCK_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                 ("mlp", ("gate_proj", "up_proj", "down_proj")))
FIELD = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "g", "up_proj": "u",
         "down_proj": "d"}

_plans: "weakref.WeakKeyDictionary[Transformer, _Kept]" = weakref.WeakKeyDictionary()
_MISSING = object()


def run(model: Transformer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> bool:
    """Run every block of a decode step (one new token per row, x [B, 1, D]) in place in one kernel call over
    the engine's paged cache in decode mode (`table`, `qpos`, `write`, `block_size`, per-layer `k`/`v` pools),
    when every block qualifies (module docstring). False: the caller runs the blocks one by one."""
    if torch.is_grad_enabled() or x.shape[0] > kernels.decode_max_rows():
        return False
    got = plan(model, cache)
    if got is None:
        return False
    kind, layers, bank = got
    c, B = model.cfg, x.shape[0]
    x2, cos2, sin2 = x.view(B, -1), cos.reshape(B, -1), sin.reshape(B, -1)
    if kind is None:
        rows, rank = None, 0
        if bank is not None and bank.groups:              # this batch uses adapters of the bank
            if not bank.kernel_ok() or bank.rows is None or bank.rows.shape[0] != B:
                return False
            rows, rank = bank.rows, bank.max_loaded_rank()
        return kernels.decode_layers(x2, layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, cos2, sin2,
                                     cache.table, cache.qpos, cache.write, cache.block_size, c.norm_eps, rows, rank,
                                     bank.n_slots + 1 if rows is not None else 0)
    return kernels.decode_layers_q(x2, layers, kind[0], kind[1], c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim,
                                   cos2, sin2, cache.table, cache.qpos, cache.write, cache.block_size, c.norm_eps)


# Modules, parameters and buffers are assigned through nn.Module.__setattr__ / register_*, which call torch's global
# registration hooks: a counter of them tells, in one comparison, that no module anywhere was given a new child,
# parameter or buffer since the plan was last checked, so only its plain attributes (LoRA switches) and data
# pointers need reading per step (reading every attribute through nn.Module.__getattr__ cost ~1-2.5 ms a step).
_registrations = 0


def _registered(*args) -> None:
    global _registrations
    _registrations += 1


nn.modules.module.register_module_module_registration_hook(_registered)
nn.modules.module.register_module_parameter_registration_hook(_registered)
nn.modules.module.register_module_buffer_registration_hook(_registered)


def _holds(checks: list, ptrs: list) -> bool:
    """Every attribute the plan read is still the same object, and every tensor still at its address."""
    return all(getattr(owner, name, _MISSING) is obj for owner, name, obj in checks) \
        and all(t.data_ptr() == p for t, p in ptrs)


@dataclass(slots=True)
class _Kept:
    """A plan and what it was built from: the cache (weakly), the registration count it was last fully checked
    at, its plain-attribute checks (read every step), all its attribute checks, its tensors' addresses."""
    cache: weakref.ref
    seen: int
    plain: list
    checks: list
    ptrs: list
    plan: tuple | None


def plan(model: Transformer, cache):
    """(kind, block array, bank or None) for model's blocks over cache's pools: kind None = nn.Linear layers
    (kernels.DecodeLayer), (bits, group_size) = quantized ones (kernels.QBlock); None when some block does not
    qualify. Built once and kept while every module, tensor, data pointer and LoRA setting it read is still the
    one in use: each step reads its plain attributes and data pointers, and every attribute it read once
    anything was registered anywhere since its last full check."""
    kept = _plans.get(model)
    if kept is not None and kept.cache() is cache and _holds(kept.plain, kept.ptrs):
        if kept.seen == _registrations:
            return kept.plan
        if _holds(kept.checks, ()):
            kept.seen = _registrations
            return kept.plan
    checks, ptrs = [], []
    seen = _registrations
    got = _build(model, cache, checks, ptrs)
    plain = [c for c in checks if c[2] is not None and c[2] is not _MISSING
             and not isinstance(c[2], (nn.Module, torch.Tensor))]
    # the plan keeps the tensors it read alive (ptrs), so their ids and addresses stay theirs; the cache only
    # weakly (its pools are allocated once, with it)
    _plans[model] = _Kept(weakref.ref(cache), seen, plain, checks, ptrs, got)
    return got


def _usable(t) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())


def _build(model: Transformer, cache, checks: list, ptrs: list):
    """The plan, every attribute and tensor it depends on recorded into checks / ptrs; None when some block does
    not qualify."""
    def take(owner, name: str):
        obj = getattr(owner, name, _MISSING)
        checks.append((owner, name, obj))
        if isinstance(obj, torch.Tensor):
            ptrs.append((obj, obj.data_ptr()))
        return obj

    banks: set = set()

    def part(m):
        """(base layer, unmerged LoRA (A, B, scale) or None, the adapter bank's slot table or None) of a plain,
        quantized or LoRA-wrapped linear, itself maybe wrapped by the bank; None for any other module."""
        lora = slots = None
        if type(m) is BankLinear:
            slots = take(m, "slots")
            for t in (slots.A, slots.B, slots.T, slots.R, slots.s):
                ptrs.append((t, t.data_ptr()))
            banks.add(take(m, "bank"))
            m = take(m, "inner")
        if type(m) is LoRALinear:
            for name in ("enabled", "merged", "scaling", "training", "dropout", "base", "lora_A", "lora_B"):
                take(m, name)
            got = m.kernel_parts()
            if got is None:
                return None
            m, lora = got
            if lora is not None and (lora[0].shape[0] > kernels.DecodeLayer.LORA_MAX_RANK
                                     or not (_usable(lora[0]) and _usable(lora[1]))):
                return None
        if is_quantized(m):
            for name in ("qweight", "scales", "mins", "bias"):
                take(m, name)
        elif type(m) is nn.Linear:
            if not (_usable(take(m, "weight")) and _usable(take(m, "bias"))):
                return None
        else:
            return None
        return m, lora, slots

    blocks = take(model.model, "layers")
    n = len(blocks)
    if len(cache.k) != n or any(not _usable(t) for t in (*cache.k, *cache.v)):
        return None
    kind, layers = "unset", None
    for i, blk in enumerate(blocks):
        checks.append((blocks, str(i), blk))
        if type(blk) is not Block:
            return None
        mods = {}
        for child, names in BLOCK_LINEARS:
            owner = take(blk, child)
            if type(owner) not in (Attention, MLP) or getattr(owner, "qk_norm", False):
                return None
            for name in names:
                mods[name] = take(owner, name)
        norms = []
        for norm in ("input_layernorm", "post_attention_layernorm"):
            m = take(blk, norm)
            if type(m) is not RMSNorm or m.eps != model.cfg.norm_eps:
                return None
            w = take(m, "weight")
            if not _usable(w):
                return None
            norms.append(w.data_ptr())
        parts = {name: part(m) for name, m in mods.items()}
        if any(p is None for p in parts.values()):
            return None
        first = parts["q_proj"][0]
        k = (first.bits, first.group_size) if is_quantized(first) else None
        if any(((q.bits, q.group_size) if is_quantized(q) else None) != k for q, _, _ in parts.values()):
            return None
        if k is not None and any(t is not None for _, _, t in parts.values()):
            return None                     # the quantized stack takes no bank adapters: op by op
        if kind == "unset":
            kind = k
            layers = (kernels.DecodeLayer * n)() if k is None else (kernels.QBlock * n)()
        elif k != kind:
            return None
        L = layers[i]
        L.ln1, L.ln2 = norms
        L.kc, L.vc = cache.k[i].data_ptr(), cache.v[i].data_ptr()
        L.window = blk.self_attn.window or 0
        if kind is None:
            _fill_plain(L, parts)
        else:
            for q, name in zip((*L.qkv, L.o, *L.gu, L.down), kernels.DecodeLayer.LORA_ORDER):
                m, lora, _ = parts[name]
                q.fill(*m.kernel_tensors(), m.out_features, lora)
    if len(banks) > 1:
        return None
    return kind, layers, (next(iter(banks)) if banks else None)


def _fill_plain(L: kernels.DecodeLayer, parts: dict) -> None:
    """One DecodeLayer from the (nn.Linear, LoRA, slot table) parts of a block's seven linears."""
    for j, name in enumerate(kernels.DecodeLayer.LORA_ORDER):
        m, lora, slots = parts[name]
        if slots is not None:
            L.bA[j], L.bB[j], L.bT[j], L.bR[j], L.bS[j] = (t.data_ptr() for t in (
                slots.A, slots.B, slots.T, slots.R, slots.s))
        w, b = m.weight, m.bias
        f = FIELD[name]
        setattr(L, "w" + f, w.data_ptr())
        setattr(L, "b" + f, 0 if b is None else b.data_ptr())
        if lora is not None:
            L.la[j], L.lb[j], L.ls[j], L.lr[j] = lora[0].data_ptr(), lora[1].data_ptr(), lora[2], lora[0].shape[0]
