"""The compression transforms behind `rft compress`: one call applies a method to a model and records what it
did; the settings of the command (CompressConfig) are checked here before any work.

    model, record = compress(model, "wanda", sparsity=0.5, calib=calibration_batches(tok))
    save_compressed(model, record, "out")          # rftkit.compress.folder

Methods (each a transform over modules, returning the model and a record of what it did per module):
  int8, int4           weight-only quantization (compress/quantize.py): low-bit storage, fast decode kernel
  magnitude, wanda     unstructured pruning at `sparsity` (compress/prune.py); 2:4 is `--pattern 2:4`
  structured           MLP neurons and attention heads (equally from every GQA group) ranked by calibration
                       activation: a smaller dense model (`--ratio` of each removed)
  svd                  low-rank factorization keeping `--energy` of each matrix's squared singular values
                       (or a fixed `--rank`)
  kmeans               weight sharing: each matrix clustered into `--clusters` shared values (compress/factorize.py)
  distill              structured pruning, then KL distillation from the original (compress/distill.py) on
                       calibration text + the teacher's answers to `--distill-samples` train prompts

Calibration and perplexity text is the standard library's `pydoc_data.topics` (~465 kB of English, always
offline): calibration takes its first tokens, perplexity the ones after.

An adapter meets a compressed model unmerged: quantized, pruned, factorized and shared layers are linear
layers that LoRA wraps. Structured pruning and distillation change the shapes the adapter was trained for,
so with `--adapter` those two compress the specialist (base + adapter merged) and its accuracy is reported.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

METHODS = ("int8", "int4", "magnitude", "wanda", "structured", "svd", "kmeans", "distill")


@dataclass
class CompressConfig:
    method: str = "int4"                 # int8, int4, magnitude, wanda, structured, svd, kmeans, distill
    out: str = ""                        # folder for the compressed model (+ report.json)
    model: str | None = None             # model folder / .gguf / None = embedded smollm2-135m-instruct
    adapter: str | None = None           # LoRA adapter (PEFT) evaluated on top, unmerged
    task: str = "arithmetic"             # task for the accuracy columns (arithmetic, countdown, jsonl:FILE, ...)
    n: int = 200                         # held-out problems evaluated (0 = skip accuracy)
    group_size: int = 32                 # int4 group along the input dimension
    head_bits: int = 8                   # lm_head (and tied embedding) bits for int8/int4; 0 = keep fp32
    sparsity: float = 0.5                # fraction of weights pruned (magnitude, wanda)
    pattern: str = "unstructured"        # unstructured or N:M, e.g. 2:4 (magnitude, wanda)
    ratio: float = 0.25                  # fraction of MLP neurons (and query heads) removed per layer (structured, distill)
    head_ratio: float = -1.0             # fraction of query heads per GQA group removed (-1 = same as ratio)
    energy: float = 0.9                  # retained squared singular values per matrix (svd)
    rank: int = 0                        # fixed rank of every factorized matrix (svd); 0 = from --energy
    clusters: int = 16                   # codebook entries per matrix (kmeans)
    calib_tokens: int = 8192             # calibration tokens from pydoc_data.topics
    ppl_tokens: int = 16384              # perplexity tokens (a disjoint part of pydoc_data.topics); 0 = skip
    distill_steps: int = 200             # optimizer steps of distillation
    distill_lr: float = 1e-4             # distillation learning rate
    distill_samples: int = 256           # task train prompts answered by the teacher as distillation text (0 = text only)
    distill_batch: int = 8               # sequences per distillation step (calibration text cut into 128-token rows)
    speed_tokens: int = 64               # decode tokens timed per speed measurement; 0 = skip
    batch: int = 32                      # rows of the batched decode measurement
    seed: int = 0
    sweep: bool = False                  # run a grid of methods/settings, write sweep.csv/json + pareto.png
    sweep_methods: str = "int8,int4,magnitude,wanda,structured,svd,kmeans"  # methods of the sweep grid
    overwrite: bool = False              # replace an existing output folder

    def __post_init__(self):
        methods = self.sweep_methods.split(",") if self.sweep else [self.method]
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"unknown compression method {m!r} (choose from {', '.join(METHODS)})")
            validate(m, **{k: getattr(self, k) for k in ("group_size", "head_bits", "sparsity", "pattern", "ratio",
                                                          "energy", "clusters", "rank", "head_ratio")})


def validate(method: str, group_size: int = 32, head_bits: int = 8, sparsity: float = 0.5,
             pattern: str = "unstructured", ratio: float = 0.25, energy: float = 0.9, clusters: int = 16,
             rank: int = 0, head_ratio: float = -1.0, model_cfg=None) -> None:
    """Fail before any work on settings no transform can honour, naming the value."""
    from rftkit.compress.quantize import check_bits
    if method in ("int8", "int4"):
        check_bits(int(method[3:]), group_size)
        if head_bits:
            check_bits(head_bits, group_size)
    if method in ("magnitude", "wanda"):
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        if pattern != "unstructured":
            n, _, m = pattern.partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise ValueError(f"pattern must be unstructured or N:M with 0 < N < M (e.g. 2:4), got {pattern!r}")
    if method in ("structured", "distill"):
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        if head_ratio != -1.0 and not 0 <= head_ratio < 1:
            raise ValueError(f"head_ratio must be in [0, 1) (or -1 = ratio), got {head_ratio}")
    if method == "svd":
        if rank < 0:
            raise ValueError(f"rank must be >= 0 (0 = from energy), got {rank}")
        if rank == 0 and not 0 < energy < 1:
            raise ValueError(f"energy must be in (0, 1), got {energy}")
        if model_cfg is not None and rank > _smallest_dim(model_cfg):
            raise ValueError(f"rank {rank} is larger than the model's smallest linear layer allows "
                             f"(at most {_smallest_dim(model_cfg)})")
    if method == "kmeans" and not 2 <= clusters <= 256:
        raise ValueError(f"clusters must be in [2, 256] (one byte per index), got {clusters}")


def _smallest_dim(c) -> int:
    """The smallest matrix dimension among a model config's linear layers (q, k, v, o, gate, up, down)."""
    return min(c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_dim)


# ----------------------------------------------------------------------------------------------------------
# text for calibration and perplexity

def topics_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def text_tokens(tok, n_tokens: int, offset_tokens: int = 0) -> torch.Tensor:
    """`n_tokens` tokens of pydoc_data.topics starting `offset_tokens` in (calibration uses the start,
    perplexity the part after it)."""
    ids = tok.encode(topics_text())
    if offset_tokens + n_tokens > len(ids):
        raise ValueError(f"pydoc_data.topics has {len(ids)} tokens; asked for {n_tokens} after {offset_tokens}")
    return torch.tensor(ids[offset_tokens:offset_tokens + n_tokens])


def calibration_batches(tok, n_tokens: int = 8192, seq_len: int = 512) -> torch.Tensor:
    if n_tokens < 1:
        raise ValueError(f"calibration needs tokens, got calib_tokens={n_tokens}")
    seq_len = min(seq_len, n_tokens)
    ids = text_tokens(tok, n_tokens - n_tokens % seq_len)
    return ids.view(-1, seq_len)                                               # [B, T]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 512) -> float:
    """exp(mean NLL) over non-overlapping windows of `seq_len` tokens (fewer tokens: one window)."""
    seq_len = min(seq_len, len(ids))
    windows = ids[: len(ids) - len(ids) % seq_len].view(-1, seq_len)
    nll, count = 0.0, 0
    for w in windows.split(4):
        logits, _ = model(w)
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll -= lp.gather(-1, w[:, 1:, None]).sum().item()
        count += w[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


# ----------------------------------------------------------------------------------------------------------
# transforms

def compress(model, method: str, calib: torch.Tensor | None = None, teacher=None,
             distill_data: list[list[int]] | None = None, **kw) -> tuple[nn.Module, dict]:
    """Apply one method (in place; structured/distill return a new, smaller model). Returns (model, record):
    record["modules"] maps module paths to how they are stored; the rest says what was done. Distillation
    trains on `distill_data` (token lists) if given, else on the calibration rows."""
    settings = {k: v for k, v in kw.items() if v is not None}
    validate(method, model_cfg=model.cfg, **{k: v for k, v in settings.items() if k in (
        "group_size", "head_bits", "sparsity", "pattern", "ratio", "energy", "clusters", "rank", "head_ratio")})
    head_ratio = settings.get("head_ratio", -1.0)
    head_ratio = None if head_ratio == -1.0 else head_ratio
    record: dict = {"method": method, "settings": settings, "modules": {}}
    if method in ("int8", "int4"):
        from rftkit.compress.quantize import quantize
        head = settings.get("head_bits", 8) or None
        record["modules"] = quantize(model, int(method[3:]), settings.get("group_size", 32), head)
    elif method in ("magnitude", "wanda"):
        from rftkit.compress.prune import prune_unstructured
        record.update(prune_unstructured(model, method, settings.get("sparsity", 0.5),
                                         settings.get("pattern", "unstructured"), calib))
    elif method in ("structured", "distill"):
        from rftkit.compress.prune import prune_structured
        if method == "distill" and teacher is None:
            teacher = copy.deepcopy(model)              # the unpruned model teaches
        model, info = prune_structured(model, settings.get("ratio", 0.25), calib, head_ratio,
                                       settings.get("rank_by", "activation"), settings.get("seed", 0))
        record.update(info)
        if method == "distill":
            from rftkit.compress.distill import distill
            data = distill_data if distill_data is not None else calib
            if data is None:
                raise ValueError("distill needs data: calibration batches or teacher samples")
            record["distill"] = distill(model, teacher, data, steps=settings.get("distill_steps", 200),
                                        lr=settings.get("distill_lr", 1e-4), seed=settings.get("seed", 0),
                                        batch=settings.get("distill_batch", 8),
                                        log_every=settings.get("log_every", 0))
    elif method == "svd":
        from rftkit.compress.factorize import low_rank
        record["modules"] = low_rank(model, settings.get("energy", 0.9), settings.get("rank", 0))
    elif method == "kmeans":
        from rftkit.compress.factorize import weight_share
        record["modules"] = weight_share(model, settings.get("clusters", 16), seed=settings.get("seed", 0))
    return model, record


def count_params(model) -> tuple[int, int]:
    """(logical weights, non-zero weights) over parameters and low-bit buffers, tied tensors once. A quantized
    or shared matrix counts as its N*K weights; a factorized one as its R*(N+K) parameters."""
    from rftkit.compress.factorize import SharedLinear
    from rftkit.compress.quantize import QuantEmbedding, QuantLinear
    seen, total, nonzero = set(), 0, 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding, SharedLinear)):
            key = (m.qweight if not isinstance(m, SharedLinear) else m.codes).data_ptr()
            if key not in seen:
                seen.add(key)
                total += m.weight.numel()
                nonzero += int((m.weight != 0).sum())
            tensors = [] if isinstance(m, QuantEmbedding) or m.bias is None else [m.bias]
        else:
            tensors = list(m.parameters(recurse=False))
        for p in tensors:
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
                nonzero += int((p != 0).sum())
    return total, nonzero
