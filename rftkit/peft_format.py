"""LoRA adapter files in PEFT's format, shared by the engine, the trainers and the server.

    cfg, weights = read_adapter("my-adapter")        # weights: {module path: (A [R, in], B [out, R])}
    validate_adapter(cfg, weights, model, "my-adapter")

A folder holds `adapter_config.json` and `adapter_model.safetensors` with PEFT's key names
(`base_model.model.<module>.lora_A.weight`), so PEFT, vLLM and LoRAX load our adapters and we load theirs.
MoE expert tensors are adapted as PEFT's `target_parameters` do (see rftkit.lora.LoRAParam): the module path
of such an adapter is the experts module, with `.base_layer` once per wrapper nested inside (PEFT wraps the
tensors in their registration order, gate_up_proj innermost), and lora_A / lora_B hold E·R rows / columns.
Features we do not implement (DoRA, `modules_to_save`, biases, ...) are refused with the field named:
loading them silently would serve a different model than the one trained.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
EXPERT_PARAM_ORDER = ("gate_up_proj", "down_proj")   # registration order in transformers' and our experts
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# fields that change what the adapter computes, with the only value we support
UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "bias": "none", "fan_in_fan_out": False,
               "layers_to_transform": None, "layer_replication": None, "lora_bias": False,
               "trainable_token_indices": None, "use_qalora": False}
# fields that do not change what a trained adapter computes (init methods, training-time options, bookkeeping)
HARMLESS = {"base_model_name_or_path", "revision", "task_type", "peft_type", "inference_mode", "auto_mapping",
            "init_lora_weights", "layers_pattern", "lora_dropout", "megatron_config", "megatron_core",
            "loftq_config", "eva_config", "corda_config", "runtime_config", "exclude_modules",
            "qalora_group_size", "alora_invocation_tokens", "arrow_config", "ensure_weight_tying",
            "peft_version", "lora_ga_config"}


@dataclass
class AdapterConfig:
    r: int = 16                                        # default rank R
    lora_alpha: float = 32                             # default alpha: scaling = alpha / r
    target_modules: list[str] | str = field(default_factory=list)   # names, or PEFT's full-match regex
    use_rslora: bool = False                           # scaling = alpha / sqrt(r)
    rank_pattern: dict = field(default_factory=dict)   # module-path suffix (regex) -> rank
    alpha_pattern: dict = field(default_factory=dict)  # module-path suffix (regex) -> alpha
    lora_dropout: float = 0.0                          # training only
    base_model_name_or_path: str | None = None
    bias: str = "none"                                 # the only supported value
    target_parameters: list[str] | None = None         # adapted parameters (MoE experts), PEFT's field

    def _pattern(self, patterns: dict, module: str):
        # PEFT's rule: a pattern key matches a module path if the path ends with it at a name boundary
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return None

    def expert_param(self, module: str) -> str | None:
        """The parameter path (`...mlp.experts.gate_up_proj`) a target_parameters module path adapts, else None."""
        stripped, depth = module, 0
        while stripped.endswith(".base_layer"):
            stripped, depth = stripped[: -len(".base_layer")], depth + 1
        if stripped.rsplit(".", 1)[-1] != "experts":           # PEFT's short names ("down_proj") match anywhere
            return None
        names = [n for n in EXPERT_PARAM_ORDER
                 if any(f"{stripped}.{n}" == t or f"{stripped}.{n}".endswith("." + t) for t in self.target_parameters or [])]
        return f"{stripped}.{names[-1 - depth]}" if depth < len(names) else None

    def rank(self, module: str) -> int:
        module = self.expert_param(module) or module      # patterns of expert tensors name the parameter
        r = self._pattern(self.rank_pattern, module)
        return self.r if r is None else int(r)

    def scaling(self, module: str) -> float:
        r = self.rank(module)
        alpha = self._pattern(self.alpha_pattern, self.expert_param(module) or module)
        alpha = self.lora_alpha if alpha is None else alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_peft(self) -> dict:
        d = asdict(self)
        d.update(peft_type="LORA", task_type="CAUSAL_LM", bias="none", use_dora=False, fan_in_fan_out=False,
                 modules_to_save=None, init_lora_weights=True, inference_mode=True,
                 target_modules=(self.target_modules if isinstance(self.target_modules, str)
                                 else sorted(set(self.target_modules))),
                 target_parameters=sorted(set(self.target_parameters)) if self.target_parameters else None)
        return d

    @classmethod
    def from_peft(cls, d: dict, source: str = "adapter_config.json") -> "AdapterConfig":
        """Every field type-checked here, at the boundary: a string alpha or a dict of targets fails now,
        naming the field, not later inside a batch (where `scaling()` would raise on the engine thread)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: must be a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type {_show(d['peft_type'])} is not LORA")
        for name, ok in UNSUPPORTED.items():
            value = d.get(name, ok)
            if value != ok and not (ok is None and not value):
                raise ValueError(f"{source}: unsupported PEFT feature {name}={_show(value)}")
        known = {f for f in cls.__dataclass_fields__} | set(UNSUPPORTED) | HARMLESS
        for name, value in d.items():
            if name not in known and value:      # the name only: a value could be anything the file links to
                raise ValueError(f"{source}: unknown adapter field {_show(name)}")
        # which modules are adapted is read from the weights; target_modules is kept for writing back
        r = _field(d, "r", 8, _is_int, "a positive integer", source, lambda v: v >= 1)
        alpha = _field(d, "lora_alpha", 8, _is_number, "a finite number", source)
        targets = _field(d, "target_modules", None, lambda v: isinstance(v, str) or _is_str_list(v),
                         "a string (regex) or a list of strings", source)
        _field(d, "lora_dropout", 0.0, _is_number, "a finite number", source)
        use_rslora = _field(d, "use_rslora", False, lambda v: isinstance(v, bool), "true or false", source)
        base = _field(d, "base_model_name_or_path", None, lambda v: isinstance(v, str), "a string", source)
        params = _field(d, "target_parameters", None, _is_str_list, "a list of strings", source)
        rank_pattern = _patterns(d, "rank_pattern", lambda v: _is_int(v) and v >= 1, "a positive integer", source)
        alpha_pattern = _patterns(d, "alpha_pattern", _is_number, "a finite number", source)
        return cls(r=r, lora_alpha=alpha, target_modules=[] if targets is None else
                   targets if isinstance(targets, str) else list(targets),
                   use_rslora=use_rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                   lora_dropout=d.get("lora_dropout") or 0.0, base_model_name_or_path=base,
                   target_parameters=list(params or []) or None)


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 31


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and abs(v) < 1e30)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _field(d: dict, name: str, default, ok, what: str, source: str, extra=lambda v: True):
    v = d.get(name)
    if v is None:
        return default
    if not ok(v) or not extra(v):
        raise ValueError(f"{source}: {name} must be {what}, got {_show(v)}")
    return v


def _patterns(d: dict, name: str, ok, what: str, source: str) -> dict:
    """rank_pattern / alpha_pattern: {regex: value}; each key must compile (it is matched at every load)."""
    v = d.get(name) or {}
    if not isinstance(v, dict):
        raise ValueError(f"{source}: {name} must be an object of pattern -> value, got {_show(v)}")
    for key, value in v.items():
        if not ok(value):
            raise ValueError(f"{source}: {name}[{_show(key)}] must be {what}, got {_show(value)}")
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise ValueError(f"{source}: {name} key {_show(key)} is not a valid regex ({e})") from None
    return dict(v)


def adapter_files(folder: str | Path, confined: bool = False) -> tuple[bytes, bytes]:
    """The raw bytes of (adapter_config.json, adapter_model.safetensors). `confined`: the server's mode, where
    the folder's writer is not trusted with the rest of the disk: a file that is a symbolic link is refused
    (a config linked to /etc/something would otherwise be read, and echoed in errors), and the folder itself
    must not be a link. Read once into memory, so what is parsed is what is hashed."""
    folder = Path(folder)
    out = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = folder / name
        if not path.is_file():
            if name == CONFIG_FILE:
                raise FileNotFoundError(f"{folder}: not an adapter folder (no {CONFIG_FILE})")
            raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} (only safetensors adapters are loaded)")
        if not confined:
            out.append(path.read_bytes())
            continue
        if folder.is_symlink():
            raise ValueError(f"{folder}: the adapter folder is a symbolic link; copy the files instead")
        try:                             # O_NOFOLLOW: a link swapped in after the check is refused too
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"{path.name} is a symbolic link; adapter files must be regular files in "
                                 f"the adapter folder") from None
            raise
        with os.fdopen(fd, "rb") as f:
            out.append(f.read())
    return out[0], out[1]


def adapter_digest(files: tuple[bytes, bytes]) -> str:
    """What identifies a version of an adapter: a hash of its two files' contents (not their mtime or size,
    which `cp -p`, `rsync -a` and `tar` keep across a replacement)."""
    h = hashlib.blake2b(digest_size=16)
    for data in files:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def read_adapter(folder: str | Path, confined: bool = False, files: tuple[bytes, bytes] | None = None
                 ) -> tuple[AdapterConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The config and {module: (A [R, in], B [out, R])} of a PEFT folder; `files` (from `adapter_files`) parses
    bytes already read. Errors name the file, the module and the bad value (ValueError / FileNotFoundError)."""
    from safetensors.torch import load as load_bytes
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    cfg_bytes, w_bytes = files if files is not None else adapter_files(folder, confined)
    try:
        raw = json.loads(cfg_bytes, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:     # JSONDecodeError, bad UTF-8, NaN, 5000-digit ints, nesting
        raise ValueError(f"{cfg_path}: not valid JSON ({str(e)[:200]})") from None
    cfg = AdapterConfig.from_peft(raw, str(cfg_path))
    try:
        tensors = load_bytes(w_bytes)
    except Exception as e:
        raise ValueError(f"{w_path}: not a readable safetensors file ({str(e)[:200]})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sorted(tensors.items()):
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{w_path}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{w_path}: tensor {key!r} is {t.dim()}-D {t.dtype}; LoRA weights are 2-D floats")
        t = t.float()
        if not torch.isfinite(t).all():
            raise ValueError(f"{w_path}: tensor {key!r} holds NaN or infinite values")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{w_path}: module {module} has {sorted(ab)} but needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        expert = cfg.expert_param(module) is not None           # E·R rows; E is checked against the model
        if A.shape[0] != B.shape[1] or (A.shape[0] % cfg.rank(module) if expert else A.shape[0] != cfg.rank(module)):
            raise ValueError(f"{w_path}: module {module} has lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)}, not rank {cfg.rank(module)}")
        weights[module] = (A, B)
    return cfg, weights


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def write_adapter(folder: str | Path, cfg: AdapterConfig, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Write atomically enough for a server watching the folder: weights first, config last."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A, B) in weights.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.detach().float().contiguous().cpu()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.detach().float().contiguous().cpu()
    save_file(tensors, str(folder / (WEIGHTS_FILE + ".tmp")), metadata={"format": "pt"})
    (folder / (WEIGHTS_FILE + ".tmp")).replace(folder / WEIGHTS_FILE)
    (folder / (CONFIG_FILE + ".tmp")).write_text(json.dumps(cfg.to_peft(), indent=2))
    (folder / (CONFIG_FILE + ".tmp")).replace(folder / CONFIG_FILE)


def validate_adapter(cfg: AdapterConfig, weights: dict, model, source: str = "adapter") -> None:
    """Every adapted module exists in the model as a linear layer with matching shapes and the config's rank."""
    modules = dict(model.named_modules())
    for module, (A, B) in weights.items():
        if cfg.expert_param(module) is not None:
            _validate_expert(cfg, module, A, B, model, source)
            continue
        if A.shape[0] != cfg.rank(module) or B.shape[1] != A.shape[0]:
            raise ValueError(f"{source}: module {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                             f"not rank {cfg.rank(module)} as adapter_config.json says")
        m = modules.get(module)
        base = getattr(m, "base", m)      # LoRALinear wraps the original linear
        if not _is_linear(base):
            raise ValueError(f"{source}: module {module} is not a linear layer of this model")
        if A.shape[1] != base.in_features or B.shape[0] != base.out_features:
            raise ValueError(f"{source}: module {module} is {base.out_features}x{base.in_features} in the model "
                             f"but the adapter has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}")


def _is_linear(m) -> bool:
    """Whether LoRA can wrap `m` unmerged: nn.Linear, or a layer that stands in for one and says so with integer
    `in_features` / `out_features` (the quantized, low-rank and shared linears of rftkit.compress), mapping
    x [.., in] to y [.., out]. A protocol, not a list of classes, so this file format imports no layer above it."""
    return isinstance(m, torch.nn.Linear) or (isinstance(getattr(m, "in_features", None), int)
                                              and isinstance(getattr(m, "out_features", None), int))


def _validate_expert(cfg: AdapterConfig, module: str, A, B, model, source: str) -> None:
    path = cfg.expert_param(module)
    parent, _, name = path.rpartition(".")
    try:
        experts = model.get_submodule(parent)
    except AttributeError:
        raise ValueError(f"{source}: module {module} (parameter {path}) is not in this model") from None
    while hasattr(experts, "param_name") and hasattr(experts, "base_layer"):   # LoRA-wrapped already
        experts = experts.base_layer
    W = experts._parameters.get(name)
    if W is None or W.dim() != 3:
        raise ValueError(f"{source}: {path} is not a stacked expert tensor [E, out, in] of this model")
    E, out, inp = W.shape
    r = cfg.rank(module)
    if tuple(A.shape) != (E * r, inp) or tuple(B.shape) != (out, E * r):
        raise ValueError(f"{source}: {path} is {tuple(W.shape)} in the model (E, out, in) but the adapter has "
                         f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} (want E*r={E * r} with rank {r})")


def safe_adapter_path(root: str | Path, name: str) -> Path:
    """The folder of adapter `name` under `root`; names that could escape `root` are refused."""
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or ".." in name:
        raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' only")
    root = Path(root).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise ValueError(f"invalid adapter name {name!r}: escapes the adapter directory")
    return path
