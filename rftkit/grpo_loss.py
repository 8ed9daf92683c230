"""The GRPO family's maths on plain tensors: group advantages and the clipped policy loss.

    adv = group_advantages(rewards.view(P, G), scale="group")            # [P, G]
    loss, stats = policy_loss(logp, old_logp, adv.flatten(), mask, LossSpec(loss_type="dapo"), totals)

Formulas (N completions, T_i tokens in completion i, ratio r_it = exp(logp_it - old_it), A_i its advantage):
  per-token term  l_it = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_it
  KL_it           = exp(ref_it - logp_it) - (ref_it - logp_it) - 1          (k3 estimator, DeepSeekMath)
  grpo            L = 1/N Σ_i 1/T_i Σ_t l_it                                  (DeepSeekMath)
  dr_grpo         L = 1/(N · L_max) Σ_i Σ_t l_it                              (Dr. GRPO: no length bias)
  dapo            L = 1/(Σ_i T_i) Σ_i Σ_t l_it                                (DAPO: token-level mean)
  GSPO            r_it = exp(mean_t(logp_it - old_it)) for every t of sequence i (sequence-level ratio);
                  with a stop-gradient on the mean and a per-token gradient path as in GSPO-token.
Advantages: A = r - mean_group(r), divided by the group's std ("group", DeepSeekMath), the whole batch's
std ("batch", Lite-PPO) or nothing ("none", Dr. GRPO). Stds are unbiased (ddof=1), as in TRL.

Micro-batches and ranks: `policy_loss` takes the *global* batch's normalisers (`Totals`), so summing the
losses of any split of the batch gives exactly the loss of the whole — gradients do not depend on how the
batch is cut into micro-batches or processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "dr_grpo", "dapo"]


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"advantage scale must be 'group', 'batch' or 'none', got {scale!r}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "group":
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
    else:
        std = rewards.flatten().std() if rewards.numel() > 1 else torch.zeros(())
    return centred / (std + eps)


@dataclass
class LossSpec:
    loss_type: LossType = "dapo"
    eps_low: float = 0.2
    eps_high: float = 0.28            # clip-higher (DAPO); set equal to eps_low for symmetric clipping
    importance: Literal["token", "sequence"] = "token"   # "sequence" = GSPO
    beta: float = 0.0                 # KL coefficient; 0 = no reference pass at all
    max_completion_len: int = 32      # L_max, for dr_grpo

    def __post_init__(self):
        if self.loss_type not in ("grpo", "dr_grpo", "dapo"):
            raise ValueError(f"loss_type must be grpo, dr_grpo or dapo, got {self.loss_type!r}")
        if self.importance not in ("token", "sequence"):
            raise ValueError(f"importance must be 'token' or 'sequence', got {self.importance!r}")
        if not (0 <= self.eps_low < 1) or self.eps_high < 0:
            raise ValueError(f"clip range must satisfy 0 <= eps_low < 1, eps_high >= 0; got "
                             f"eps_low={self.eps_low}, eps_high={self.eps_high}")


@dataclass
class Totals:
    """Normalisers of the global batch (all micro-batches, all ranks)."""
    n_seqs: int
    n_tokens: int


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                spec: LossSpec, totals: Totals, ref_logp: torch.Tensor | None = None):
    """logp, old_logp, ref_logp, mask: [N, T]; adv: [N]. Returns (this micro-batch's share of the global loss,
    stats of sums over it — divide by totals to report means)."""
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    if spec.importance == "sequence":
        seq_mean = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)                # [N]
        log_ratio = seq_mean.detach()[:, None] + logp - logp.detach()                     # GSPO-token
    ratio = torch.exp(log_ratio)
    A = adv[:, None].to(logp.dtype)
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - spec.eps_low, 1 + spec.eps_high) * A
    per_token = -torch.minimum(unclipped, clipped)                                       # [N, T]
    kl = None
    if spec.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + spec.beta * kl
    if spec.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / totals.n_seqs
    elif spec.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (totals.n_seqs * spec.max_completion_len)
    else:
        loss = (per_token * mask).sum() / max(totals.n_tokens, 1)
    with torch.no_grad():
        is_low = (ratio < 1 - spec.eps_low) & (A < 0)
        is_high = (ratio > 1 + spec.eps_high) & (A > 0)
        stats = {
            "clip_low_tokens": float((is_low.float() * mask).sum()),
            "clip_high_tokens": float((is_high.float() * mask).sum()),
            "kl_sum": float((kl * mask).sum()) if kl is not None else 0.0,
            "ratio_sum": float((ratio * mask).sum()),
        }
    return loss, stats
