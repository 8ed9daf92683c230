"""Mixture-of-Experts feed-forward: router, E routed SwiGLU experts, optional shared expert, balancing losses.

    cfg = ModelConfig(model_type="rftkit_moe", moe=MOE_PRESETS["mixtral"] | {"n_experts": 8})
    logits, aux = Transformer(cfg)(ids)          # aux = {"moe_balance": ..., "moe_z": ...}, summed over layers

One module, `MoEFeedForward`, covers the public families by configuration (`MoEConfig`):
- Mixtral: softmax over E, top-k, renormalised over the k picks. Qwen2-MoE: the same without renormalisation
  (`norm_topk_prob=False`) plus a shared expert scaled by sigmoid(shared_expert_gate(x)). Qwen3-MoE: no shared
  expert, renormalisation per config. LLaMA 4: top-1 on the raw logits, weight sigmoid(logit) multiplying the
  expert's *input*, an ungated shared expert, MoE layers interleaved with dense ones (`moe_layers`).
- Parameter names are `transformers` 5's in-memory names (`mlp.gate.weight` [E, D], `mlp.experts.gate_up_proj`
  [E, 2F, D] = gate rows then up rows, `mlp.experts.down_proj` [E, D, F]) so PEFT's `target_parameters` apply.
  `rftkit.loading.hf.convert_hf_state_dict` reads the hub's per-expert tensors (`block_sparse_moe.experts.0.w1.weight`,
  `mlp.experts.0.gate_proj.weight`) and fused ones. Note: `save_pretrained` of transformers 5.24 writes the
  per-expert hub layout for Mixtral/Qwen-MoE (it reverses its load-time fusion); only its state_dict is fused.
  LLaMA 4 checkpoints are fused and transposed ([E, D, 2F], [E, F, D]).

Dispatch: `experts_loop` is the obvious reference (for each expert: the (token, slot) pairs that picked it,
masked out of the [N, K] choice matrix, run, index_add back). `experts_fast` sorts the N*K assignments by
expert once, runs each projection as one grouped matmul (`F.grouped_mm`) over the jagged groups, and puts the
rows back in (token, slot) order to sum the K slots; tests hold both equal in outputs and gradients. The
gain is fewer, larger kernels: at D=512, F=1024, ~1,000 tokens per expert a quiet 2-core CPU runs both near
dense-MLP speed, while with smaller experts or a busy machine the loop's many small ops fall behind
(bench/moe.py). A capacity factor c caps each expert at ceil(c*N*K/E) assignments, earliest tokens first;
dropped assignments contribute 0 (the residual carries the token) and are counted.

Balancing (losses come back already weighted, the trainers add them):
- Switch loss `balance_coef * E * sum_i f_i * P_i`, f_i = share of the N*K assignments that went to expert i
  (sum f = 1), P_i = mean softmax probability of i. At perfect balance it equals `balance_coef`.
  transformers' `load_balancing_loss_func` divides counts by N, not N*K, so its value is k times ours (k at
  balance), and with several layers it pools f and P over all layers before the product, where we sum the
  per-layer losses. Loaded HF configs therefore get `balance_coef = router_aux_loss_coef * k`. Padding tokens
  count (the feed-forward does not see the mask).
- Router z-loss `z_coef * mean_t logsumexp(logits_t)^2` (ST-MoE).
- Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for *selection only*;
  the trainer calls `update_router_bias(model, rate)` after each optimizer step: b_i += rate*sign(mean - load_i).
Each MoE module keeps `expert_counts` [E] (assignments per expert, last forward) and `dropped` for logging.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rftkit.layers import MLP


@dataclass
class MoEConfig:
    """The `moe` dict of a ModelConfig. Dense layers (those not in `moe_layers`) use ModelConfig.ffn_dim."""
    n_experts: int = 8                  # E routed experts
    top_k: int = 2                      # K experts per token
    expert_ffn_dim: int = 128           # F of each routed expert
    score: str = "softmax"              # "softmax" (Mixtral, Qwen) or "sigmoid" (LLaMA 4, DeepSeek-V3)
    renormalize: bool = True            # divide the k selected weights by their sum (top-1: weight 1, no router grad)
    scale_input: bool = False           # LLaMA 4: the weight multiplies the expert's input, not its output
    shared_ffn_dim: int = 0             # 0 = no shared expert
    shared_gate: bool = False           # Qwen2-MoE: shared output * sigmoid(shared_expert_gate(x))
    moe_layers: list[int] | None = None  # None = every layer is MoE
    balance_coef: float = 0.01          # Switch load-balancing loss weight (0 = off)
    z_coef: float = 0.001               # router z-loss weight (0 = off)
    capacity_factor: float | None = None  # None = dropless
    bias_balancing: bool = False        # DeepSeek-V3 selection bias, updated by `update_router_bias`
    dispatch: str = "fast"              # "fast" (sorted, grouped matmuls) or "loop" (reference)

    def __post_init__(self):
        for name in ("n_experts", "top_k", "expert_ffn_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"MoEConfig.score must be 'softmax' or 'sigmoid', got {self.score!r}")
        if self.dispatch not in ("fast", "loop"):
            raise ValueError(f"MoEConfig.dispatch must be 'fast' or 'loop', got {self.dispatch!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"MoEConfig.capacity_factor must be > 0 or None, got {self.capacity_factor!r}")
        if self.shared_gate and not self.shared_ffn_dim:
            raise ValueError("MoEConfig.shared_gate needs a shared expert (shared_ffn_dim > 0)")


# Plain-dict presets; combine with `|` and pass as ModelConfig(moe=...).
MOE_PRESETS = {
    "mixtral": dict(n_experts=8, top_k=2, renormalize=True),
    "qwen2_moe": dict(n_experts=60, top_k=4, renormalize=False, shared_ffn_dim=512, shared_gate=True),
    "qwen3_moe": dict(n_experts=128, top_k=8, renormalize=True),
    "llama4": dict(n_experts=16, top_k=1, score="sigmoid", renormalize=False, scale_input=True,
                   shared_ffn_dim=128, moe_layers=[1, 3]),   # L layers: moe_layers=list(range(1, L, 2))
    "rftkit": dict(n_experts=8, top_k=2, renormalize=True, balance_coef=0.01, z_coef=0.001),
}


def moe_config(cfg: ModelConfig) -> MoEConfig:
    if cfg.moe is None:
        raise ValueError(f"model_type={cfg.model_type!r} has no moe config")
    return MoEConfig(**cfg.moe)


# ----------------------------------------------------------------------------------------------------------
# routing and expert dispatch (plain functions over tensors)

def route(logits: torch.Tensor, mc: MoEConfig, bias: torch.Tensor | None = None):
    """logits [N, E] -> (weights [N, K] fp32, experts [N, K] long). `bias` [E] shifts selection only."""
    scores = logits.float().softmax(-1) if mc.score == "softmax" else logits.float().sigmoid()   # [N, E]
    experts = torch.topk(scores if bias is None else scores + bias, mc.top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if mc.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts


def expert_capacity(n_tokens: int, mc: MoEConfig) -> int | None:
    if mc.capacity_factor is None:
        return None
    return max(1, math.ceil(mc.capacity_factor * n_tokens * mc.top_k / mc.n_experts))


def _swiglu(x, gate_up, down):
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down)


def experts_loop(x, weights, experts, gate_up, down, capacity=None, scale_input=False):
    """Reference: x [N, D], weights/experts [N, K], gate_up [E, 2F, D], down [E, D, F] -> [N, D]."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(experts == e)             # row-major: token order, then slot
        if capacity is not None:
            token, slot = token[:capacity], slot[:capacity]
        w = weights[token, slot, None].to(x.dtype)
        if scale_input:
            y = _swiglu(x[token] * w, gate_up[e], down[e])
        else:
            y = _swiglu(x[token], gate_up[e], down[e]) * w
        out.index_add_(0, token, y)
    return out


def _grouped_linear(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """a [M, in] rows grouped by expert (counts [E]), w [E, out, in] -> [M, out]."""
    if a.device.type == "cpu" or a.dtype == torch.bfloat16:   # F.grouped_mm: any dtype on CPU, bf16 on CUDA
        return F.grouped_mm(a, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    parts = a.split(counts.tolist())
    return torch.cat([F.linear(p, w[e]) for e, p in enumerate(parts)])


def experts_fast(x, weights, experts, gate_up, down, capacity=None, scale_input=False):
    """Same contract as `experts_loop`: sort the N*K assignments by expert, two grouped matmuls, unsort."""
    N, K = experts.shape
    flat = experts.reshape(-1)                                    # [N*K]
    order = torch.argsort(flat, stable=True)                      # by expert, token order within
    counts = torch.bincount(flat, minlength=gate_up.shape[0])     # [E]
    if capacity is not None:
        starts = (counts.cumsum(0) - counts).repeat_interleave(counts)        # [N*K] group start per row
        order = order[torch.arange(N * K, device=x.device) - starts < capacity]
        counts = counts.clamp(max=capacity)
    token = order // K                                            # [M]
    w = weights.reshape(-1)[order, None].to(x.dtype)              # [M, 1]
    h = x[token] * w if scale_input else x[token]                 # [M, D]
    g, u = _grouped_linear(h, gate_up, counts).chunk(2, dim=-1)   # [M, F] each
    y = _grouped_linear(F.silu(g) * u, down, counts)              # [M, D]
    if not scale_input:
        y = y * w
    # back to (token, slot) rows and sum the K slots: deterministic, and ~4x faster than index_add_ on CPU
    rows = x.new_zeros(N * K, x.shape[1]) if capacity is not None else x.new_empty(N * K, x.shape[1])
    return rows.index_copy(0, order, y).view(N, K, -1).sum(1)


def balance_loss(logits: torch.Tensor, experts: torch.Tensor, coef: float) -> torch.Tensor:
    """Switch loss coef*E*sum_i f_i*P_i over one layer's logits [N, E] and choices [N, K]; = coef at balance."""
    E = logits.shape[-1]
    f = torch.bincount(experts.reshape(-1), minlength=E).float() / experts.numel()   # [E], sums to 1
    P = logits.float().softmax(-1).mean(0)                                          # [E]
    return coef * E * (f * P).sum()


def z_loss(logits: torch.Tensor, coef: float) -> torch.Tensor:
    return coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


# ----------------------------------------------------------------------------------------------------------
# modules

class Experts(nn.Module):
    """E SwiGLU experts as stacked tensors (transformers 5 layout)."""

    def __init__(self, n_experts: int, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * ffn_dim, dim))    # [E, 2F, D]
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))           # [E, D, F]
        bound_in, bound_f = 1 / math.sqrt(dim), 1 / math.sqrt(ffn_dim)              # nn.Linear's default
        nn.init.uniform_(self.gate_up_proj, -bound_in, bound_in)
        nn.init.uniform_(self.down_proj, -bound_f, bound_f)


class Router(nn.Module):
    """Router weight [E, D] (a plain parameter, not nn.Linear: LoRA's all-linear leaves routers alone, as PEFT
    does on transformers' routers), plus DeepSeek-V3's selection bias [E] when bias balancing is on."""

    def __init__(self, dim: int, n_experts: int, bias_balancing: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.uniform_(self.weight, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        if bias_balancing:
            self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)                                           # [N, E] logits


class MoEFeedForward(nn.Module):
    """x [B, T, D] -> (out [B, T, D], aux losses). Keeps `expert_counts` [E] and `dropped` for logging."""

    def __init__(self, cfg: ModelConfig, mc: MoEConfig):
        super().__init__()
        self.mc = mc
        self.gate = Router(cfg.dim, mc.n_experts, mc.bias_balancing)
        self.experts = Experts(mc.n_experts, cfg.dim, mc.expert_ffn_dim)
        if mc.shared_ffn_dim:
            self.shared_expert = MLP(cfg.dim, mc.shared_ffn_dim)
        if mc.shared_gate:
            self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False)
        if mc.bias_balancing:
            self.register_buffer("load_since_update", torch.zeros(mc.n_experts), persistent=False)
        self.expert_counts = torch.zeros(mc.n_experts, dtype=torch.long)
        self.dropped = 0

    def forward(self, x: torch.Tensor):
        B, T, D = x.shape
        mc = self.mc
        xf = x.reshape(-1, D)                                                     # [N, D]
        logits = self.gate(xf)                                                    # [N, E]
        bias = self.gate.e_score_correction_bias if mc.bias_balancing else None
        weights, experts = route(logits, mc, bias)                                # [N, K]
        capacity = expert_capacity(xf.shape[0], mc)
        run = experts_fast if mc.dispatch == "fast" else experts_loop
        out = run(xf, weights, experts, self.experts.gate_up_proj, self.experts.down_proj, capacity,
                  mc.scale_input)
        if mc.shared_ffn_dim:
            shared = self.shared_expert(xf)
            if mc.shared_gate:
                shared = torch.sigmoid(self.shared_expert_gate(xf)) * shared
            out = out + shared
        with torch.no_grad():
            counts = torch.bincount(experts.reshape(-1), minlength=mc.n_experts)
            self.expert_counts = counts
            self.dropped = 0 if capacity is None else int((counts - capacity).clamp(min=0).sum())
            if mc.bias_balancing and self.training:
                self.load_since_update += counts
        aux = {}
        if mc.balance_coef:
            aux["moe_balance"] = balance_loss(logits, experts, mc.balance_coef)
        if mc.z_coef:
            aux["moe_z"] = z_loss(logits, mc.z_coef)
        return out.reshape(B, T, D), aux


def make_moe_ffn(cfg: ModelConfig, layer: int) -> nn.Module | None:
    """The feed-forward of `layer`: an MoEFeedForward, or None where the config keeps the layer dense."""
    mc = moe_config(cfg)
    if mc.moe_layers is not None and layer not in mc.moe_layers:
        return None
    return MoEFeedForward(cfg, mc)


def moe_modules(model: nn.Module) -> dict[int, MoEFeedForward]:
    """{layer index: MoE feed-forward} of a Transformer."""
    return {i: b.mlp for i, b in enumerate(model.model.layers) if isinstance(b.mlp, MoEFeedForward)}


def expert_spread(model: nn.Module) -> float:
    """How far the experts of any MoE layer have moved apart: the max over layers and expert tensors of
    max_{e,f} ||W_e - W_f|| / (||W|| / sqrt(E)), with expert LoRA applied; 0 for a freshly upcycled model."""
    out = 0.0
    with torch.no_grad():
        for m in moe_modules(model).values():
            for name in ("gate_up_proj", "down_proj"):
                W = getattr(m.experts, name)                                       # [E, out, in], LoRA folded in
                d = (W[:, None] - W[None]).flatten(2).norm(dim=-1).max()
                out = max(out, float(d / W.norm() * W.shape[0] ** 0.5))
    return out


def expert_load(model: nn.Module) -> dict[int, torch.Tensor]:
    """{layer: assignments per expert [E]} of the last forward, for logging."""
    return {i: m.expert_counts.clone() for i, m in moe_modules(model).items()}


@torch.no_grad()
def update_router_bias(model: nn.Module, rate: float) -> None:
    """DeepSeek-V3 aux-loss-free step: b_i += rate * sign(mean load - load_i) over the load counted in
    training forwards since the last call (all micro-batches of the step), then reset the count."""
    mods = [m for m in moe_modules(model).values() if m.mc.bias_balancing]
    if not mods:
        raise ValueError("update_router_bias: no MoE layer has bias_balancing=True")
    for m in mods:
        load = m.load_since_update
        m.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        load.zero_()
