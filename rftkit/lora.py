"""LoRA on our model: y = W x + s · B A x, with s = alpha / r (or alpha / sqrt(r) with rsLoRA).

    apply_lora(model, LoRAConfig(r=16, targets="all-linear"))
    save_lora(model, "out/adapter")             # PEFT format (rftkit.peft_format)

`apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear` at the same module path, so adapter keys are
PEFT's. `lora_disabled(model)` switches every adapter off: the base model, used as GRPO's KL reference with
no second copy of the weights. A model with LoRA applied generates through the engine with its live adapter.

MoE experts: the stacked expert tensors (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj`
[E, D, F]) get one LoRA per expert, W_e + s·B_e·A_e, in PEFT's `target_parameters` layout (its
`ParamWrapper`, PEFT >= 0.17): `LoRAParam` wraps the experts module once per adapted tensor, nested in the
tensors' registration order, so with both tensors adapted the gate_up_proj adapter sits at
`mlp.experts.base_layer` and the down_proj one at `mlp.experts`; lora_A is [E·R, in] (expert-major rows) and
lora_B [out, E·R] (rank-major columns: column j·E + e), exactly PEFT's tensors, so the files interoperate.
The adapted weight is materialised per forward ([E, out, in], as PEFT does); dropout is refused there (as in
PEFT). `all-linear` covers attention, dense MLPs, shared experts and routed experts, not routers (PEFT 0.21's
all-linear also adapts transformers' routers and gives gate_up_proj rank 2R; we load such files).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from rftkit.peft_format import AdapterConfig, read_adapter, validate_adapter, write_adapter
from rftkit.kernels import linear as linear_weight
from rftkit.layers import linear

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_NAMES = ("experts.gate_up_proj", "experts.down_proj")      # stacked MoE expert tensors


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
        unknown = [t for t in self.targets if t != "all-linear" and t not in LINEAR_NAMES + EXPERT_NAMES]
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA target modules {unknown or self.targets}; "
                             f"use all-linear or some of {', '.join(LINEAR_NAMES + EXPERT_NAMES)}")

    def adapter_config(self, base: str | None = None, modules: list[str] | None = None,
                       params: list[str] | None = None) -> AdapterConfig:
        """`modules`: adapted linear paths; `params`: adapted expert tensor paths (`...mlp.experts.down_proj`)."""
        names = sorted({m.rsplit(".", 1)[-1] for m in modules}) if modules else []
        if modules is None and params is None:
            names = [t for t in self.targets if t not in EXPERT_NAMES]
        tp = sorted({".".join(p.split(".")[-3:]) for p in params}) if params else None   # mlp.experts.<name>
        return AdapterConfig(r=self.r, lora_alpha=self.alpha, target_modules=names, use_rslora=self.rslora,
                             lora_dropout=self.dropout, base_model_name_or_path=base, target_parameters=tp)


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
        parts = self.quant_parts()
        if parts is not None:                                # a quantized base adds the LoRA in its own call
            return parts[0](x, lora=parts[1])
        if x.dim() > 2 and x.is_contiguous():                                   # rows in 2-D (_rows)
            return self._rows(x.view(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        return self._rows(x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(self.base, x)          # outside autograd (rollouts), few rows: the decode GEMV kernel
        if not self.enabled or self.merged:
            return y
        x = self.dropout(x)
        if x.dtype != self.lora_A.dtype:   # an fp32 adapter on a bf16 base (rftkit.precision): fp32 inside
            return y + (linear_weight(linear_weight(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
                        * self.scaling).to(y.dtype)
        t = linear_weight(x, self.lora_A) * self.scaling          # the scale on the rank-R side, as the kernels
        if y.dim() == 2 and y.is_contiguous() and y._base is None:
            # y + t B^T in y's own memory in one GEMM call (beta = 1): no [.., out] temporaries for the adapter's
            # product, its scale and their sum. y itself, not a view of it: an in-place op on a view costs autograd
            # a copy of the gradient
            return y.addmm_(t, self.lora_B.t())
        return y + linear_weight(t, self.lora_B)

    def kernel_parts(self) -> tuple | None:
        """(base, (A [R, in], B [out, R], scale) or None when the adapter is off or merged): what a kernel needs to
        add this adapter inside the base layer's call (the quantized layers, the one-call decode stack); None
        when it cannot (dropout active in training). Read from the module's own dicts: nn.Module.__getattr__
        costs ~1 us a lookup, and a decode step asks 210 times."""
        mods, params = self._modules, self._parameters
        if not self.enabled or self.merged:
            return mods["base"], None
        if not (type(mods["dropout"]) is nn.Identity or not self.training):
            return None
        return mods["base"], (params["lora_A"], params["lora_B"], self.scaling)

    def quant_parts(self) -> tuple | None:
        """`kernel_parts()` when the base is quantized and adds the LoRA in its own kernel call
        (QuantLinear.fuses_lora); None for any other base."""
        parts = self.kernel_parts()
        if parts is None or not getattr(parts[0], "fuses_lora", False):
            return None
        return parts

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


class LoRAParam(nn.Module):
    """LoRA on one stacked expert tensor W [E, out, in] of `base_layer` (an experts module, or another
    LoRAParam): reading `module.<param_name>` gives W + s·B_e·A_e per expert; other attributes pass through.
    Shapes and nesting are PEFT's ParamWrapper's (module docstring)."""

    def __init__(self, base_layer: nn.Module, param_name: str, r: int, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.param_name = param_name
        W = self.weight_param()
        self.n_experts, self.out_features, self.in_features = W.shape
        self.r, self.scaling = r, scaling
        E = self.n_experts
        self.lora_A = nn.Parameter(torch.empty(E * r, self.in_features, device=W.device, dtype=W.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, E * r, device=W.device, dtype=W.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))      # PEFT's init of its nn.Linear(in, E·R)
        self.enabled = True
        self.merged = False

    def weight_param(self) -> nn.Parameter:
        """The experts module's own tensor (not adapted)."""
        m = self.base_layer
        while isinstance(m, LoRAParam):
            m = m.base_layer
        return m._parameters[self.param_name]

    def delta(self) -> torch.Tensor:
        E, R = self.n_experts, self.r
        A = self.lora_A.view(E, R, self.in_features)                                      # [E, R, in]
        B = self.lora_B.view(self.out_features, R, E).permute(2, 0, 1)                   # [E, out, R]
        return torch.bmm(B, A) * self.scaling                                             # [E, out, in]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)            # own parameters and submodules
        except AttributeError:
            if name in ("lora_A", "lora_B"):        # an inner wrapper's are not ours
                raise
        value = getattr(self._modules["base_layer"], name)
        if name == self.__dict__["param_name"] and self.enabled and not self.merged:
            return value + self.delta().to(value.dtype) if torch.is_grad_enabled() else self._merged_view(value)
        return value

    def _merged_view(self, value: torch.Tensor) -> torch.Tensor:
        """W + delta outside autograd, kept while W, A, B (their storage and in-place version counters) and the
        scale are unchanged: decode reads the tensor every step, and rebuilding E full matrices per read cost
        ~10x the step's own work. One extra copy of the adapted tensor while kept."""
        A, B = self._parameters["lora_A"], self._parameters["lora_B"]
        key = (value.data_ptr(), value._version, A.data_ptr(), A._version, B.data_ptr(), B._version, self.scaling)
        kept = self.__dict__.get("_kept")
        if kept is None or kept[0] != key:
            kept = self.__dict__["_kept"] = (key, value + self.delta().to(value.dtype))   # an fp32 adapter: base dtype
        return kept[1]

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight_param().add_(self.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight_param().sub_(self.delta())
            self.merged = False


def _expert_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, str]]:
    """(experts module path, tensor name) to adapt, tensors in registration order per module."""
    from rftkit.moe import Experts
    out = []
    for path, m in model.named_modules():
        if isinstance(m, Experts):
            for name in m._parameters:
                if "all-linear" in targets or f"experts.{name}" in targets:
                    out.append((path, name))
    return out


def _wrap_param(model: nn.Module, path: str, name: str, r: int, scaling: float) -> str:
    """Wrap the module at `path` (experts, maybe already wrapped) for tensor `name`. As in PEFT the newest
    wrapper sits at `path`, older ones one `.base_layer` deeper each."""
    current = model.get_submodule(path)
    if isinstance(current, LoRAParam) and name in _wrapped_names(current):
        raise ValueError(f"{path}.{name} already has LoRA applied")
    _swap(model, path, LoRAParam(current, name, r, scaling))
    return path


def _wrapped_names(m: nn.Module) -> list[str]:
    names = []
    while isinstance(m, LoRAParam):
        names.append(m.param_name)
        m = m.base_layer
    return names


def _targets(model: nn.Module, targets: list[str]) -> list[str]:
    names = []
    for path, m in model.named_modules():
        linear_like = isinstance(m, (nn.Linear, LoRALinear)) or getattr(m, "fuses_lora", False)   # + QuantLinear
        if not linear_like or path == "lm_head" or path.endswith(".base"):
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
    experts = _expert_targets(model, cfg.targets) if modules is None else []
    if modules is not None and adapter is not None and adapter.target_parameters:     # a PEFT file's experts
        experts = [(p, n) for p, n in _expert_targets(model, ["all-linear"])
                   if any(f"{p}.{n}".endswith(t) for t in adapter.target_parameters)]
    if not paths and not experts:
        raise ValueError(f"no linear modules of the model match the LoRA targets {cfg.targets}")
    for path, name in experts:
        key = f"{path}.{name}"
        if adapter is not None:
            r = adapter.rank(key)
            alpha = adapter._pattern(adapter.alpha_pattern, key)
            alpha = adapter.lora_alpha if alpha is None else alpha
            s = alpha / math.sqrt(r) if adapter.use_rslora else alpha / r
        else:
            r, s = cfg.r, (cfg.alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.alpha / cfg.r)
        if cfg.dropout and adapter is None:
            raise ValueError(f"LoRA dropout on expert tensors is not supported (as in PEFT): set dropout=0 or "
                             f"leave experts out of the targets (got dropout={cfg.dropout})")
        _wrap_param(model, path, name, r, s)
    paths = [p for p in paths if not any(p == e or p.startswith(e + ".") for e, _ in experts)]
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


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAParam]:
    """{module path: LoRA module}; expert tensors' paths are PEFT's (`...experts`, `...experts.base_layer`)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAParam))}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A [R, in], B [out, R])}, the weights `write_adapter` takes (FSDP-sharded ones gathered:
    then every rank must call it)."""
    from rftkit.distributed import full_tensor
    return {p: (full_tensor(m.lora_A.detach()), full_tensor(m.lora_B.detach())) for p, m in lora_modules(model).items()}


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


def save_lora(model: nn.Module, folder, cfg: LoRAConfig | None = None, base: str | None = None,
              write: bool = True) -> None:
    """The model's adapter as a PEFT folder. With an FSDP-sharded model every rank calls it; write=False ranks
    take part in gathering the weights and write nothing."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules to save")
    cfg = cfg or getattr(model, "lora_config", None) or LoRAConfig(r=next(iter(mods.values())).r)
    key = {p: _param_path(p, m) for p, m in mods.items()}      # patterns name expert tensors by parameter
    adapter = cfg.adapter_config(base, [p for p, m in mods.items() if isinstance(m, LoRALinear)],
                                 [key[p] for p, m in mods.items() if isinstance(m, LoRAParam)])
    adapter.rank_pattern = {key[p]: m.r for p, m in mods.items() if m.r != adapter.r}
    for p, m in mods.items():          # per-module scales (e.g. from a loaded alpha_pattern) are kept
        alpha = m.scaling * (math.sqrt(m.r) if cfg.rslora else m.r)
        if not math.isclose(alpha, cfg.alpha, rel_tol=1e-6):
            adapter.alpha_pattern[key[p]] = alpha
    weights = lora_state(model)
    if write:
        write_adapter(folder, adapter, weights)


def _param_path(path: str, m: nn.Module) -> str:
    if not isinstance(m, LoRAParam):
        return path
    while path.endswith(".base_layer"):
        path = path[: -len(".base_layer")]
    return f"{path}.{m.param_name}"


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
    for path, m in reversed(lora_modules(model).items()):     # nested expert wrappers: innermost first
        m.merge()
        if unwrap:
            _swap(model, path, m.base if isinstance(m, LoRALinear) else m.base_layer)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora(model, unwrap=False)`: W -= s·B·A (exact up to float rounding)."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model
