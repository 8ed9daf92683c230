"""HF model folders and the one place that knows `transformers`' names: config.json fields <-> ModelConfig
(dense and MoE families), and MoE checkpoints' expert tensors -> our layout.

    cfg = load_config(folder)                   # config.json -> ModelConfig, errors name the file
    hf = config_to_hf(cfg)                      # what `transformers` reads back into the same architecture
    state = convert_hf_state_dict(cfg, state)   # hub per-expert / fused / LLaMA-4 expert tensors -> ours

Dense: Llama 2/3, SmolLM/SmolLM2, Qwen2/2.5, Qwen3, Mistral (`SUPPORTED_ARCHITECTURES`); the model's parameter
names are already `transformers`' (rftkit.model), so dense state_dicts need no renaming. MoE: Mixtral,
Qwen2-MoE, Qwen3-MoE and our own `rftkit_moe` (`HF_MOE_TYPES`; LLaMA 4's attention is refused). transformers'
`load_balancing_loss_func` is k times our balance loss (rftkit.moe), so loaded MoE configs get
`balance_coef = router_aux_loss_coef * k` and written ones the inverse.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from rftkit.model import ModelConfig
from rftkit.moe import MoEConfig, moe_config

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
HF_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "llama4_text", "rftkit_moe")


def load_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        return config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def config_from_hf(hf: dict) -> ModelConfig:
    """A `transformers` config.json dict -> our ModelConfig (dense families here, MoE families below)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES and model_type not in HF_MOE_TYPES:
        raise ValueError(f"unsupported architecture model_type={model_type!r} "
                         f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    n_heads = hf["num_attention_heads"]
    dim = hf["hidden_size"]
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta + rope_scaling
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = None if kind == "default" else rope
    window, window_layers = None, None
    if model_type == "mistral":
        window = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        window = hf.get("sliding_window")
    if window is not None and hf.get("layer_types"):
        window_layers = [i for i, t in enumerate(hf["layer_types"]) if t == "sliding_attention"]
        if not window_layers:
            window = None
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    attention_bias = bool(hf.get("attention_bias", False))
    kw = dict(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or dim // n_heads,
        ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", model_type == "llama"),
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
        sliding_window=window, window_layers=window_layers, model_type=model_type,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
        moe=moe_fields_from_hf(hf) if model_type in HF_MOE_TYPES else None,
    )
    if kw["moe"] is not None:
        kw.update(model_fields_from_hf(hf))             # attention flags of the MoE families
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict that `transformers` reads back into the same architecture."""
    if cfg.moe is not None:
        return moe_config_to_hf(cfg)
    hf = {
        "architectures": [SUPPORTED_ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else cfg.eos_token_id,
    }
    if cfg.rope_scaling is not None:
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.model_type == "llama":
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "qwen3":
        hf["attention_bias"] = cfg.qkv_bias
    if cfg.sliding_window is not None:
        hf["sliding_window"] = cfg.sliding_window
        if cfg.model_type != "mistral":
            hf["use_sliding_window"] = True
    return hf


# ----------------------------------------------------------------------------------------------------------
# MoE families: configs and checkpoints

def _moe_layer_list(hf: dict) -> list[int] | None:
    """Qwen-MoE: layers not in mlp_only_layers and (i+1) % decoder_sparse_step == 0; None when that is all."""
    L, step, dense = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers", []))
    layers = [i for i in range(L) if i not in dense and (i + 1) % step == 0]
    return None if len(layers) == L else layers


def moe_fields_from_hf(hf: dict) -> dict:
    """The ModelConfig.moe dict of an HF config.json dict (complete, so configs compare equal)."""
    t = hf.get("model_type")
    if t == "rftkit_moe":
        return asdict(MoEConfig(**hf["moe"]))
    if t == "llama4_text":
        raise ValueError("model_type='llama4_text': LLaMA 4 attention (chunked attention, NoPE layers, L2 q/k "
                         "norm, temperature tuning, interleaved RoPE) is not implemented; for the LLaMA-4 MoE "
                         "layout use model_type='rftkit_moe' with MOE_PRESETS['llama4']")
    if t not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        raise ValueError(f"not an MoE model_type: {t!r} (supported: {', '.join(HF_MOE_TYPES)})")
    k = hf["num_experts_per_tok"]
    common = dict(top_k=k, balance_coef=hf.get("router_aux_loss_coef", 0.001) * k, z_coef=0.0)
    if t == "mixtral":
        return asdict(MoEConfig(n_experts=hf["num_local_experts"], expert_ffn_dim=hf["intermediate_size"],
                                renormalize=True, **common))
    n_experts = hf.get("num_experts", hf.get("num_local_experts"))
    shared = hf.get("shared_expert_intermediate_size", 0) if t == "qwen2_moe" else 0
    return asdict(MoEConfig(n_experts=n_experts, expert_ffn_dim=hf["moe_intermediate_size"],
                            renormalize=bool(hf.get("norm_topk_prob", False)), shared_ffn_dim=shared,
                            shared_gate=bool(shared), moe_layers=_moe_layer_list(hf), **common))


def model_fields_from_hf(hf: dict) -> dict:
    """Attention/MLP flags of the MoE families that config_from_hf reads above for dense types only."""
    t = hf.get("model_type")
    window = hf.get("sliding_window") if (t == "mixtral" or hf.get("use_sliding_window")) else None
    window_layers = None
    if window is not None and hf.get("layer_types"):
        window_layers = [i for i, lt in enumerate(hf["layer_types"]) if lt == "sliding_attention"] or None
        window = window if window_layers else None
    out = dict(sliding_window=window, window_layers=window_layers, mlp_bias=False)
    if t == "mixtral":
        out.update(qkv_bias=False, o_bias=False, qk_norm=False)
    elif t == "qwen2_moe":
        out.update(qkv_bias=bool(hf.get("qkv_bias", True)), o_bias=False, qk_norm=False)
    elif t == "qwen3_moe":
        bias = bool(hf.get("attention_bias", False))
        out.update(qkv_bias=bias, o_bias=bias, qk_norm=True)
    elif t == "rftkit_moe":
        out = {name: hf[name] for name in ("qkv_bias", "o_bias", "qk_norm", "mlp_bias", "sliding_window",
                                           "window_layers")}
    else:
        raise ValueError(f"not an MoE model_type: {t!r} (supported: {', '.join(HF_MOE_TYPES)})")
    return out


def moe_config_to_hf(cfg: ModelConfig) -> dict:
    """config.json dict for an MoE ModelConfig; transformers reads mixtral/qwen2_moe/qwen3_moe back."""
    mc = moe_config(cfg)
    hf = config_to_hf(replace(cfg, moe=None, model_type="llama"))     # the common fields
    for name in ("attention_bias", "mlp_bias"):
        hf.pop(name, None)
    t = cfg.model_type

    def need(ok: bool, what: str):
        if not ok:
            raise ValueError(f"model_type={t!r} cannot express {what}; use model_type='rftkit_moe'")

    if t in ("mixtral", "qwen2_moe", "qwen3_moe"):
        need(mc.score == "softmax" and not mc.scale_input and not mc.bias_balancing and mc.capacity_factor is None,
             "sigmoid scores, input scaling, bias balancing or capacity")
        need(not cfg.mlp_bias and cfg.window_layers is None, "mlp_bias or per-layer windows")
        hf.update(num_experts_per_tok=mc.top_k, router_aux_loss_coef=mc.balance_coef / mc.top_k)
    if t == "mixtral":
        need(mc.renormalize and not mc.shared_ffn_dim and mc.moe_layers is None and not cfg.qkv_bias
             and not cfg.o_bias and not cfg.qk_norm and cfg.ffn_dim == mc.expert_ffn_dim,
             "this moe/attention layout")
        hf.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=mc.n_experts,
                  sliding_window=cfg.sliding_window)
    elif t in ("qwen2_moe", "qwen3_moe"):
        if t == "qwen2_moe":
            need(not cfg.o_bias and not cfg.qk_norm and mc.shared_gate == bool(mc.shared_ffn_dim),
                 "this attention layout or an ungated shared expert")
        else:
            need(cfg.qkv_bias == cfg.o_bias and cfg.qk_norm and not mc.shared_ffn_dim,
                 "this attention layout or a shared expert")
        layers = mc.moe_layers if mc.moe_layers is not None else list(range(cfg.n_layers))
        hf.update(architectures=["Qwen2MoeForCausalLM" if t == "qwen2_moe" else "Qwen3MoeForCausalLM"],
                  model_type=t, num_experts=mc.n_experts, moe_intermediate_size=mc.expert_ffn_dim,
                  norm_topk_prob=mc.renormalize, decoder_sparse_step=1,
                  mlp_only_layers=[i for i in range(cfg.n_layers) if i not in layers],
                  use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
        if t == "qwen2_moe":
            hf.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=mc.shared_ffn_dim)
        else:
            hf.update(attention_bias=cfg.qkv_bias)
    elif t == "rftkit_moe":
        hf.update(architectures=["RftkitMoeForCausalLM"], model_type=t, moe=asdict(mc), qkv_bias=cfg.qkv_bias,
                  o_bias=cfg.o_bias, qk_norm=cfg.qk_norm, mlp_bias=cfg.mlp_bias,
                  sliding_window=cfg.sliding_window, window_layers=cfg.window_layers)
    else:
        raise ValueError(f"not an MoE model_type: {t!r} (supported: {', '.join(HF_MOE_TYPES)})")
    return hf


_HUB_EXPERT = {  # per-expert hub names -> (our fused tensor, row block)
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None),
}


def convert_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF MoE checkpoint keys (hub per-expert, transformers-5 fused, LLaMA-4 fused-transposed) -> ours.
    Keys of other tensors pass through; an incomplete set of experts raises."""
    mc = moe_config(cfg)
    out, per_expert = {}, {}       # per_expert[(prefix, tensor)][e] = (block, weight)
    for key, v in sd.items():
        k = key.replace(".block_sparse_moe.", ".mlp.").replace(".feed_forward.", ".mlp.")
        k = k.replace(".mlp.router.weight", ".mlp.gate.weight")
        parts = k.split(".")
        if ".mlp.experts." in k and parts[-1] == "weight" and parts[-3].isdigit():   # ...experts.{e}.{name}.weight
            if parts[-2] not in _HUB_EXPERT:
                raise ValueError(f"unknown expert tensor {key!r}")
            name, block = _HUB_EXPERT[parts[-2]]
            prefix = ".".join(parts[:-3])
            per_expert.setdefault((prefix, name), {}).setdefault(int(parts[-3]), []).append((block, v))
            continue
        if key.endswith(".feed_forward.experts.gate_up_proj"):      # LLaMA 4: [E, D, 2F] -> [E, 2F, D]
            v = v.transpose(1, 2).contiguous()
        elif key.endswith(".feed_forward.experts.down_proj"):       # LLaMA 4: [E, F, D] -> [E, D, F]
            v = v.transpose(1, 2).contiguous()
        out[k] = v
    for (prefix, name), experts in per_expert.items():
        if sorted(experts) != list(range(mc.n_experts)):
            raise ValueError(f"{prefix}: checkpoint has experts {sorted(experts)}, config wants {mc.n_experts}")
        stacked = []
        for e in range(mc.n_experts):
            blocks = dict(experts[e])
            want = [0, 1] if name == "gate_up_proj" else [None]
            if sorted(blocks, key=str) != sorted(want, key=str):
                raise ValueError(f"{prefix}.{e}: expert tensors for {name} incomplete ({len(blocks)} of {len(want)})")
            stacked.append(torch.cat([blocks[b] for b in want]))
        out[f"{prefix}.{name}"] = torch.stack(stacked)
    return out

