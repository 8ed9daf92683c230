"""Export: a model with its adapter merged, as a Hugging Face folder that `transformers` (and vLLM, llama.cpp's
converter, ...) load as a plain model, or as a GGUF file that llama.cpp runs.

    rft export --adapter runs/sft/adapter --out merged-model
    rft export --adapter runs/sft/adapter --gguf merged.gguf [--gguf-type f16|f32|q8_0|q4_1]
    run_export(ExportConfig(adapter="runs/sft/adapter", out="merged-model"))

`--model` may also be a folder written by `rft compress`: it is rebuilt with its compressed modules and
exported dequantized (rftkit.loading.gguf_file says what that means for GGUF).

The folder holds config.json (`rftkit.loading.hf.config_to_hf`), model.safetensors (W + s·B·A folded into
each adapted weight) and the base model's tokenizer files. It is written to a temporary folder and renamed,
so a reader never sees half an export.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from rftkit.peft_format import CONFIG_FILE


@dataclass
class ExportConfig:
    out: str = ""                        # output folder (config.json, model.safetensors, tokenizer files)
    gguf: str = ""                       # also (or only) write a GGUF file that llama.cpp runs
    gguf_type: str = "f16"               # GGUF matrix type: f32, f16, q8_0 or q4_1 (norms stay f32)
    gguf_pre: str | None = None          # llama.cpp pre-tokenizer name (default: derived from tokenizer.json)
    adapter: str | None = None           # LoRA adapter folder (PEFT format) to merge; None = the model as is
    model: str | None = None             # base model (default: the adapter's base_model_name_or_path, else embedded)
    overwrite: bool = False              # replace an existing output folder


def base_of(adapter: str | Path) -> str | None:
    """The adapter's recorded base model when this machine can load it (a local path or the embedded name)."""
    from rftkit.loading import EMBEDDED
    base = json.loads((Path(adapter) / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    if base is None or base.lower() == EMBEDDED or Path(base).expanduser().exists():
        return base
    raise ValueError(f"{adapter}: its base model {base!r} is not a local path; pass --model")


def export(model, out: str | Path, tokenizer_dir: Path | None, overwrite: bool = False) -> Path:
    """Write `model` (LoRA merged if it has any) as an HF folder at `out`, atomically."""
    from rftkit.loading.weights import save_model_folder
    from rftkit.lora import lora_modules, merge_lora
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: output folder exists and is not empty (pass --overwrite to replace it)")
    if lora_modules(model):
        merge_lora(model)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(model, tmp, tokenizer_dir=tokenizer_dir)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def run_export(cfg: ExportConfig) -> Path:
    from rftkit.compress.folder import densify, is_compressed, load_compressed
    from rftkit.loading import load_model, resolve
    from rftkit.lora import load_lora, merge_lora
    if not cfg.out and not cfg.gguf:
        raise ValueError("--out (an HF folder) or --gguf (a GGUF file) is required")
    if cfg.gguf:
        from rftkit.loading.gguf_file import DTYPES
        if cfg.gguf_type not in DTYPES:
            raise ValueError(f"--gguf-type must be one of {', '.join(DTYPES)}, got {cfg.gguf_type!r}")
        if Path(cfg.gguf).exists() and not cfg.overwrite:
            raise ValueError(f"{cfg.gguf}: file exists (pass --overwrite to replace it)")
    spec = cfg.model if cfg.model is not None or cfg.adapter is None else base_of(cfg.adapter)
    folder = resolve(spec)
    model = densify(load_compressed(folder)) if is_compressed(folder) else load_model(str(folder))
    if cfg.adapter is not None:
        load_lora(model, cfg.adapter)
    result = None
    if cfg.gguf:
        from rftkit.loading.gguf_file import write_gguf
        if cfg.adapter is not None:
            merge_lora(model)
        result = write_gguf(model, cfg.gguf, folder, cfg.gguf_type, cfg.gguf_pre)
        print(f"rft export: {folder}{' + ' + cfg.adapter if cfg.adapter else ''} -> {result} ({cfg.gguf_type})")
    if cfg.out:
        result = export(model, cfg.out, folder, cfg.overwrite)
        print(f"rft export: {'merged ' + cfg.adapter + ' into ' if cfg.adapter else ''}{folder} -> {result}")
    return result
