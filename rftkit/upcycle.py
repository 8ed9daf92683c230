"""Sparse upcycling: a dense checkpoint into a Mixture-of-Experts model whose outputs equal the dense model's.

    rft upcycle --out smollm2-4x --experts 4 --top-k 2            # the embedded SmolLM2-135M by default
    run_upcycle(UpcycleConfig(out="smollm2-4x", experts=4))

Every MLP becomes E identical experts and gets a new random router (Komatsuzaki et al. 2023, "Sparse
Upcycling"); the top-k weights are renormalised, so the k picked copies sum back to the dense MLP and the new
model computes the dense function exactly (checked on random tokens before anything is written). Training
then breaks the symmetry: experts see different tokens, so their weights drift apart and routing follows.
Top-2 doubles the MLP compute per token relative to the dense model; total parameters grow by (E-1) MLPs.

The folder is a plain model folder (config.json + model.safetensors + the dense model's tokenizer files).
With `--model-type mixtral` (the default) transformers and vLLM load it as MixtralForCausalLM; `rftkit_moe`
also allows dense layers (`--moe-layers`) and the router z-loss, and only rftkit loads it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from rftkit.loading.hf import config_to_hf
from rftkit.model import Transformer
from rftkit.moe import MoEConfig, moe_modules


@dataclass
class UpcycleConfig:
    out: str = ""                          # output folder (config.json, model.safetensors, tokenizer files)
    model: str | None = None               # dense model folder / .gguf / None = embedded smollm2-135m-instruct
    experts: int = 8                       # E experts per MoE layer, each a copy of the dense MLP
    top_k: int = 2                         # K experts per token
    model_type: Literal["mixtral", "rftkit_moe"] = "mixtral"   # mixtral: transformers and vLLM load it too
    moe_layers: list[int] | None = None    # layers to upcycle (default all; other layers stay dense; rftkit_moe)
    router_std: float = 0.02               # std of the new router's random weights
    balance_coef: float = 0.01             # Switch load-balancing loss weight, for later training
    z_coef: float = 0.0                    # router z-loss weight, for later training (rftkit_moe only)
    seed: int = 0                          # router initialisation
    check_tokens: int = 64                 # compare MoE and dense logits on this many random tokens (0 = skip)
    overwrite: bool = False                # replace an existing output folder

    def __post_init__(self):
        if self.experts < 2:
            raise ValueError(f"experts must be >= 2, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be in [1, experts={self.experts}], got {self.top_k}")
        if self.router_std <= 0:
            raise ValueError(f"router_std must be > 0, got {self.router_std}")


def upcycle(dense, cfg: UpcycleConfig):
    """The MoE model of a dense `Transformer` (not written anywhere)."""
    return upcycle_dense(dense, cfg.experts, cfg.top_k, router_std=cfg.router_std, seed=cfg.seed,
                         model_type=cfg.model_type, moe_layers=cfg.moe_layers, balance_coef=cfg.balance_coef,
                         z_coef=cfg.z_coef)


@torch.no_grad()
def upcycle_dense(model: Transformer, n_experts: int, top_k: int, router_std: float = 0.02,
                  seed: int = 0, model_type: str = "rftkit_moe", **moe_overrides) -> Transformer:
    """Dense model -> MoE: every MLP copied into E experts, a new random router (Komatsuzaki et al. 2023).
    Renormalised top-k weights sum to 1 over identical experts, so outputs equal the dense model's.
    While the experts are identical the LM loss gives the router no gradient (only the balance/z losses do);
    experts diverge because they see different tokens, and routing follows. `model_type="mixtral"` gives a
    config transformers and vLLM load as MixtralForCausalLM (every layer MoE, no z-loss)."""
    cfg = model.cfg
    if cfg.moe is not None or cfg.mlp_bias:
        raise ValueError(f"upcycle_dense needs a dense model without MLP bias (moe={cfg.moe}, "
                         f"mlp_bias={cfg.mlp_bias})")
    if model_type not in ("rftkit_moe", "mixtral"):
        raise ValueError(f"upcycle_dense: model_type must be 'rftkit_moe' or 'mixtral', got {model_type!r}")
    mc = MoEConfig(**({"n_experts": n_experts, "top_k": top_k, "expert_ffn_dim": cfg.ffn_dim,
                       "renormalize": True} | moe_overrides))
    if not mc.renormalize or mc.scale_input or mc.shared_ffn_dim:
        raise ValueError("upcycle_dense keeps the dense function only with renormalize=True, scale_input=False "
                         "and no shared expert")
    if model_type == "mixtral" and (mc.z_coef or mc.moe_layers is not None):
        raise ValueError(f"a mixtral config has no router z-loss and no dense layers (z_coef={mc.z_coef}, "
                         f"moe_layers={mc.moe_layers}); use model_type='rftkit_moe'")
    new_cfg = replace(cfg, model_type=model_type, moe=asdict(mc))
    config_to_hf(new_cfg)                        # refuses what the model type cannot express, before any work
    new = Transformer(new_cfg).to(model.device)
    dense, state = model.state_dict(), new.state_dict()
    g = torch.Generator().manual_seed(seed)
    for k in state:
        if k in dense:
            state[k] = dense[k]
    for i, m in moe_modules(new).items():
        p = f"model.layers.{i}.mlp."
        gate_up = torch.cat([dense[p + "gate_proj.weight"], dense[p + "up_proj.weight"]])    # [2F, D]
        state[p + "experts.gate_up_proj"] = gate_up.expand(n_experts, -1, -1)
        state[p + "experts.down_proj"] = dense[p + "down_proj.weight"].expand(n_experts, -1, -1)
        router = torch.randn(m.gate.weight.shape, generator=g) * router_std                  # [E, D]
        state[p + "gate.weight"] = router.to(state[p + "gate.weight"])
    new.load_state_dict(state)
    return new.train(model.training)


@torch.no_grad()
def max_logit_difference(a, b, n_tokens: int, seed: int = 0) -> float:
    """max |logits_a - logits_b| over one sequence of `n_tokens` random token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, a.cfg.vocab_size, (1, n_tokens), generator=g).to(a.device)
    return float((a(ids)[0] - b(ids)[0]).abs().max())


def parameter_counts(model) -> dict[str, int]:
    """Total parameters and those active per token (router + K of the E experts in MoE layers)."""
    total = model.parameter_count()
    active = total
    for m in moe_modules(model).values():
        per_expert = m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel()
        active -= (m.mc.n_experts - m.mc.top_k) * per_expert
    return {"total": total, "active": active}


def run_upcycle(cfg: UpcycleConfig) -> Path:
    from rftkit.compress.export import export
    from rftkit.loading import load_model, resolve
    if not cfg.out:
        raise ValueError("--out is required: the folder to write the MoE model to")
    folder = resolve(cfg.model)
    dense = load_model(str(folder))
    moe = upcycle(dense, cfg).eval()
    if cfg.check_tokens:
        diff = max_logit_difference(moe, dense, cfg.check_tokens, cfg.seed)
        if diff > 1e-3:
            raise ValueError(f"upcycled logits differ from the dense model's by {diff:.2e} (> 1e-3)")
    del dense
    out = export(moe, cfg.out, folder, cfg.overwrite)
    n = parameter_counts(moe)
    print(f"rft upcycle: {folder} -> {out} ({cfg.model_type}, {cfg.experts} experts, top-{cfg.top_k}; "
          f"{n['total'] / 1e6:.1f}M parameters, {n['active'] / 1e6:.1f}M active per token"
          + (f"; max logit difference to the dense model {diff:.1e} on {cfg.check_tokens} tokens)"
             if cfg.check_tokens else ")"))
    return out
