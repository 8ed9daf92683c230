"""GGUF export: our model (plain or compressed, adapter merged) as a GGUF file that llama.cpp runs.

    write_gguf(model, "model.gguf", tokenizer_dir=folder, dtype="f16")     # rft export --gguf model.gguf

Written with the `gguf` package's GGUFWriter (llama.cpp's own Python writer): the architecture keys of
llama / qwen2 / qwen3, the tokenizer as llama.cpp's `gpt2` BPE model (tokens, types, merges, special ids,
chat template) read from our tokenizer.json, and the tensors under llama.cpp's names (the inverse of
`rftkit.loading.read_gguf`). For the llama architecture, llama.cpp's converter interleaves the two rotary
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

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

ARCHS = ("llama", "qwen2", "qwen3")
DTYPES = ("f32", "f16", "q8_0", "q4_1")
NAMES = {      # ours (within a block) -> llama.cpp's
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rows -> llama.cpp rows for q/k (inverse of rftkit.loading._unpermute)."""
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
    from rftkit.lora import lora_modules
    if dtype not in DTYPES:
        raise ValueError(f"GGUF tensor type must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if lora_modules(model):
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
