"""Pruning: unstructured (magnitude, Wanda), N:M semi-structured, and structured (MLP neurons, attention heads).

    record = prune_unstructured(model, "wanda", sparsity=0.5, calib=ids)       # zeros in place, same shapes
    model, record = prune_structured(model, ratio=0.25, calib=ids)             # a new, smaller dense model

Unstructured. Each linear's weight W [N, K] gets a score per entry and the lowest-scoring fraction of every
output row is set to zero (Wanda's comparison group; magnitude uses the same rows so that the two differ only
in the score): magnitude scores |W|, Wanda scores |W| * ||X_k||_2, the norm of input feature k over the
calibration tokens (Sun et al. 2023). An input channel that carries large activations (LLMs have a few) makes
its weights matter more than their size says; magnitude pruning deletes them, Wanda keeps them. N:M keeps the
N best of every M consecutive inputs of a row (2:4 = 50%). The norms come from one pass of the dense model
over the calibration batches (not Wanda's layer-by-layer pass on the already-pruned prefix: simpler, and the
difference is second order at one-shot sparsities). The lm_head and the embedding are not pruned.

Structured. MLP neuron j of a layer contributes a_j(x) * down[:, j] to the residual stream (a = silu(gate x)
* up x), attention head h contributes o_proj[:, h] @ head_h(x). Each is ranked by the energy of that
contribution over the calibration tokens, sum_x ||contribution||^2 (activation-based importance, as in
Minitron), and the lowest `ratio` of every layer is removed: gate/up rows and down columns for neurons, q_proj
rows and o_proj columns for heads. Heads are removed in equal numbers from every GQA group (a group = one
KV head and the query heads that read it), so n_heads stays a multiple of n_kv_heads and the K/V projections
are untouched. Every layer loses the same count, so the result is our ordinary Transformer with a smaller
config (intermediate_size, num_attention_heads): saved as a plain folder that any loader rebuilds.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from rftkit.model import ModelConfig, Transformer


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {p: m for p, m in model.named_modules() if type(m) is nn.Linear and p != "lm_head"}


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N kept, M per block)."""
    if pattern == "unstructured":
        return None
    n, _, m = pattern.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ValueError(f"pattern must be unstructured or N:M with 0 < N < M (e.g. 2:4), got {pattern!r}")
    return int(n), int(m)


class _Probe(nn.Module):
    """Stands in for a linear layer during calibration: hands its input to `record`, then runs the layer.
    (Not a forward hook: the model may call plain nn.Linear weights through a kernel, bypassing hooks.)"""

    def __init__(self, inner: nn.Module, record):
        super().__init__()
        self.inner, self.record = inner, record

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.record(x)
        return self.inner(x)


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


@torch.no_grad()
def run_calibration(model: nn.Module, calib: torch.Tensor, probes: dict, batch: int = 4) -> None:
    """Forward the calibration batches calib [B, T] with probes {linear path: record(x)} in place of those
    linears; the model is restored afterwards, whatever happens."""
    originals = {p: model.get_submodule(p) for p in probes}
    try:
        for p, fn in probes.items():
            _swap(model, p, _Probe(originals[p], fn))
        for rows in calib.split(batch):
            model(rows)
    finally:
        for p, m in originals.items():
            _swap(model, p, m)


@torch.no_grad()
def input_norms(model: nn.Module, calib: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """{path: ||X_k||_2 [K]}: the norm of each input feature of the linear at `path` over all calibration tokens."""
    sums: dict[str, torch.Tensor] = {}

    def probe(path):
        def fn(x):
            x = x.reshape(-1, x.shape[-1]).float()                                      # [B*T, K]
            sums[path] = sums.get(path, 0) + x.pow(2).sum(0)
        return fn

    run_calibration(model, calib, {p: probe(p) for p in paths})
    return {p: s.sqrt() for p, s in sums.items()}


def prune_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Boolean keep-mask [N, K] from scores [N, K]: per row, drop the lowest `sparsity` fraction, or keep the
    N best of every M consecutive entries."""
    N, K = score.shape
    if nm is not None:
        n, m = nm
        if K % m:
            raise ValueError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {K}")
        blocks = score.reshape(N, K // m, m)
        keep = torch.zeros_like(blocks, dtype=torch.bool)
        keep.scatter_(-1, blocks.topk(n, dim=-1).indices, True)
        return keep.reshape(N, K)
    n_drop = int(round(K * sparsity))
    keep = torch.ones(N, K, dtype=torch.bool)
    if n_drop:
        keep.scatter_(1, score.topk(n_drop, dim=1, largest=False).indices, False)
    return keep


@torch.no_grad()
def prune_unstructured(model: nn.Module, method: str, sparsity: float = 0.5, pattern: str = "unstructured",
                       calib: torch.Tensor | None = None) -> dict:
    """Zero the lowest-scoring weights of every linear (not the lm_head) in place. Returns the record:
    {"modules": {path: {"kind": "sparse", "sparsity": fraction zero}}, "sparsity": overall fraction zero}."""
    if method not in ("magnitude", "wanda"):
        raise ValueError(f"unstructured pruning method must be magnitude or wanda, got {method!r}")
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    nm = parse_pattern(pattern)
    lins = _linears(model)
    if not lins:
        raise ValueError("prune_unstructured: the model has no nn.Linear layers to prune")
    if nm is not None:
        for p, m in lins.items():
            if m.in_features % nm[1]:
                raise ValueError(f"N:M pattern {pattern}: {p} has in_features={m.in_features}, not divisible by {nm[1]}")
    norms = None
    if method == "wanda":
        if calib is None:
            raise ValueError("wanda pruning needs calibration batches (calib=[B, T] token ids)")
        norms = input_norms(model, calib, list(lins))
    modules, zeros, total = {}, 0, 0
    for path, m in lins.items():
        w = m.weight
        score = w.abs().float() if norms is None else w.abs().float() * norms[path][None, :]   # [N, K]
        keep = prune_mask(score, sparsity, nm)
        w.mul_(keep.to(w.dtype))
        z = int((~keep).sum())
        modules[path] = {"kind": "sparse", "sparsity": z / keep.numel()}
        zeros, total = zeros + z, total + keep.numel()
    return {"modules": modules, "sparsity": zeros / total, "pattern": pattern}


# ----------------------------------------------------------------------------------------------------------
# structured

@torch.no_grad()
def structure_importance(model: Transformer, calib: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: neuron importance [F] and query-head importance [H], the energy of each unit's contribution
    to the residual stream over the calibration tokens."""
    cfg = model.cfg
    L, H, hd = cfg.n_layers, cfg.n_heads, cfg.head_dim
    neurons: list = [0] * L
    heads: list = [0] * L

    def mlp_probe(i, down):
        def fn(x):
            a = x.reshape(-1, x.shape[-1]).float()                                     # [B*T, F]
            col = down.weight.float().norm(dim=0)                                     # ||down[:, j]|| [F]
            neurons[i] = neurons[i] + a.pow(2).sum(0) * col.pow(2)
        return fn

    def head_probe(i, o_proj):
        def fn(x):
            x = x.reshape(-1, H, hd).float()                                          # [B*T, H, hd]
            w = o_proj.weight.float().view(-1, H, hd)                                 # [D, H, hd]
            out = torch.einsum("nhk,dhk->nhd", x, w)                                  # [B*T, H, D]
            heads[i] = heads[i] + out.pow(2).sum((0, 2))
        return fn

    probes = {}
    for i, block in enumerate(model.model.layers):
        probes[f"model.layers.{i}.mlp.down_proj"] = mlp_probe(i, block.mlp.down_proj)
        probes[f"model.layers.{i}.self_attn.o_proj"] = head_probe(i, block.self_attn.o_proj)
    run_calibration(model, calib, probes)
    if any(isinstance(t, int) for t in neurons + heads):
        raise RuntimeError("structured pruning: calibration did not reach every layer")
    return neurons, heads


def _keep_top(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    return score.topk(n_keep).indices.sort().values


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


@torch.no_grad()
def prune_structured(model: Transformer, ratio: float = 0.25, calib: torch.Tensor | None = None,
                     head_ratio: float | None = None, rank: str = "activation",
                     seed: int = 0) -> tuple[Transformer, dict]:
    """Remove the lowest-ranked `ratio` of every layer's MLP neurons and `head_ratio` (default `ratio`,
    rounded to whole heads per GQA group, at least one kept) of its query heads. `rank="random"` ranks at
    random (the baseline activation ranking is tested against). Returns (a new smaller model, record)."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    head_ratio = ratio if head_ratio is None else head_ratio
    if not 0 <= head_ratio < 1:
        raise ValueError(f"head_ratio must be in [0, 1), got {head_ratio}")
    if rank not in ("activation", "random"):
        raise ValueError(f"rank must be activation or random, got {rank!r}")
    cfg = model.cfg
    if cfg.moe is not None:
        raise ValueError("structured pruning of MoE models is not supported (experts are pruned as a whole, "
                         "not by neuron)")
    for i, block in enumerate(model.model.layers):
        for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.o_proj"):
            m = block.get_submodule(name)
            if type(m) is not nn.Linear:
                raise ValueError(f"structured pruning needs plain nn.Linear layers; model.layers.{i}.{name} is "
                                 f"{type(m).__name__} (prune before quantizing, factorizing or applying LoRA)")
    F_keep = max(1, int(round(cfg.ffn_dim * (1 - ratio))))
    per_group = cfg.n_heads // cfg.n_kv_heads
    q_keep = max(1, int(round(per_group * (1 - head_ratio))))
    if rank == "activation":
        if calib is None:
            raise ValueError("structured pruning by activation needs calibration batches (calib=[B, T] token ids)")
        neurons, heads = structure_importance(model, calib)
    else:
        g = torch.Generator().manual_seed(seed)
        neurons = [torch.rand(cfg.ffn_dim, generator=g) for _ in range(cfg.n_layers)]
        heads = [torch.rand(cfg.n_heads, generator=g) for _ in range(cfg.n_layers)]
    new_cfg = ModelConfig.from_dict({**cfg.to_dict(), "ffn_dim": F_keep, "n_heads": q_keep * cfg.n_kv_heads})
    new = copy.deepcopy(model)
    new.cfg = new_cfg
    hd = cfg.head_dim
    kept_neurons, kept_heads = [], []
    for i, block in enumerate(new.model.layers):
        mlp, attn = block.mlp, block.self_attn
        idx = _keep_top(neurons[i], F_keep)                                            # [F_keep]
        mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, rows=idx), _sliced(mlp.up_proj, rows=idx)
        mlp.down_proj = _sliced(mlp.down_proj, cols=idx)
        # heads: the best q_keep of each GQA group (query head h reads KV head h // per_group)
        groups = heads[i].view(cfg.n_kv_heads, per_group)
        hk = torch.cat([g * per_group + _keep_top(groups[g], q_keep) for g in range(cfg.n_kv_heads)])
        cols = (hk[:, None] * hd + torch.arange(hd)[None]).reshape(-1)                 # [H_keep * hd]
        attn.q_proj, attn.o_proj = _sliced(attn.q_proj, rows=cols), _sliced(attn.o_proj, cols=cols)
        attn.n_heads = new_cfg.n_heads
        kept_neurons.append(idx.tolist())
        kept_heads.append(hk.tolist())
    if cfg.tie_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    record = {"modules": {}, "ratio": ratio, "head_ratio": head_ratio, "rank": rank,
              "ffn_dim": [cfg.ffn_dim, F_keep], "n_heads": [cfg.n_heads, new_cfg.n_heads],
              "kept_neurons": kept_neurons, "kept_heads": kept_heads,
              "params": [model.parameter_count(), new.parameter_count()]}
    return new.eval(), record
