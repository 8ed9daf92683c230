"""Model weights in safetensors files: read (memory-mapped, aligned), checked against a model, attached
without random init, and written with a padded header so they map back aligned.

    state, origin = read_weights(folder)                 # every *.safetensors of a folder (or its index)
    model = build_model(cfg, state, source=str(folder))  # parameters ARE the tensors: no init, no copy
    save_model_folder(model, "out")                      # config.json + model.safetensors (+ tokenizer files)

Weights are read with `safetensors.torch.load_file` (memory-mapped) and attached to a model built without
random init with `load_state_dict(assign=True)`: no init, and no copy of a tensor that starts on a 64-byte
boundary in the file (several processes then share the page cache); a tensor off that boundary is copied
once into aligned memory, since the kernels' AVX-512 loads would each straddle two cache lines (`aligned`).
Loading the 135M model takes a fraction of a second.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from rftkit.distributed import full_tensor
from rftkit.loading.hf import config_to_hf
from rftkit.model import ModelConfig, Transformer, rope_inv_freq

INDEX = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: those its index names, else every *.safetensors."""
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        for name in names:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: weight file named in {INDEX} is missing")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights in the model folder")
    return files


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types without the file name
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a folder, and which file each came from (for error messages)."""
    state, origin = {}, {}
    for f in weight_files(folder):
        for k, v in read_safetensors(f).items():
            if k in state:
                raise ValueError(f"{f}: tensor {k} is also in {origin[k]}")
            state[k], origin[k] = v, f.name
    return state, origin


def check_weights(model: Transformer, state: dict[str, torch.Tensor], source: str,
                  origin: dict[str, str] | None = None) -> None:
    """Raise naming the file and the first keys when `state` does not fit `model` exactly. `origin` maps a
    key to the file (in folder `source`) that holds it."""
    origin = origin or {}
    own = model.state_dict()
    tied = model.cfg.tie_embeddings
    missing = [k for k in own if k not in state and not (k == "lm_head.weight" and tied)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        files = sorted(set(origin.values()))
        where = f"{source}/{files[0]}" if len(files) == 1 else source
        bad_files = sorted({origin[k] for k in unexpected if k in origin})
        raise ValueError(f"{where}: weights do not fit config.json: {len(missing)} missing {_first(missing)}, "
                         f"{len(unexpected)} unexpected {_first(unexpected)}"
                         f"{' (in ' + ', '.join(bad_files) + ')' if len(files) > 1 and bad_files else ''}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            where = f"{source}/{origin[k]}" if k in origin else source
            raise ValueError(f"{where}: tensor {k} has shape {tuple(v.shape)}, config.json wants "
                             f"{tuple(own[k].shape)}")


def _first(keys: list[str], n: int = 4) -> str:
    return str(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")


RANDOM_INITS = {"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "orthogonal_", "sparse_", "random_", "bernoulli_", "exponential_"}


class SkipRandomInit(TorchFunctionMode):
    """Inside: random initialisers (`nn.init.*`, `Tensor.normal_`, ...) return their tensor untouched, so a
    model is built in `torch.empty` memory that no page of is ever written before the checkpoint's tensors
    replace it. A torch-function mode is thread-local, unlike patching `torch.nn.init`; and unlike building on
    the meta device it computes buffers such as RoPE frequencies for real (meta ops import torch._dynamo:
    +1 s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in RANDOM_INITS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str, device="cpu",
                dtype=torch.float32, origin: dict[str, str] | None = None) -> Transformer:
    """A model whose parameters ARE the given tensors (attached with `assign`: no random init, no copy), but for
    tensors off a 64-byte boundary, which are copied into aligned memory (`aligned`)."""
    with SkipRandomInit():
        model = Transformer(cfg)
    check_weights(model, state, source, origin)
    state = {k: aligned(v) for k, v in state.items()}
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype)
    model.inv_freq = rope_inv_freq(cfg).to(device)      # kept fp32 whatever the weights' dtype
    return model.eval()


ALIGN = 64      # bytes: a cache line, one AVX-512 load


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself where its data starts on an ALIGN-byte boundary, else an aligned copy (torch allocates at 64).
    A safetensors file places tensors wherever its header ends (our converted SmolLM2 file: every tensor at 40
    mod 64), and a 16-lane kernel then splits every load across two cache lines: on a 2-core Zen 5 EPYC the
    engine decoded 64 x 64 tokens at 723 tok/s on the mapped weights against 900 tok/s on aligned copies. The
    adapter bank aligns the LoRA A matrices it reads from PEFT files the same way."""
    if t.device.type != "cpu" or t.data_ptr() % ALIGN == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the header padded with spaces (the format allows it) so the data
    starts on an ALIGN-byte boundary: mapped back, every tensor whose predecessors fill whole lines (all of a
    model whose rows are multiples of 16 floats) is aligned and loads without a copy."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".unpadded")
    save_file(state, str(tmp), metadata=metadata)
    pad_header(tmp, path)
    tmp.unlink()


def data_aligned(path: Path) -> bool:
    """Whether a safetensors file's data starts on an ALIGN-byte boundary."""
    with open(path, "rb") as f:
        return (8 + int.from_bytes(f.read(8), "little")) % ALIGN == 0


def pad_header(src_path: Path, dst_path: Path) -> None:
    """Copy a safetensors file with its header padded with spaces so the data starts on an ALIGN-byte boundary."""
    with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
        n = int.from_bytes(src.read(8), "little")
        pad = -(8 + n) % ALIGN
        dst.write((n + pad).to_bytes(8, "little") + src.read(n) + b" " * pad)
        shutil.copyfileobj(src, dst, 16 << 20)


def save_model_folder(model: Transformer, folder: Path, tokenizer_dir: Path | None = None, write: bool = True) -> None:
    """config.json + model.safetensors (tied embeddings stored once) + the tokenizer files. With an FSDP-sharded
    model every rank calls it (the weights are gathered) and only the one with write=True writes."""
    state = {k: full_tensor(v.detach()).contiguous().cpu() for k, v in model.state_dict().items()}
    if not write:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                     "generation_config.json"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, folder / name)

