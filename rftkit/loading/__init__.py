"""Loading models: one entry point over every format rftkit reads, split by format into the modules below.

    model, tok = load(None)                      # the embedded SmolLM2-135M-Instruct
    model, tok = load("Qwen/Qwen2.5-0.5B-Instruct")  # a Hub id: the HF cache, else downloaded (safetensors)
    model = load_model("path/to/hf-folder")      # or a .gguf file, or a folder another layer registered

  hf.py         HF folders: config.json <-> ModelConfig, MoE checkpoints' expert tensors (transformers' names)
  weights.py    safetensors: read (mapped, aligned), check, attach without init, write aligned; model folders
  checkpoint.py training checkpoints: trainable weights, optimizer and RNG state (safetensors + JSON)
  gguf_file.py  GGUF files: read (dequantized, converted once into the cache) and write (for llama.cpp)
  embedded.py   the embedded default model: found or fetched, hash-checked, converted once
  hub.py        Hub ids (ORG/NAME): the Hugging Face cache first, then a safetensors-only download
  cache.py      the cache folder ($RFTKIT_CACHE) and folders built into it atomically

A spec resolves to a folder with config.json (`resolve`). Folders written by higher layers carry a marker file
and are read by the loader that layer registers when it is imported (`register_folder_format`; importing
rftkit.compress.folder registers `compress.json`), so loading imports nothing above it. The `rft` command
imports those modules before it runs a command.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from rftkit.loading.cache import cache_dir
from rftkit.loading.embedded import EMBEDDED, ensure_embedded
from rftkit.loading.gguf_file import convert_gguf_cached, read_gguf
from rftkit.loading.hf import convert_hf_state_dict, load_config
from rftkit.loading.hub import is_hub_id, resolve_hub
from rftkit.loading.weights import build_model, read_weights, save_model_folder
from rftkit.model import Transformer

if TYPE_CHECKING:
    from rftkit.tokenizer import Tokenizer

__all__ = ["load", "load_model", "load_tokenizer", "resolve", "load_config", "register_folder_format",
           "cache_dir", "EMBEDDED", "read_gguf", "save_model_folder"]

# marker file -> loader(folder, device) of a folder format that a higher layer owns
FOLDER_FORMATS: dict[str, Callable[[Path, str | torch.device], Transformer]] = {}
# markers whose layer is known, for the error when it has not been imported
FOLDER_FORMAT_OWNERS = {"compress.json": "rftkit.compress.folder"}


def register_folder_format(marker: str, loader: Callable[[Path, str | torch.device], Transformer]) -> None:
    """`load_model` reads a folder that holds the file `marker` with `loader(folder, device)`."""
    FOLDER_FORMATS[marker] = loader


def resolve(spec: str | os.PathLike | None) -> Path:
    """A model spec -> a folder with config.json (converting the embedded model or a GGUF on first use, taking
    a Hub id ORG/NAME from the Hugging Face cache or the Hub)."""
    if spec is None or str(spec).lower() == EMBEDDED:
        return ensure_embedded()
    path = Path(spec).expanduser()
    if not path.exists() and is_hub_id(str(spec)):
        return resolve_hub(str(spec))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder or file (use a HF folder, a .gguf file, or "
                                f"'{EMBEDDED}')")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf; a HF model is a folder with config.json")
        return convert_gguf_cached(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    return path


def load_model(spec: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    folder = resolve(spec)
    for marker, loader in FOLDER_FORMATS.items():
        if (folder / marker).is_file():
            return loader(folder, device)
    for marker, owner in FOLDER_FORMAT_OWNERS.items():
        if (folder / marker).is_file():
            raise ValueError(f"{folder}: holds {marker}, a folder format of {owner} (`rft compress` writes it); "
                             f"import {owner} first, which registers its loader with rftkit.loading")
    cfg = load_config(folder)
    state, origin = read_weights(folder)
    if cfg.moe is not None:
        state = convert_hf_state_dict(cfg, state)       # expert weights: HF layout -> ours
    return build_model(cfg, state, str(folder), device, dtype, origin)


def load_tokenizer(spec: str | None = None) -> "Tokenizer":
    from rftkit.tokenizer import Tokenizer
    return Tokenizer.from_dir(resolve(spec))


def load(spec: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a model spec: None / 'smollm2-135m-instruct', a HF folder, a .gguf file or a Hub id."""
    return load_model(spec, device, dtype), load_tokenizer(spec)
