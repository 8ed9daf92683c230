"""Log-probs of G completions per prompt, with each prompt processed once per group.

    logp, mask, entropy = group_logprobs(model, prompts, completions, G)   # [N, Tc] each, N = P * G

GRPO scores G completions of the same prompt. Running every (prompt + completion) row through the model
spends most of the compute on G identical prompts. Here the P prompts are run once ([P, Tp], right-padded,
padding at position -1), their keys/values are repeated G times, and the N = P·G completions attend to them
([N, Tc]). Autograd sums the G gradients that flow back into each prompt's keys/values, so the gradient is
exactly that of the naive batch (tested), at roughly (Tp + G·Tc) / (G·(Tp + Tc)) of the work.
"""
from __future__ import annotations

import torch

from rftkit.logprobs import hidden_logprobs
from rftkit.model import KVCache, Transformer


def _pad(rows: list[list[int]], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), T), value, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, :len(r)] = True
    return ids, valid


class _RepeatedCache(KVCache):
    """A KVCache whose first entry per layer (the prompts) is repeated G times along the batch."""

    def __init__(self, prompt_cache: KVCache, G: int):
        super().__init__(len(prompt_cache.k))
        for layer in range(len(prompt_cache.k)):
            self.k[layer] = prompt_cache.k[layer].repeat_interleave(G, dim=0)
            self.v[layer] = prompt_cache.v[layer].repeat_interleave(G, dim=0)
            self.pos[layer] = prompt_cache.pos[layer].repeat_interleave(G, dim=0)


def group_logprobs(model: Transformer, prompts: list[list[int]], completions: list[list[int]], G: int,
                   temperature: float = 1.0, with_entropy: bool = False):
    """prompts: P token lists; completions: P·G token lists, group-major (prompt i owns rows i·G..i·G+G-1).
    Returns log π(token) of every completion token [N, Tc] (at `temperature`, as the sampler saw it), the
    validity mask [N, Tc], and the per-token entropy [N, Tc] (or None)."""
    P, N = len(prompts), len(completions)
    if N != P * G:
        raise ValueError(f"{N} completions for {P} prompts x G={G}: expected {P * G}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt has no token to predict the first completion token from")
    device = model.device
    p_ids, p_valid = _pad(prompts)
    p_ids, p_valid = p_ids.to(device), p_valid.to(device)
    p_len = p_valid.sum(1)                                                        # [P]
    p_pos = torch.where(p_valid, torch.arange(p_ids.shape[1], device=device)[None], -1)
    cache = KVCache(model.cfg.n_layers)
    h_prompt, aux_p = model(p_ids, positions=p_pos, cache=cache, return_hidden=True)   # [P, Tp, D]
    last = h_prompt[torch.arange(P, device=device), p_len - 1]                          # [P, D]

    c_ids, c_valid = _pad(completions)
    c_ids, c_valid = c_ids.to(device), c_valid.to(device)
    start = p_len.repeat_interleave(G)[:, None]                                     # [N, 1]
    c_pos = torch.where(c_valid, start + torch.arange(c_ids.shape[1], device=device)[None], -1)
    h_comp, aux_c = model(c_ids, positions=c_pos, cache=_RepeatedCache(cache, G), return_hidden=True)
    # the hidden state before token t predicts token t: [prompt's last, completion[:-1]]
    h = torch.cat([last.repeat_interleave(G, dim=0)[:, None], h_comp[:, :-1]], dim=1)  # [N, Tc, D]
    if with_entropy:
        logp, entropy = hidden_logprobs(h, c_ids, model.lm_head, temperature=temperature, with_entropy=True)
    else:
        logp, entropy = hidden_logprobs(h, c_ids, model.lm_head, temperature=temperature), None
    mask = c_valid.to(logp.dtype)
    aux = {k: aux_p.get(k, 0.0) + aux_c.get(k, 0.0) for k in set(aux_p) | set(aux_c)}
    return logp * mask, mask, (entropy * mask if entropy is not None else None), aux

