"""LoRA on our model: y = W x + s · B A x, with s = alpha / r (or alpha / sqrt(r) with rsLoRA).

    apply_lora(model, LoRAConfig(r=16, targets="all-linear"))
    save_lora(model, "out/adapter")             # PEFT format (rftkit.adapters)

`apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear` at the same module path, so adapter keys are
PEFT's. `lora_disabled(model)` switches every adapter off: the base model, used as GRPO's KL reference with
no second copy of the weights. A model with LoRA applied generates through the engine with its live adapter.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from rftkit.adapters import AdapterConfig, read_adapter, validate_adapter, write_adapter

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    r: int = 16                        # rank R
    alpha: float = 32.0                # scale numerator: s = alpha / r
    dropout: float = 0.0               # dropout on the adapter's input
    rslora: bool = False               # s = alpha / sqrt(r) (rank-stabilised LoRA)
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # module names, or all-linear

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [t for t in self.targets.split(",") if t]
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got r={self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t != "all-linear" and t not in LINEAR_NAMES]
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA target modules {unknown or self.targets}; "
                             f"use all-linear or some of {', '.join(LINEAR_NAMES)}")

    def adapter_config(self, base: str | None = None, modules: list[str] | None = None) -> AdapterConfig:
        names = sorted({m.rsplit(".", 1)[-1] for m in modules}) if modules else list(self.targets)
        return AdapterConfig(r=self.r, lora_alpha=self.alpha, target_modules=names, use_rslora=self.rslora,
                             lora_dropout=self.dropout, base_model_name_or_path=base)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scaling = r, scaling
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt))   # [R, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))  # [out, R]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))      # PEFT's init: B = 0, so y = Wx at start
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling                           # [out, in]

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta()
            self.merged = False


def _targets(model: nn.Module, targets: list[str]) -> list[str]:
    names = []
    for path, m in model.named_modules():
        if not isinstance(m, (nn.Linear, LoRALinear)) or path == "lm_head" or path.endswith(".base"):
            continue
        if "all-linear" in targets or path.rsplit(".", 1)[-1] in targets:
            names.append(path)
    return names


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None, adapter: AdapterConfig | None = None,
               modules: list[str] | None = None) -> nn.Module:
    """Wrap target linears in LoRALinear (base weights frozen). With `adapter`, ranks and scales follow its
    rank/alpha patterns (for loading PEFT files)."""
    cfg = cfg or LoRAConfig()
    for p in model.parameters():
        p.requires_grad_(False)
    paths = modules if modules is not None else _targets(model, cfg.targets)
    if not paths:
        raise ValueError(f"no linear modules of the model match the LoRA targets {cfg.targets}")
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, LoRALinear):
            raise ValueError(f"module {path} already has LoRA applied")
        if adapter is not None:
            r, s = adapter.rank(path), adapter.scaling(path)
        else:
            r, s = cfg.r, (cfg.alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.alpha / cfg.r)
        _swap(model, path, LoRALinear(base, r, s, cfg.dropout))
    model.lora_config = cfg             # what save_lora writes back
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A [R, in], B [out, R])}, the weights `write_adapter` takes."""
    return {p: (m.lora_A.detach(), m.lora_B.detach()) for p, m in lora_modules(model).items()}


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Inside: the base model (every adapter off). Refused on merged adapters, whose delta is in the weights."""
    mods = list(lora_modules(model).values())
    merged = [p for p, m in lora_modules(model).items() if m.merged]
    if merged:
        raise ValueError(f"cannot disable merged LoRA modules ({merged[0]}, ...): unmerge_lora(model) first")
    previous = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, previous):
            m.enabled = e


def save_lora(model: nn.Module, folder, cfg: LoRAConfig | None = None, base: str | None = None) -> None:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules to save")
    cfg = cfg or getattr(model, "lora_config", None) or LoRAConfig(r=next(iter(mods.values())).r)
    adapter = cfg.adapter_config(base, list(mods))
    adapter.rank_pattern = {p: m.r for p, m in mods.items() if m.r != adapter.r}
    for p, m in mods.items():          # per-module scales (e.g. from a loaded alpha_pattern) are kept
        alpha = m.scaling * (math.sqrt(m.r) if cfg.rslora else m.r)
        if not math.isclose(alpha, cfg.alpha, rel_tol=1e-6):
            adapter.alpha_pattern[p] = alpha
    write_adapter(folder, adapter, lora_state(model))


def load_lora(model: nn.Module, folder) -> AdapterConfig:
    """Apply the adapter in `folder` (PEFT format) to a model without LoRA, or load into matching LoRA modules."""
    adapter, weights = read_adapter(folder)
    validate_adapter(adapter, weights, model, source=str(folder))
    existing = lora_modules(model)
    if not existing:
        apply_lora(model, LoRAConfig(r=adapter.r, alpha=adapter.lora_alpha, rslora=adapter.use_rslora),
                   adapter=adapter, modules=sorted(weights))
        existing = lora_modules(model)
    missing = set(weights) - set(existing)
    if missing:
        raise ValueError(f"{folder}: adapter modules {sorted(missing)[:3]} have no LoRA in this model")
    with torch.no_grad():
        for path, (A, B) in weights.items():
            m = existing[path]
            if m.lora_A.shape != A.shape:
                raise ValueError(f"{folder}: module {path} has rank {A.shape[0]}, the model's LoRA rank {m.r}")
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
            m.scaling = adapter.scaling(path)
    return adapter


def merge_lora(model: nn.Module, unwrap: bool = True) -> nn.Module:
    """Fold every adapter into its base weight: W += s·B·A. With `unwrap` the plain nn.Linear is put back
    (for export); without, the LoRALinear stays, merged, and `unmerge_lora` restores the base weights."""
    for path, m in lora_modules(model).items():
        m.merge()
        if unwrap:
            _swap(model, path, m.base)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora(model, unwrap=False)`: W -= s·B·A (exact up to float rounding)."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model
