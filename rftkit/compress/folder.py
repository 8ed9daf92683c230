"""The compressed model folder: written by `rft compress`, read back with the same module kinds and tensors.

    save_compressed(model, record, "out", tokenizer_dir=folder); model = load_compressed("out")
    model = rftkit.loading.load_model("out")     # the same, once this module is imported (it registers itself)

A compressed model is a folder: config.json (the dense architecture, possibly smaller), compress.json (which
module is stored how, so the loader rebuilds the same modules), model.safetensors (low-bit tensors as they
are) and the tokenizer files. Unstructured-pruned weights are stored as their non-zero values plus a bitmask
(1 bit per weight) and expanded to dense matrices on load: the disk shrinks, the matmuls do not (no sparse
kernel on CPU beats MKL at 50%). `densify` turns the compressed modules back into plain ones (for export).

rftkit.loading knows nothing of this format: importing this module registers `load_compressed` for folders
holding compress.json (`rftkit.loading.register_folder_format`), and the `rft` command imports it, so the
engine, the server and `rft eval` load a compressed folder like any other.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from rftkit.loading import register_folder_format
from rftkit.loading.hf import config_to_hf, load_config
from rftkit.loading.weights import SkipRandomInit, read_safetensors
from rftkit.lora import lora_modules
from rftkit.model import Transformer, rope_inv_freq

FORMAT = "rftkit-compressed"
CONFIG = "compress.json"


def _module_for(kind: dict, path: str, model) -> nn.Module:
    """An empty module of the stored kind at `path` (the tensors come from the safetensors file)."""
    cur = model.get_submodule(path)
    if kind["kind"] == "quant":
        from rftkit.compress.quantize import QuantLinear
        return QuantLinear(cur.in_features, cur.out_features, kind["bits"], kind["group_size"], cur.bias is not None)
    if kind["kind"] == "quant_embedding":
        from rftkit.compress.quantize import QuantEmbedding
        return QuantEmbedding(cur.num_embeddings, cur.embedding_dim)
    if kind["kind"] == "lowrank":
        from rftkit.compress.factorize import LowRankLinear
        return LowRankLinear(cur.in_features, cur.out_features, kind["rank"], cur.bias is not None)
    if kind["kind"] == "kmeans":
        from rftkit.compress.factorize import SharedLinear
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
    from rftkit.compress.quantize import QuantEmbedding
    return model.cfg.tie_embeddings and isinstance(model.model.embed_tokens, QuantEmbedding)


def save_compressed(model, record: dict, folder, tokenizer_dir: Path | None = None, overwrite: bool = False) -> Path:
    """config.json + compress.json + model.safetensors (+ tokenizer files), written to a temporary folder and
    renamed. Tied weights are stored once."""
    from safetensors.torch import save_file
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
    (tmp / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
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
    from rftkit.compress.quantize import _swap
    folder = Path(folder)
    info = json.loads((folder / CONFIG).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG}: not an rftkit compressed model (format {info.get('format')!r})")
    cfg = load_config(folder)
    with SkipRandomInit():
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
    from rftkit.compress.factorize import LowRankLinear, SharedLinear
    from rftkit.compress.quantize import QuantEmbedding, QuantLinear, _swap
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


register_folder_format(CONFIG, load_compressed)
