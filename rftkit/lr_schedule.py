"""The learning-rate schedule of every trainer: linear warm-up, then cosine decay (or constant).

    for g in optimizer.param_groups: g["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
"""
from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total: int | None = None, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio·base over `total` steps
    (constant after warm-up when total is None, e.g. for a wall-clock budget)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if not total or total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
