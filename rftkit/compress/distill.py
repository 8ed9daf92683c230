"""Knowledge distillation: train a smaller student on the teacher's output distribution.

    log = distill(student, teacher, ids, steps=200, lr=1e-4)     # ids [B, T]: text and/or teacher samples

The loss is the KL divergence from the teacher's next-token distribution to the student's at every position,
T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) averaged over tokens (Hinton et al.; Minitron found this
logit loss alone sufficient after pruning). There are no labels: what the student learns is what the teacher
would have said, so any text works; `teacher_samples` makes on-task text by letting the teacher answer task
prompts. All of the student's weights train (AdamW, cosine decay, gradient clipping); the teacher runs
without gradients. The student is typically `prune_structured(teacher)` (same vocabulary, fewer neurons and
heads) or the teacher with layers dropped (`drop_layers`).
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over (masked) positions of KL(p_teacher || p_student); logits [B, T, V], mask [B, T]."""
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)                                      # [B, T]
    if mask is None:
        return kl.mean() * t * t
    return (kl * mask).sum() / mask.sum().clamp(min=1) * t * t


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of `model` with only the decoder layers in `keep` (a depth-pruned student)."""
    n = model.cfg.n_layers
    if not keep or sorted(set(keep)) != sorted(keep) or not all(0 <= i < n for i in keep):
        raise ValueError(f"keep must be distinct layer indices in [0, {n}), got {keep}")
    from rftkit.model import ModelConfig
    student = copy.deepcopy(model)
    student.model.layers = nn.ModuleList([student.model.layers[i] for i in sorted(keep)])
    for j, block in enumerate(student.model.layers):
        block.self_attn.layer = j                           # the KV-cache index
    student.cfg = ModelConfig.from_dict({**model.cfg.to_dict(), "n_layers": len(keep)})
    if model.cfg.tie_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    return student


@torch.no_grad()
def teacher_samples(teacher, tok, conversations: list[list[dict]], max_tokens: int = 48) -> list[list[int]]:
    """Chat-formatted prompts (task samples' `messages`) + the teacher's greedy answers, as token ids
    (on-task distillation text)."""
    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    ids = [tok.encode_chat(m) for m in conversations]
    engine = Engine(teacher, max_seq_len=max(len(i) for i in ids) + max_tokens + 8, max_batch=64)
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens), progress=False)
    return [i + o[0].token_ids for i, o in zip(ids, outs)]


def pad_batch(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and mask [B, T] (1 = real token whose next-token prediction counts)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s)
        mask[i, :len(s) - 1] = 1
    return ids, mask


def distill(student: nn.Module, teacher: nn.Module, data: torch.Tensor | list[list[int]], steps: int = 200,
            lr: float = 1e-4, batch: int = 4, temperature: float = 1.0, seed: int = 0,
            weight_decay: float = 0.0, log_every: int = 0) -> dict:
    """Train `student` in place on KL to `teacher` over `data` (ids [B, T], or a list of token lists, cycled in
    a seeded random order). Returns {"loss_first", "loss_last", "steps", "seconds"}."""
    if steps < 1:
        raise ValueError(f"distill steps must be >= 1, got {steps}")
    if lr <= 0:
        raise ValueError(f"distill lr must be > 0, got {lr}")
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise ValueError(f"student vocab {student.cfg.vocab_size} != teacher vocab {teacher.cfg.vocab_size}")
    rows = [r.tolist() for r in data] if isinstance(data, torch.Tensor) else list(data)
    if not rows:
        raise ValueError("distill: no data")
    g = torch.Generator().manual_seed(seed)
    params = [p for p in student.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    teacher.eval()
    student.train()
    losses, order, t0 = [], [], time.perf_counter()
    for step in range(steps):
        if len(order) < batch:
            order += torch.randperm(len(rows), generator=g).tolist()
        pick, order = order[:batch], order[batch:]
        ids, mask = pad_batch([rows[i] for i in pick])
        with torch.no_grad():
            t_logits, _ = teacher(ids)
        s_logits, _ = student(ids)
        loss = kd_loss(s_logits, t_logits, temperature, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"distill step {step + 1}/{steps} kl {losses[-1]:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    for p in params:
        p.requires_grad_(False)
    student.eval()
    k = max(1, min(10, steps // 5))
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "steps": steps,
            "seconds": time.perf_counter() - t0}
