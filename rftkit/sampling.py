"""Per-request sampling: parameters, and one batched sampler that honours them row by row.

    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=32, seed=7)

Log-probs are those of `log_softmax(logits / T)` before any top-p/top-k/min-p truncation (T = 0 counts as 1),
the same quantity the GRPO trainer recomputes. A seeded request draws from its own generator, so it yields
the same tokens alone or inside any batch. Rows without truncation or alternatives sample on CPU in one fused
kernel pass (rftkit.kernels.sample_rows: the same inverse-CDF rule and uniforms as the torch reference).
Constrained rows (a `grammar`: JSON schema, forced tool call; rftkit.constrained) draw from their allowed
tokens only, through the torch reference, while the free rows of the same batch keep the fused pass; their
log-probs stay those of the unmasked distribution (a mask is one more truncation), which is what a trainer
recomputes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rftkit import kernels


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # nucleus mass kept
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0                # drop tokens below min_p * p(top token)
    max_tokens: int = 64              # new tokens at most
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1                        # samples of this prompt (they share one prefill)
    seed: int | None = None
    logprobs: int = 0                 # also return this many top alternatives per token
    ignore_eos: bool = False          # keep going past stop tokens (benchmarks)
    grammar: object = None            # rftkit.constrained.Grammar: only the tokens it allows (JSON, tool calls)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")


def _truncate(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p / min-p exclude, for one row's scaled logits [V]."""
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p   # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           default_gen: torch.Generator | None = None, allowed: dict[int, torch.Tensor] | None = None):
    """logits [B, V] -> (tokens [B], logprobs [B], top alternatives per row or None). `allowed` maps the
    constrained rows to their allowed tokens (bool [V]); the other rows are sampled as if alone."""
    logits = logits.float()
    if allowed:
        return _sample_mixed(logits, params, generators, default_gen, allowed)
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
    if logits.device.type == "cpu" and kernels.available() and \
            all(p.top_k == 0 and p.top_p == 1 and p.min_p == 0 and p.logprobs == 0 for p in params):
        # no truncation, no alternatives: one fused pass per row (same rule, the same uniforms drawn)
        u = torch.tensor([-1.0 if p.temperature == 0 else float(torch.rand(1, generator=g or default_gen))
                          for p, g in zip(params, generators)])
        fast = kernels.sample_rows(logits, temps, u)
        if fast is not None:
            return fast[0], fast[1], None
        return _sample_reference(logits, temps, params, u)
    return _sample_reference(logits, temps, params, None, generators, default_gen)


def _sample_mixed(logits, params, generators, default_gen, allowed):
    """Free rows through `sample`, constrained rows through the reference with their masks; one answer."""
    B = logits.shape[0]
    cons = sorted(allowed)
    free = [i for i in range(B) if i not in allowed]
    tokens, chosen, tops = torch.zeros(B, dtype=torch.long), torch.zeros(B), [None] * B
    for rows, mask in ((free, None), (cons, torch.stack([allowed[i] for i in cons]))):
        if not rows:
            continue
        sub = [params[i] for i in rows]
        gens = [generators[i] for i in rows]
        if mask is None:
            t, lp, tp = sample(logits[rows], sub, gens, default_gen)
        else:
            temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in sub], device=logits.device)
            t, lp, tp = _sample_reference(logits[rows], temps, sub, None, gens, default_gen, mask.to(logits.device))
        tokens[rows], chosen[rows] = t.cpu(), lp.float().cpu()
        for j, i in enumerate(rows):
            tops[i] = tp[j] if tp else None
    return tokens.to(logits.device), chosen.to(logits.device), tops if any(p.logprobs for p in params) else None


def _sample_reference(logits, temps, params, u=None, generators=None, default_gen=None, mask=None):
    """torch ops; u [B] (< 0 for greedy rows) when drawn already, else drawn here row by row; mask [B, V]:
    the tokens each row may take (log-probs stay those of the unmasked distribution)."""
    logp_all = torch.log_softmax(logits / temps[:, None], dim=-1)                      # [B, V]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    tokens = logits.argmax(-1)                                                        # greedy rows
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        scaled = logp_all[rows] if mask is None else logp_all[rows].masked_fill(~mask[rows], float("-inf"))
        for j, i in enumerate(rows):
            p = params[i]
            if p.top_k or p.top_p < 1 or p.min_p:
                scaled[j] = _truncate(scaled[j], p)
        # inverse-CDF sampling: one uniform per row from the row's own generator (batch-invariant)
        cdf = torch.softmax(scaled, -1).cumsum(-1)                                    # [b, V]
        if u is None:
            u = torch.cat([torch.rand(1, generator=generators[i] or default_gen, device=logits.device)
                           for i in rows])
        else:
            u = u[rows].to(logits.device)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).clamp(min=1e-30)[:, None]).squeeze(1)
        tokens[rows] = picked.clamp(max=logits.shape[-1] - 1)
    chosen = logp_all.gather(1, tokens[:, None]).squeeze(1)
    tops = None
    k = max(p.logprobs for p in params)
    if k:
        values, ids = torch.topk(logp_all, k, dim=-1)
        tops = [list(zip(ids[i, :p.logprobs].tolist(), values[i, :p.logprobs].tolist()))
                for i, p in enumerate(params)]
    return tokens, chosen, tops
