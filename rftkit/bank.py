"""Adapter bank: many LoRA adapters at once on one base model, one adapter per batch row.

    bank = AdapterBank(model, n_slots=8)
    bank.register("sql", "adapters/sql")      # reads + validates the PEFT folder now (clear error if bad)
    slot = bank.acquire("sql")                # into a slot (LRU eviction of unused slots), pinned until release
    bank.set_rows([slot, 0, slot])            # row i of the next forward uses slot rows[i]; slot 0 = base model
    ... model forward ...
    bank.release("sql")

Punica's BGMV semantics (a slot index per batch row, slot 0 = no adapter). A batch whose rows all use one slot
adds `x @ A^T @ B^T * scale` with two small matmuls. A mixed batch on CPU makes one kernel call per module
for every row's adapter (rftkit.kernels.lora_bgmv: the slots' weights read in place, no gathered copy of them,
no per-slot ops), and a decode step of plain fp32 blocks runs them inside the one-call decode stack (rftkit.decode_stack,
kernels.decode_layers); so 16 distinct adapters cost what reading their weights costs (16 r=16 all-linear
adapters on SmolLM2-135M: 313 MB a decode step, 0.84-0.86x the tok/s of one adapter on a 2-core Xeon,
docs/benchmarks.md); elsewhere (CUDA, autograd) its rows are grouped by
slot and each group adds its delta with two small matmuls. Each slot holds, per module, its own (A [R, in], B [out, R], scale) or
nothing, so adapters of different ranks and target sets share one bank, and `bind_live` can point a slot at
a trainer's LoRA parameters (the same tensors, no copy).

The bank wraps the model's linear layers in place the first time an adapter is registered (a model that is
never given an adapter runs untouched). Adapter files are read from disk when put into a slot; `register`
reads them once to validate, so a half-written or wrong folder fails at registration, not mid-batch.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rftkit import kernels
from rftkit.layers import linear
from rftkit.loading.weights import aligned
from rftkit.peft_format import AdapterConfig, adapter_digest, adapter_files, read_adapter


class BankLinear(nn.Module):
    """A linear layer (plain, LoRA or quantized) plus the bank's per-row adapters."""

    def __init__(self, inner: nn.Module, bank: "AdapterBank"):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.slots = kernels.SlotTable(bank.n_slots)   # per slot: (A [R, in], B [out, R], scale) or None
        self._bank = [bank]                       # a list, so the bank is not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def bank(self) -> "AdapterBank":
        """The bank whose per-row adapters this layer adds (its slot table: `slots`)."""
        return self._bank[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(self.inner, x)
        bank = self._bank[0]
        if not bank.groups:
            return y
        rows = bank.token_rows(x)
        mixed = bank.groups[0][1] is not None                           # not every row on the same slot
        if mixed and rows is not None and y.is_contiguous():            # CPU: every row in one kernel call
            x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
            if kernels.lora_bgmv(x2, y2, rows, self.slots) is not None:
                return y
        for slot, idx in bank.groups:
            ab = self.slots.tensors[slot]
            if ab is None:
                continue
            A, B, scale = ab
            if idx is None:                                               # every row uses this slot
                if torch.is_grad_enabled() or not y.is_contiguous():
                    y = y + F.linear(F.linear(x, A), B) * scale
                else:                                                     # in place: no [.., out] temporaries
                    y.view(-1, self.out_features).addmm_(F.linear(x.reshape(-1, self.in_features), A), B.t(),
                                                         alpha=scale)
            else:
                delta = F.linear(F.linear(x.index_select(0, idx), A), B) * scale
                y = y.index_add(0, idx, delta)
        return y


class AdapterBank:
    def __init__(self, model: nn.Module, n_slots: int = 8):
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.model, self.n_slots = model, n_slots
        self.registered: dict[str, dict] = {}          # name -> {path, cfg, modules, rank}
        self.slot_of: dict[str, int] = {}              # name -> slot (1..n_slots)
        self.owner: list[str | None] = [None] * (n_slots + 1)
        self.pins = [0] * (n_slots + 1)
        self.last_used = [0.0] * (n_slots + 1)
        self.layers: dict[str, BankLinear] = {}
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        self.rows: torch.Tensor | None = None        # slot per batch row [B] (int32), None = base model only
        self._token_rows: dict[int, torch.Tensor] = {}
        self.stats = {"loads": 0, "evictions": 0, "hits": 0}

    # ------------------------------------------------------------------ registry
    def _wrap(self) -> None:
        if self.layers:
            return
        for path, m in list(self.model.named_modules()):
            if path == "lm_head" or not hasattr(m, "in_features") or isinstance(m, BankLinear):
                continue
            parent, _, leaf = path.rpartition(".")
            owner = self.model.get_submodule(parent) if parent else self.model
            if isinstance(owner, (BankLinear,)) or leaf in ("base", "inner"):
                continue                                            # the layer inside a wrapper
            layer = BankLinear(m, self)
            setattr(owner, leaf, layer)
            self.layers[path] = layer

    def _check(self, name: str, cfg: AdapterConfig, weights: dict, source: str) -> None:
        for module, (A, B) in weights.items():
            layer = self.layers.get(module)
            if layer is None:
                raise ValueError(f"{source}: module {module} is not a linear layer of this model")
            if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
                raise ValueError(f"{source}: module {module} is {layer.out_features}x{layer.in_features} in "
                                 f"the model but the adapter has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}")

    def register(self, name: str, folder: str | Path, confined: bool = False,
                 files: tuple[bytes, bytes] | None = None) -> str:
        """Make `name` servable from `folder` (re-registering replaces it; a loaded copy is dropped). Returns the
        content digest of the files registered: a slot load later reads the folder again and refuses files
        whose digest differs (the folder changed since). `confined`: symbolic links in it are refused
        (rftkit.peft_format.adapter_files); `files`: their bytes, when the caller has read them already."""
        self._wrap()
        files = files if files is not None else adapter_files(folder, confined)
        cfg, weights = read_adapter(folder, files=files)
        self._check(name, cfg, weights, str(folder))
        if name in self.registered:
            self.unload(name)
        digest = adapter_digest(files)
        self.registered[name] = {"path": str(folder), "cfg": cfg, "rank": max(A.shape[0] for A, _ in weights.values()),
                                 "modules": sorted(weights), "digest": digest, "confined": confined}
        return digest

    def bind_live(self, name: str, modules: dict[str, nn.Module]) -> int:
        """Point a slot at live LoRA parameters ({module path: LoRALinear}, e.g. `lora_modules(trainer_model)`):
        the slot reads the very tensors the trainer updates. Returns the slot (pinned until `unload`)."""
        self._wrap()
        if name in self.registered:
            self.unload(name)
        slot = self._free_slot()
        if slot is None:
            raise RuntimeError(f"no free adapter slot for {name!r}: all {self.n_slots} are in use")
        for path, m in modules.items():
            if path not in self.layers:
                raise ValueError(f"live adapter {name!r}: module {path} is not a linear layer of this model")
            self.layers[path].slots.set(slot, m.lora_A.detach(), m.lora_B.detach(), m.scaling, live=True)
        self.registered[name] = {"path": None, "cfg": None, "rank": max(m.r for m in modules.values()),
                                 "modules": sorted(modules)}
        self._occupy(name, slot)
        self.pins[slot] += 1
        return slot

    def unload(self, name: str) -> None:
        if name not in self.registered:
            raise KeyError(f"adapter {name!r} is not registered")
        slot = self.slot_of.get(name)
        if slot is not None:
            if self.pins[slot] and self.registered[name]["path"] is not None:
                raise RuntimeError(f"adapter {name!r} is in use by {self.pins[slot]} running sequence(s)")
            self._clear(slot)
        del self.registered[name]

    def live_tensors(self) -> list[torch.Tensor]:
        """The trainer tensors that live slots read (their version counters tell the engine weights changed)."""
        live = [self.slot_of[n] for n, r in self.registered.items() if r["path"] is None and n in self.slot_of]
        return [t for layer in self.layers.values() for k in live if layer.slots.tensors[k] is not None
                for t in layer.slots.tensors[k][:2]]

    def max_loaded_rank(self) -> int:
        """The largest rank among the adapters now in slots (0 when none)."""
        return max((self.registered[n]["rank"] for n in self.owner if n is not None and n in self.registered),
                   default=0)

    def kernel_ok(self) -> bool:
        """Every slot of every layer is one the CPU kernel can read in place (fp32, contiguous, on the CPU)."""
        return all(layer.slots.kernel_ok for layer in self.layers.values())

    def info(self) -> list[dict]:
        return [{"name": n, "path": r["path"], "rank": r["rank"], "slot": self.slot_of.get(n),
                 "last_used": self.last_used[self.slot_of[n]] if n in self.slot_of else None}
                for n, r in self.registered.items()]

    # ------------------------------------------------------------------ slots
    def _clear(self, slot: int) -> None:
        """Empty the slot in every layer: whatever an earlier owner (or a load that failed half-way) left in it
        would otherwise be added to the rows of the next adapter placed here, in the modules it does not set."""
        for layer in self.layers.values():
            if layer.slots.tensors[slot] is not None:
                layer.slots.clear(slot)
        name = self.owner[slot]
        self.owner[slot], self.pins[slot] = None, 0
        self.slot_of.pop(name, None)

    def _occupy(self, name: str, slot: int) -> None:
        self.owner[slot] = name
        self.slot_of[name] = slot
        self.last_used[slot] = time.monotonic()

    def _free_slot(self) -> int | None:
        for s in range(1, self.n_slots + 1):
            if self.owner[s] is None:
                return s
        idle = [s for s in range(1, self.n_slots + 1) if self.pins[s] == 0]
        if not idle:
            return None
        victim = min(idle, key=lambda s: self.last_used[s])           # least recently used
        self._clear(victim)
        self.stats["evictions"] += 1
        return victim

    def acquire(self, name: str) -> int | None:
        """The slot holding `name`, loading it (evicting the LRU unpinned slot) if needed; None when every slot
        is pinned by running sequences. The caller releases it when its sequence finishes."""
        if name not in self.registered:
            raise KeyError(f"adapter {name!r} is not registered")
        slot = self.slot_of.get(name)
        if slot is not None:
            self.stats["hits"] += 1
        else:
            slot = self._free_slot()
            if slot is None:
                return None
            info = self.registered[name]
            try:
                files = adapter_files(info["path"], info["confined"])
                if adapter_digest(files) != info["digest"]:
                    raise ValueError(f"{info['path']}: the files changed after the adapter was registered")
                cfg, weights = read_adapter(info["path"], files=files)
                self._check(name, cfg, weights, info["path"])
                device = next(self.model.parameters()).device
                tensors = {}                   # everything converted first: a failure leaves the slot untouched
                for module, (A, B) in weights.items():
                    layer = self.layers[module]
                    dtype = layer.inner.weight.dtype if layer.inner.weight.is_floating_point() else torch.float32
                    tensors[module] = (aligned(A.to(device, dtype).contiguous()), B.to(device, dtype).contiguous(),
                                       float(cfg.scaling(module)))
                for module, (A, B, scale) in tensors.items():
                    self.layers[module].slots.set(slot, A, B, scale)
            except BaseException:
                self._clear(slot)              # nothing of a failed load stays in the (ownerless) slot
                raise
            self._occupy(name, slot)
            self.stats["loads"] += 1
        self.pins[slot] += 1
        self.last_used[slot] = time.monotonic()
        return slot

    def release(self, name: str) -> None:
        slot = self.slot_of.get(name)
        if slot is not None and self.pins[slot] > 0:
            self.pins[slot] -= 1

    def set_rows(self, rows: list[int] | None, device=None) -> None:
        """Slot per batch row for the next forward (None or all zeros = base model only)."""
        self.groups, self.rows, self._token_rows = [], None, {}
        if not rows:
            return
        distinct = sorted(set(rows) - {0})
        if not distinct:
            return
        self.rows = torch.tensor(rows, dtype=torch.int32, device=device)               # [B]
        if len(distinct) == 1 and all(r == distinct[0] for r in rows):
            self.groups = [(distinct[0], None)]
            return
        for s in distinct:
            idx = torch.tensor([i for i, r in enumerate(rows) if r == s], device=device)
            self.groups.append((s, idx))

    def token_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """The slot of every token of x [B, .., in] as int32 [B * ..] for the CPU kernel; None on other devices."""
        if self.rows is None or x.device.type != "cpu":
            return None
        per_row = x[0].numel() // x.shape[-1] if x.dim() > 2 else 1
        if per_row not in self._token_rows:
            self._token_rows[per_row] = self.rows.repeat_interleave(per_row)
        return self._token_rows[per_row]
