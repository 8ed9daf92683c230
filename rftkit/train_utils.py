"""Shared training maths and plumbing for SFT, GRPO and scale-out: masked means, LR schedules,
checkpoints (safetensors + JSON, never pickle), metrics logging and curves.

    save_checkpoint(run_dir / "ckpt", step=10, trainable=model, optimizer=opt, state={"offset": 640})
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def lr_at(step: int, base_lr: float, warmup: int, total: int | None = None, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio·base over `total` steps
    (constant after warm-up when total is None, e.g. for a wall-clock budget)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if not total or total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """folder/step-N/{weights,optimizer}.safetensors + state.json, written to a temp dir then renamed."""
    from safetensors.torch import save_file
    folder = Path(folder)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    save_file(trainable_state(model), str(tmp / "weights.safetensors"))
    opt_tensors, opt_scalars = {}, {}
    by_param = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                key = f"{by_param[id(p)]}::{k}"
                if torch.is_tensor(v):
                    opt_tensors[key] = v.detach().cpu().contiguous()
                else:
                    opt_scalars[key] = v
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "trainable": names, "optimizer_scalars": opt_scalars,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
            "state": state, "time": time.time()}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in Path(folder).glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable weights and optimizer state; returns the saved `state` dict plus "step"."""
    from safetensors.torch import load_file
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "weights.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in meta["trainable"] if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint parameters {missing[:3]} are not in the model")
    with torch.no_grad():
        for n, t in weights.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(t)
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group.update(saved)
    by_param = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = by_param[id(p)]
            st = {}
            for key, v in opt_tensors.items():
                if key.startswith(name + "::"):
                    st[key.split("::", 1)[1]] = v.to(p.device)
            for key, v in meta["optimizer_scalars"].items():
                if key.startswith(name + "::"):
                    st[key.split("::", 1)[1]] = v
            if st:
                optimizer.state[p] = st
    return {**meta["state"], "step": meta["step"]}


class MetricsLog:
    """One JSON object per line in `path`, appended (a resumed run continues the same file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]


def plot_curves(rows: list[dict], x: str, ys: list[str], path: Path, title: str = "",
                hlines: dict[str, float] | None = None) -> Path:
    """Curves of `ys` against `x` from metric rows, plus labelled horizontal reference lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for y in ys:
        pts = [(r[x], r[y]) for r in rows if y in r and x in r]
        if pts:
            ax.plot(*zip(*pts), label=y, marker="." if len(pts) < 40 else None)
    for i, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(value, color=f"C{i + len(ys)}", linestyle="--", label=label)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
