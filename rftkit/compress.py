"""rft compress: make the model smaller (and faster) before it ships, and measure what it cost.

    rft compress --method int4 --adapter rft-demo/adapter --out smollm2-int4
    model, record = compress(model, "wanda", sparsity=0.5, calib=calibration_batches(tok))
    save_compressed(model, record, "out"); model = load_compressed("out")

Methods (each a transform over modules, returning the model and a record of what it did per module):
  int8, int4           weight-only quantization (rftkit.quantize): low-bit storage, fast decode kernel
  magnitude, wanda     unstructured pruning at `sparsity` (rftkit.prune); 2:4 is `--pattern 2:4`
  structured           MLP neurons and attention heads (equally from every GQA group) ranked by calibration
                       activation: a smaller dense model (`--ratio` of each removed)
  svd                  low-rank factorization keeping `--energy` of each matrix's squared singular values
                       (or a fixed `--rank`)
  kmeans               weight sharing: each matrix clustered into `--clusters` shared values (rftkit.factorize)
  distill              structured pruning, then KL distillation from the original (rftkit.distill) on
                       calibration text + the teacher's answers to `--distill-samples` train prompts

A compressed model is a folder: config.json (the dense architecture, possibly smaller), compress.json (which
module is stored how, so the loader rebuilds the same modules), model.safetensors (low-bit tensors as they
are) and the tokenizer files. Unstructured-pruned weights are stored as their non-zero values plus a bitmask
(1 bit per weight) and expanded to dense matrices on load: the disk shrinks, the matmuls do not (no sparse
kernel on CPU beats MKL at 50%). Calibration and perplexity text is the standard library's
`pydoc_data.topics` (~465 kB of English, always offline): calibration takes its first tokens, perplexity
the ones after.

An adapter meets a compressed model unmerged: quantized, pruned, factorized and shared layers are linear
layers that LoRA wraps. Structured pruning and distillation change the shapes the adapter was trained for,
so with `--adapter` those two compress the specialist (base + adapter merged) and its accuracy is reported.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

METHODS = ("int8", "int4", "magnitude", "wanda", "structured", "svd", "kmeans", "distill")
FORMAT = "rftkit-compressed"
CONFIG = "compress.json"


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
    from rftkit.quantize import check_bits
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
        from rftkit.quantize import quantize
        head = settings.get("head_bits", 8) or None
        record["modules"] = quantize(model, int(method[3:]), settings.get("group_size", 32), head)
    elif method in ("magnitude", "wanda"):
        from rftkit.prune import prune_unstructured
        record.update(prune_unstructured(model, method, settings.get("sparsity", 0.5),
                                         settings.get("pattern", "unstructured"), calib))
    elif method in ("structured", "distill"):
        from rftkit.prune import prune_structured
        if method == "distill" and teacher is None:
            teacher = copy.deepcopy(model)              # the unpruned model teaches
        model, info = prune_structured(model, settings.get("ratio", 0.25), calib, head_ratio,
                                       settings.get("rank_by", "activation"), settings.get("seed", 0))
        record.update(info)
        if method == "distill":
            from rftkit.distill import distill
            data = distill_data if distill_data is not None else calib
            if data is None:
                raise ValueError("distill needs data: calibration batches or teacher samples")
            record["distill"] = distill(model, teacher, data, steps=settings.get("distill_steps", 200),
                                        lr=settings.get("distill_lr", 1e-4), seed=settings.get("seed", 0),
                                        batch=settings.get("distill_batch", 8),
                                        log_every=settings.get("log_every", 0))
    elif method == "svd":
        from rftkit.factorize import low_rank
        record["modules"] = low_rank(model, settings.get("energy", 0.9), settings.get("rank", 0))
    elif method == "kmeans":
        from rftkit.factorize import weight_share
        record["modules"] = weight_share(model, settings.get("clusters", 16), seed=settings.get("seed", 0))
    return model, record


# ----------------------------------------------------------------------------------------------------------
# save / load

def _module_for(kind: dict, path: str, model) -> nn.Module:
    """An empty module of the stored kind at `path` (the tensors come from the safetensors file)."""
    cur = model.get_submodule(path)
    if kind["kind"] == "quant":
        from rftkit.quantize import QuantLinear
        return QuantLinear(cur.in_features, cur.out_features, kind["bits"], kind["group_size"], cur.bias is not None)
    if kind["kind"] == "quant_embedding":
        from rftkit.quantize import QuantEmbedding
        return QuantEmbedding(cur.num_embeddings, cur.embedding_dim)
    if kind["kind"] == "lowrank":
        from rftkit.factorize import LowRankLinear
        return LowRankLinear(cur.in_features, cur.out_features, kind["rank"], cur.bias is not None)
    if kind["kind"] == "kmeans":
        from rftkit.factorize import SharedLinear
        return SharedLinear(cur.in_features, cur.out_features, kind["clusters"], cur.bias is not None)
    raise ValueError(f"{CONFIG}: unknown module kind {kind['kind']!r} at {path}")


STORED_AS_IS = ("dense", "sparse")        # plain nn.Linear in memory (sparse: packed on disk, see below)


def pack_sparse(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (non-zero values [nnz] in row-major order, bitmask uint8 [ceil(N*K/8)], bit i = entry i)."""
    keep = (w != 0).reshape(-1)
    bits = torch.nn.functional.pad(keep, (0, -len(keep) % 8)).view(-1, 8).to(torch.uint8)
    mask = (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
    return w.reshape(-1)[keep].contiguous(), mask


def unpack_sparse(values: torch.Tensor, mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    n = shape[0] * shape[1]
    keep = ((mask[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n].bool()
    if int(keep.sum()) != len(values):
        raise ValueError(f"sparse tensor: the mask has {int(keep.sum())} entries set but {len(values)} values")
    w = torch.zeros(n, dtype=values.dtype)
    w[keep] = values
    return w.view(shape)


def _tied_quant(model) -> bool:
    from rftkit.quantize import QuantEmbedding
    return model.cfg.tie_embeddings and isinstance(model.model.embed_tokens, QuantEmbedding)


def save_compressed(model, record: dict, folder, tokenizer_dir: Path | None = None, overwrite: bool = False) -> Path:
    """config.json + compress.json + model.safetensors (+ tokenizer files), written to a temporary folder and
    renamed. Tied weights are stored once."""
    from safetensors.torch import save_file
    from rftkit.lora import lora_modules
    if lora_modules(model):
        raise ValueError("save_compressed: the model has LoRA modules; save the adapter separately (save_lora)")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"{folder}: output folder exists and is not empty (pass --overwrite to replace it)")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        drop = ("lm_head.qweight", "lm_head.scales") if _tied_quant(model) else ("lm_head.weight",)
        for k in drop:
            state.pop(k, None)
    for path, kind in record["modules"].items():
        if kind["kind"] == "sparse":
            state[f"{path}.weight_values"], state[f"{path}.weight_mask"] = pack_sparse(state.pop(f"{path}.weight"))
    meta = {"format": "pt", "rftkit": FORMAT}
    save_file(state, str(tmp / "model.safetensors"), metadata=meta)
    (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
    info = {"format": FORMAT, "version": 1, **{k: v for k, v in record.items() if k != "modules"},
            "modules": record["modules"]}
    (tmp / CONFIG).write_text(json.dumps(info, indent=2, default=str))
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                     "generation_config.json"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, tmp / name)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def is_compressed(folder) -> bool:
    return (Path(folder) / CONFIG).is_file()


def load_compressed(folder, device: str = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_compressed`: the same module kinds, the same tensors."""
    from rftkit.loading import _SkipRandomInit, load_config, read_safetensors
    from rftkit.model import Transformer, rope_inv_freq
    from rftkit.quantize import _swap
    folder = Path(folder)
    info = json.loads((folder / CONFIG).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG}: not an rftkit compressed model (format {info.get('format')!r})")
    cfg = load_config(folder)
    with _SkipRandomInit():
        model = Transformer(cfg)
        for path, kind in info["modules"].items():
            if kind["kind"] not in STORED_AS_IS:
                _swap(model, path, _module_for(kind, path, model))
    state = read_safetensors(folder / "model.safetensors")
    for path, kind in info["modules"].items():
        if kind["kind"] == "sparse":
            lin = model.get_submodule(path)
            try:
                values, mask = state.pop(f"{path}.weight_values"), state.pop(f"{path}.weight_mask")
            except KeyError as e:
                raise ValueError(f"{folder}/model.safetensors: sparse module {path} lacks {e}") from None
            state[f"{path}.weight"] = unpack_sparse(values, mask, (lin.out_features, lin.in_features))
    tied_quant = cfg.tie_embeddings and info["modules"].get("model.embed_tokens", {}).get("kind") == "quant_embedding"
    if tied_quant:
        state["lm_head.qweight"] = state["model.embed_tokens.qweight"]
        state["lm_head.scales"] = state["model.embed_tokens.scales"]
    elif cfg.tie_embeddings and "lm_head" not in info["modules"]:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{folder}/model.safetensors does not fit {CONFIG}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.load_state_dict(state, assign=True)
    if tied_quant:
        model.model.embed_tokens.qweight = model.lm_head.qweight
        model.model.embed_tokens.scales = model.lm_head.scales
    elif cfg.tie_embeddings and "lm_head" not in info["modules"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)
    return model.to(device).eval()


@torch.no_grad()
def densify(model) -> nn.Module:
    """Every compressed module replaced by the plain nn.Linear / nn.Embedding of its (dequantized) weight,
    in place: for exporting (HF folder, GGUF) and for merging an adapter. Tied embeddings stay tied."""
    from rftkit.factorize import LowRankLinear, SharedLinear
    from rftkit.quantize import QuantEmbedding, QuantLinear, _swap
    for path, m in list(model.named_modules()):
        if isinstance(m, (QuantLinear, LowRankLinear, SharedLinear)):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.copy_(m.weight)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            _swap(model, path, lin.requires_grad_(False))
        elif isinstance(m, QuantEmbedding):
            emb = nn.Embedding(m.num_embeddings, m.embedding_dim)
            emb.weight.copy_(m.weight)
            _swap(model, path, emb.requires_grad_(False))
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def count_params(model) -> tuple[int, int]:
    """(logical weights, non-zero weights) over parameters and low-bit buffers, tied tensors once. A quantized
    or shared matrix counts as its N*K weights; a factorized one as its R*(N+K) parameters."""
    from rftkit.factorize import SharedLinear
    from rftkit.quantize import QuantEmbedding, QuantLinear
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


def run_compress(cfg: CompressConfig) -> dict:
    """rft compress: one method (or `--sweep`), measured against the original (rftkit.compress_report)."""
    from rftkit.compress_report import run_one, run_sweep
    return run_sweep(cfg) if cfg.sweep else run_one(cfg)
