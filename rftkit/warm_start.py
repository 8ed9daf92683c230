"""Warm starts: a training run that begins from an existing PEFT adapter (`--init-adapter DIR`): SFT -> RFT, or
RFT -> RFT on new data (continuous tuning of a model whose traffic has drifted).

    apply_lora(model, lora)                        # the run's own LoRA config
    print(init_from_adapter(model, "sft-run/adapter", lora))

The adapter must have the run's shape: rank, alpha, rsLoRA and the adapted modules equal the run's, or the
error names the field that differs and the flag that fixes it. (Taking them from the adapter instead would
let `--lora-r 16` silently train a rank-8 adapter.) Only the weights carry over: the step count, optimizer
moments and learning-rate schedule start anew; `--resume` is what continues a run exactly.
"""
from __future__ import annotations

import math

import torch.nn as nn

from rftkit.lora import LoRAConfig, LoRALinear, load_lora, lora_modules
from rftkit.peft_format import read_adapter


def _kinds(paths) -> list[str]:
    """Module names without their layer prefix: model.layers.0.self_attn.q_proj -> q_proj."""
    return sorted({p.replace(".base_layer", "").rsplit(".", 1)[-1] for p in paths})


def init_from_adapter(model: nn.Module, folder: str, lora: LoRAConfig) -> str:
    """Load the adapter in `folder` into the model's LoRA modules (applied with `lora`) after checking that it
    has the same rank, alpha, scaling rule and target modules. Returns a line saying what was loaded."""
    adapter, weights = read_adapter(folder)
    ranks = {adapter.rank(p) for p in weights}
    if ranks != {lora.r}:
        raise ValueError(f"--init-adapter {folder}: lora_r differs: the adapter has rank {sorted(ranks)}, this run "
                         f"--lora-r {lora.r}; pass --lora-r {min(ranks)} to continue it")
    alphas = {round(adapter.scaling(p) * (math.sqrt(adapter.rank(p)) if adapter.use_rslora else adapter.rank(p)), 6)
              for p in weights}
    if alphas != {round(lora.alpha, 6)}:
        raise ValueError(f"--init-adapter {folder}: lora_alpha differs: the adapter has alpha {sorted(alphas)}, this "
                         f"run --lora-alpha {lora.alpha:g}; pass --lora-alpha {min(alphas):g} to continue it")
    if adapter.use_rslora != lora.rslora:
        raise ValueError(f"--init-adapter {folder}: rslora differs: the adapter has use_rslora={adapter.use_rslora}, "
                         f"this run rslora={lora.rslora}")
    mine = set(lora_modules(model))
    if set(weights) != mine:
        ours, theirs = _kinds(mine), _kinds(weights)
        detail = (f"the adapter adapts {theirs}, this run's --lora-targets {','.join(lora.targets)} adapt {ours}"
                  if ours != theirs else f"the adapter adapts {len(weights)} modules, this run {len(mine)} "
                                         f"(e.g. {sorted(set(weights) ^ mine)[0]})")
        raise ValueError(f"--init-adapter {folder}: lora_targets differ: {detail}; pass --lora-targets "
                         f"{','.join(theirs)} to continue it")
    load_lora(model, folder)
    n = sum(isinstance(m, LoRALinear) for m in lora_modules(model).values())
    base = f" (trained on {adapter.base_model_name_or_path})" if adapter.base_model_name_or_path else ""
    return (f"starting from the adapter in {folder}{base}: rank {lora.r}, alpha {lora.alpha:g}, {n} modules; "
            f"optimizer and schedule start anew")
