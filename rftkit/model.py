"""Our Llama-family decoder in plain PyTorch: Llama 2/3, SmolLM/SmolLM2, Qwen2/2.5, Qwen3, Mistral.

    cfg = ModelConfig(dim=64, n_layers=2)                # or rftkit.loading.hf.load_config(folder)
    model = Transformer(cfg)
    logits, aux = model(input_ids)                       # [B, T, V], {} for dense models

Module and parameter names follow `transformers` (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`)
so that HF state_dicts load as they are and PEFT adapter keys map one to one.

The KV cache is a protocol, not a class hierarchy: attention hands each layer's queries and new keys/values
with their positions to `cache.attend(layer, q, k, v, positions, window)` and gets the attention output back;
before a decode step (one new token per row) the model offers the cache the whole block stack
(`cache.run_blocks(model, x, cos, sin)`: True when the cache ran the blocks itself). The contiguous `KVCache`
here appends (`update`), runs the shared `attention`, its mask built from positions alone (causal, sliding
window, padding), and declines the stack; the engine's paged cache reads its blocks in place and, in decode
mode, runs the stack in one kernel call (rftkit.decode_stack).

Decode speed: with a handful of rows a step is a chain of matrix-vector products bound by memory bandwidth,
so plain `nn.Linear` layers go through `rftkit.kernels.linear` (rftkit.layers: a GEMV kernel for few rows on
CPU, torch's F.linear otherwise, and always under autograd or on CUDA).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from rftkit import kernels
from rftkit.layers import MLP, linear, linears
from rftkit.moe import make_moe_ffn


@dataclass
class ModelConfig:
    """Architecture hyper-parameters; rftkit.loading.hf maps them to and from a `transformers` config.json."""
    vocab_size: int = 256
    dim: int = 64                       # D, hidden_size
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 128                  # F, intermediate_size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    qkv_bias: bool = False              # Qwen2
    o_bias: bool = False                # Llama's attention_bias also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False               # Qwen3
    sliding_window: int | None = None   # Mistral; None = full attention
    window_layers: list[int] | None = None  # layers that use the window (None = all, when a window is set)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    moe: dict | None = None             # filled by the MoE configs (rftkit.moe)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3", "linear"):
                raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, llama3, linear)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.rms_norm(x, self.weight, self.eps)          # decode rows on CPU: one kernel call
        if y is not None:
            return y
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with `llama3` or `linear` scaling applied as in transformers."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    # llama3: leave high frequencies alone, divide low ones by `factor`, interpolate in between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, n, hd]; cos, sin [B, T, 1, hd]."""
    y = kernels.rope(x, cos, sin)
    return y if y is not None else x * cos + rotate_half(x) * sin


class KVCache:
    """Contiguous cache for a fixed batch: rows append T tokens per call, in step. For `rft generate`,
    tests and trainers; the engine has a paged cache with the same `update` protocol."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos: list[torch.Tensor | None] = [None] * n_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.pos[0] is None else self.pos[0].shape[1]

    def next_positions(self, B: int, T: int, device) -> torch.Tensor:
        if self.pos[0] is None:
            return torch.arange(T, device=device).expand(B, T)
        start = self.pos[0].max(dim=1).values + 1                       # [B]
        return start[:, None] + torch.arange(T, device=device)[None]

    def layer_state(self, layer: int) -> tuple:
        return self.k[layer], self.v[layer], self.pos[layer]

    def set_layer_state(self, layer: int, state: tuple) -> None:
        """Back to a `layer_state()`: a checkpointed block re-run in backward appends its keys/values again."""
        self.k[layer], self.v[layer], self.pos[layer] = state

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        # k, v: [B, Hkv, T, hd]; positions: [B, T]
        if self.k[layer] is None:
            self.k[layer], self.v[layer], self.pos[layer] = k, v, positions
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
            self.pos[layer] = torch.cat([self.pos[layer], positions], dim=1)
        return self.k[layer], self.v[layer], self.pos[layer]

    def attend(self, layer: int, q, k, v, positions, window: int | None):
        # q [B, H, T, hd]; k, v [B, Hkv, T, hd] -> [B, H, T, hd]
        k, v, k_pos = self.update(layer, k, v, positions)                        # [B, Hkv, S, hd]
        return attention(q, k, v, attention_mask(positions, k_pos, window))

    def run_blocks(self, model: "Transformer", x: torch.Tensor, cos, sin) -> bool:
        """Run a decode step's whole block stack itself (the engine's paged cache can); here: no, op by op."""
        return False


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] (True = attend) from query positions [B, T] and key positions [B, S]."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= (qp - kp) < window
    # a padding query (position -1) sees nothing; let it see everything so softmax stays finite
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        in_window = cfg.window_layers is None or layer in cfg.window_layers
        self.window = cfg.sliding_window if in_window else None
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, positions, cache=None, mask=None):
        B, T, _ = x.shape
        q, k, v = linears([self.q_proj, self.k_proj, self.v_proj], x)
        q = q.view(B, T, self.n_heads, self.hd)
        k = k.view(B, T, self.n_kv, self.hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)                    # [B, Hkv, T, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin).transpose(1, 2)                                # [B, H, T, hd]
        k = apply_rope(k, cos, sin).transpose(1, 2)                                # [B, Hkv, T, hd]
        if cache is not None:
            out = cache.attend(self.layer, q, k, v, positions, self.window)            # [B, H, T, hd]
        elif isinstance(mask, Packed):
            out = packed_attention(q, k, v, mask.lengths, self.window)
        else:
            if mask is None or self.window is not None:
                mask = attention_mask(positions, positions, self.window)
            out = attention(q, k, v, mask)
        return linear(self.o_proj, out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class Packed:
    """Sequences packed back to back in one row, `lengths` tokens each: attention stays inside each one."""

    def __init__(self, lengths: list[int]):
        self.lengths = [int(n) for n in lengths]


def packed_attention(q, k, v, lengths: list[int], window: int | None) -> torch.Tensor:
    """Causal attention within each packed sequence: q [1, H, N, hd], k, v [1, Hkv, N, hd], N = sum(lengths).
    One causal SDPA per sequence, so no token pays for another sequence's length (a block-diagonal mask over
    N x N would); on CPU without a window, every sequence in one kernel call, forward and backward
    (rftkit.kernels.packed_attention)."""
    if window is None:
        out = kernels.packed_attention(q, k, v, lengths)
        if out is not None:
            return out
    outs = []
    for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2)):
        if window is None:
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                       enable_gqa=ks.shape[1] != qs.shape[1]))
        else:
            pos = torch.arange(qs.shape[2], device=qs.device)[None]
            outs.append(attention(qs, ks, vs, attention_mask(pos, pos, window)))
    return torch.cat(outs, dim=2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, hd]; k, v [B, Hkv, S, hd] (grouped-query: H a multiple of Hkv); mask [B, 1, T, S]."""
    if q.shape[2] == 1:
        return _decode_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def _decode_attention(q, k, v, mask):
    """One query token per row, written out: on CPU, SDPA's flash kernel spent ~6 ms per layer on this
    (70% of a single-stream decode step), the plain matmuls well under 1 ms.
    q [B, H, 1, hd]; k, v [B, Hkv, S, hd]; mask [B, 1, 1, S]."""
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(B, n_kv, H // n_kv, hd)                                   # query heads grouped by KV head
    scores = (qg @ k.transpose(-1, -2)) * hd ** -0.5                          # [B, Hkv, H/Hkv, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v               # [B, Hkv, H/Hkv, hd]
    return out.reshape(B, H, 1, hd)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = _make_ffn(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, positions, cache, mask, aux: dict):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MLP):
            return x + self.mlp(h)
        out, layer_aux = self.mlp(h)            # MoE layers return their balancing losses
        for name, value in layer_aux.items():
            aux[name] = aux.get(name, 0.0) + value
        return x + out


def _make_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    if cfg.moe is not None:
        ffn = make_moe_ffn(cfg, layer)          # None for the dense layers of interleaved MoE models
        if ffn is not None:
            return ffn
    return MLP(cfg.dim, cfg.ffn_dim, cfg.mlp_bias)


def _checkpointed_block(block: Block, x, cos, sin, positions, cache, mask, aux: dict) -> torch.Tensor:
    """block(...) under activation checkpointing: backward re-runs the block instead of keeping its
    activations. The re-run starts from the cache's state before the block (else it would append its keys and
    values twice), and the MoE losses are those of the first run."""
    layer = block.self_attn.layer
    before = cache.layer_state(layer) if cache is not None else None
    runs: list[dict] = []

    def run(x):
        if cache is not None:
            cache.set_layer_state(layer, before)
        local: dict = {}
        y = block(x, cos, sin, positions, cache, mask, local)
        runs.append(local)
        return y

    y = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
    for name, value in runs[0].items():
        aux[name] = aux.get(name, 0.0) + value
    return y


class Decoder(nn.Module):
    """The `model.` prefix of HF checkpoints: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.grad_checkpointing = False     # training: keep only block inputs, recompute the rest in backward

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                num_logits: int | None = None, return_hidden: bool = False, seq_lens: list[int] | None = None):
        """input_ids [B, T]; positions [B, T] (-1 = padding), default = continue after the cache.
        seq_lens: input_ids is [1, sum(seq_lens)], that many sequences packed back to back with no padding
        (training: no FLOPs spent on padding); each starts at position 0 and attends only to itself.
        Returns (logits [B, T or num_logits, V] — or final hidden states [B, T, D] — , aux losses dict)."""
        B, T = input_ids.shape
        if seq_lens is not None:
            if cache is not None or B != 1 or sum(seq_lens) != T or min(seq_lens) < 1:
                raise ValueError(f"seq_lens {list(seq_lens)} must be positive and sum to the one row's {T} "
                                 f"tokens (input_ids {tuple(input_ids.shape)}, no cache)")
            positions = torch.cat([torch.arange(n, device=input_ids.device) for n in seq_lens])[None]
        if positions is None:
            positions = (cache.next_positions(B, T, input_ids.device) if cache is not None
                         else torch.arange(T, device=input_ids.device).expand(B, T))
        if self.cfg.sliding_window is None and self.cfg.max_seq_len and int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds the model's context of "
                             f"{self.cfg.max_seq_len} tokens")
        x = self.model.embed_tokens(input_ids)
        freqs = positions.clamp(min=0)[:, :, None].float() * self.inv_freq.float()[None, None]  # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]                               # [B, T, 1, hd]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = None
        if seq_lens is not None:
            mask = Packed(seq_lens)
        elif cache is None:
            mask = attention_mask(positions, positions, None)
        aux: dict = {}
        if not (T == 1 and cache is not None and cache.run_blocks(self, x, cos, sin)):
            checkpointed = self.grad_checkpointing and torch.is_grad_enabled() and \
                (cache is None or isinstance(cache, KVCache))
            for block in self.model.layers:
                if checkpointed:
                    x = _checkpointed_block(block, x, cos, sin, positions, cache, mask, aux)
                else:
                    x = block(x, cos, sin, positions, cache, mask, aux)
        x = self.model.norm(x)
        if return_hidden:
            return x, aux
        if num_logits is not None:
            x = x[:, -num_logits:]
        return linear(self.lm_head, x), aux

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device             # a buffer: a quantized lm_head's .weight would dequantize it

    def parameter_count(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
