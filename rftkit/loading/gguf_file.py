"""GGUF files, both ways: read one (weights dequantized to fp32, converted once into a cached HF-style
folder) and write our model as one that llama.cpp runs.

    folder = convert_gguf_cached(Path("model.gguf"))                          # rft loads a .gguf through this
    write_gguf(model, "model.gguf", tokenizer_dir=folder, dtype="f16")     # rft export --gguf model.gguf

Reading: a GGUF file is converted once into a folder in the cache (`$RFTKIT_CACHE`, default `~/.cache/rftkit`):
weights dequantized to fp32, llama.cpp's q/k rotary permutation undone, its tokenizer turned into
`tokenizer.json` by `transformers` (at conversion time only; never imported when loading).

Writing: GGUF export: our model (plain or compressed, adapter merged) as a GGUF file that llama.cpp runs.

    write_gguf(model, "model.gguf", tokenizer_dir=folder, dtype="f16")     # rft export --gguf model.gguf

Written with the `gguf` package's GGUFWriter (llama.cpp's own Python writer): the architecture keys of
llama / qwen2 / qwen3, the tokenizer as llama.cpp's `gpt2` BPE model (tokens, types, merges, special ids,
chat template) read from our tokenizer.json, and the tensors under llama.cpp's names (the inverse of
`read_gguf`). For the llama architecture, llama.cpp's converter interleaves the two rotary
halves of every q/k head's rows; we apply the same permutation. Matrices are stored as f32, f16 or Q8_0
(`dtype`), or as llama.cpp's Q4_1 with a Q8_0 embedding (the embedded SmolLM2's own layout: its weights
sit on that grid, so a `q4_1` export of it gives back its original GGUF's values); 1-D tensors (norms,
biases) are always f32. A compressed model is exported dequantized (a QuantLinear,
LowRankLinear or SharedLinear is written as its dense weight), so a "q8_0" export of an int4 model is the
int4 grid re-quantized to 8 bits, not llama.cpp's Q4_1.

The pre-tokenizer name (`tokenizer.ggml.pre`) tells llama.cpp which split regex to run before BPE. It is
derived from tokenizer.json: a bare ByteLevel pre-tokenizer with its regex is GPT-2's split (`gpt-2`); other
pre-tokenizers must be named by the caller (`pre=`), since a wrong guess tokenizes differently without error.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn

from rftkit.loading.cache import atomic_folder, cache_dir
from rftkit.loading.hf import config_from_hf
from rftkit.loading.weights import build_model, save_model_folder
from rftkit.model import ModelConfig, rope_inv_freq

# ----------------------------------------------------------------------------------------------------------
# reading

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
    cfg = config_from_hf(hf)
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
    return atomic_folder(final, lambda tmp: convert_gguf(gguf_path, tmp))


# ----------------------------------------------------------------------------------------------------------
# writing

ARCHS = ("llama", "qwen2", "qwen3")
DTYPES = ("f32", "f16", "q8_0", "q4_1")
NAMES = {      # ours (within a block) -> llama.cpp's
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rows -> llama.cpp rows for q/k (inverse of `_unpermute`)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_exportable(cfg) -> None:
    if cfg.moe is not None:
        raise ValueError("GGUF export of MoE models is not supported")
    if cfg.model_type not in ARCHS:
        raise ValueError(f"GGUF export supports {', '.join(ARCHS)}, not model_type={cfg.model_type!r}")
    if cfg.sliding_window is not None:
        raise ValueError(f"GGUF export of sliding-window attention (window {cfg.sliding_window}) is not supported")
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) != "linear":
        raise ValueError(f"GGUF export supports no rope scaling or linear, got {cfg.rope_scaling}")


@torch.no_grad()
def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{llama.cpp name: fp32 tensor} of the model, every linear as its dense weight."""
    cfg = model.cfg
    out = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    if not cfg.tie_embeddings:
        out["output.weight"] = model.lm_head.weight
    for i, block in enumerate(model.model.layers):
        for ours, theirs in NAMES.items():
            if ours.endswith(("q_norm", "k_norm")) and not cfg.qk_norm:
                continue
            m = block.get_submodule(ours)
            w = m.weight.detach().float()
            if cfg.model_type == "llama" and theirs in ("attn_q", "attn_k"):
                w = permute_qk(w, cfg.n_heads if theirs == "attn_q" else cfg.n_kv_heads)
            out[f"blk.{i}.{theirs}.weight"] = w
            bias = None if "norm" in ours else m.bias                    # linears have .bias (maybe None)
            if bias is not None:
                b = bias.detach().float()
                if cfg.model_type == "llama" and theirs in ("attn_q", "attn_k"):
                    b = permute_qk(b, cfg.n_heads if theirs == "attn_q" else cfg.n_kv_heads)
                out[f"blk.{i}.{theirs}.bias"] = b
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def pre_tokenizer_name(tok_json: dict) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise ValueError(f"cannot tell llama.cpp's pre-tokenizer for {json.dumps(pre)[:200]}: pass pre= "
                     f"(e.g. llama-bpe, qwen2, smollm)")


def read_vocab(tokenizer_dir: Path, vocab_size: int) -> dict:
    """tokens [V], token types [V], merges, from a byte-level BPE tokenizer.json (padded to the model's V)."""
    import gguf
    path = Path(tokenizer_dir) / "tokenizer.json"
    tj = json.loads(path.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: GGUF export writes byte-level BPE tokenizers (gpt2 in llama.cpp); this one is "
                         f"{model.get('type')!r} with decoder {(tj.get('decoder') or {}).get('type')!r}")
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ValueError(f"{path}: token id {max(tokens)} does not fit the model's vocab_size {vocab_size}")
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": names, "types": kinds, "merges": merges, "json": tj}


def write_gguf(model: nn.Module, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None,
               dtype: str = "f16", pre: str | None = None, name: str = "rftkit export") -> Path:
    """Write `model` (no LoRA modules: merge first) to `path`, atomically (temp file + rename)."""
    import gguf
    if dtype not in DTYPES:
        raise ValueError(f"GGUF tensor type must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if any(n.endswith((".lora_A", ".lora_B")) for n, _ in model.named_parameters()):    # rftkit.lora's names
        raise ValueError("write_gguf: merge the adapter first (merge_lora); llama.cpp runs one set of weights")
    cfg = model.cfg
    check_exportable(cfg)
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ValueError(f"GGUF export needs the model's tokenizer.json (in {tokenizer_dir}): llama.cpp "
                         f"cannot run a GGUF without a vocabulary")
    vocab = read_vocab(Path(tokenizer_dir), cfg.vocab_size)
    arch = cfg.model_type
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[dtype]
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or pre_tokenizer_name(vocab["json"]))
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    special = _special_ids(Path(tokenizer_dir), cfg)
    if special.get("bos") is not None:
        w.add_bos_token_id(special["bos"])
    if special.get("eos") is not None:
        w.add_eos_token_id(special["eos"])
    if special.get("pad") is not None:
        w.add_pad_token_id(special["pad"])
    w.add_add_bos_token(False)                     # our chat template and encode() add no BOS
    template = Path(tokenizer_dir) / "chat_template.jinja"
    if template.is_file():
        w.add_chat_template(template.read_text())
    for tname, t in gguf_tensors(model).items():
        arr = t.numpy()
        if arr.ndim == 1 or dtype == "f32":
            w.add_tensor(tname, arr.astype("float32"))
        elif dtype == "f16":
            w.add_tensor(tname, arr.astype("float16"))
        elif arr.shape[-1] % 32:
            w.add_tensor(tname, arr.astype("float16"))           # Q8_0 / Q4_1 need rows of whole 32-blocks
        else:
            qt = gguf.GGMLQuantizationType.Q4_1 if dtype == "q4_1" and tname != "token_embd.weight" \
                else gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(tname, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def _special_ids(tokenizer_dir: Path, cfg) -> dict:
    """bos / eos / pad ids: the model config's, else tokenizer_config.json's token strings."""
    out = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id[0] if cfg.eos_token_id else None, "pad": None}
    tc = tokenizer_dir / "tokenizer_config.json"
    if tc.is_file():
        conf = json.loads(tc.read_text())
        vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        ids = {a["content"]: a["id"] for a in vocab.get("added_tokens", [])} | vocab["model"]["vocab"]
        for key in ("bos", "eos", "pad"):
            value = conf.get(f"{key}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if value in ids and (out[key] is None or key == "pad"):
                out[key] = ids[value]
    return out
