"""Row softmax kernels (softmax.c): a decode step's sampling and the training log-probs' statistics, or None where
the caller's torch ops should run.

    tokens, logp = sample_rows(logits, temperature, u)   # inverse-CDF sampling in one pass per row
    logp, lse, ent, s = softmax_rows(z, targets, 1 / T, True)   # training log-probs, z -> exp in place

Sampling at batch 64 spent ~14 ms a step in torch (log_softmax, a second softmax, cumsum over 49152 tokens,
searchsorted); the kernel reads each row's logits three times.
"""
from __future__ import annotations

import ctypes

import torch

import rftkit.kernels.build as build

_P, _I = ctypes.c_void_p, ctypes.c_int
build.declare({
    "sample_rows": ([_P, _P, _P, _P, _P, _I, _I, _I], None),
    "softmax_rows": ([_P, _P, ctypes.c_float, _P, _P, _P, _P, _I, _I, _I], None),
})


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor):
    """logits [B, V]; temperature [B] (> 0); u [B] uniforms in [0, 1), or < 0 for greedy rows ->
    (tokens int64 [B], log_softmax(logits / T) at those tokens [B]), or None where the kernel does not apply.
    Sampled rows take the first token whose CDF reaches u (rftkit.sampling's reference rule)."""
    lib = build.usable(logits)
    if lib is None or logits.dim() != 2:
        return None
    logits = logits.contiguous()
    B, V = logits.shape
    inv_t = (1.0 / temperature.float()).contiguous()
    u = u.float().contiguous()
    tok, logp = torch.empty(B, dtype=torch.int64), torch.empty(B)
    lib.sample_rows(logits.data_ptr(), inv_t.data_ptr(), u.data_ptr(), tok.data_ptr(), logp.data_ptr(), B, V,
                    torch.get_num_threads())
    return tok, logp


def softmax_rows(z: torch.Tensor, targets: torch.Tensor, inv_t: float, with_entropy: bool):
    """Log-softmax statistics of logits z [B, V] at temperature 1/inv_t, overwriting z with the unnormalised
    probabilities e = exp((z - max) * inv_t) (floored at exp(-86)): (log p(target) [B], log-normaliser [B],
    entropy [B] or None, row sums of e [B]); None where the kernel does not apply (the caller runs torch ops).
    targets int64 [B]."""
    lib = build.usable(z)
    if lib is None or z.dim() != 2 or not z.is_contiguous() or targets.dtype != torch.int64:
        return None
    B, V = z.shape
    t = targets.contiguous()
    logp, lse, s = torch.empty(B), torch.empty(B), torch.empty(B)
    ent = torch.empty(B) if with_entropy else None
    lib.softmax_rows(z.data_ptr(), t.data_ptr(), float(inv_t), logp.data_ptr(), lse.data_ptr(),
                     0 if ent is None else ent.data_ptr(), s.data_ptr(), B, V, torch.get_num_threads())
    return logp, lse, ent, s
