"""Token log-probs and masked means, the maths SFT and GRPO share: log p(target) from logits, or from final
hidden states through the lm_head a chunk of rows at a time so the [N, V] logits never exist at once.

    logp = hidden_logprobs(h, targets, model.lm_head)       # h [B, T, D], targets [B, T] -> [B, T]
    loss = -masked_mean(logp, mask)
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from rftkit import kernels


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> log p(target) [B, T], a chunk of rows at a time so that the
    softmax's [*, V] temporaries stay small (the logits themselves are the caller's)."""
    flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = [flat[i:i + chunk].float().gather(-1, t[i:i + chunk, None]).squeeze(-1)
           - torch.logsumexp(flat[i:i + chunk].float(), dim=-1) for i in range(0, flat.shape[0], chunk)]
    return torch.cat(out).view(targets.shape)


# exp(y) for y below about -87.3 underflows to a denormal or zero, and torch's CPU exp takes a slow path there:
# 0.29 s instead of 0.025 s for [1024, 49152] log-probs spread over [-120, 0] (most of a real vocabulary sits
# that far below the top token). Flooring y at -87 first costs one in-place pass; the probabilities it changes
# are below 1.7e-38, nothing next to a row sum >= 1. (The CPU kernel floors at -86 as it goes.)
EXP_FLOOR = -87.0


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h W^T in fp32: into `out` (a workspace slice) when given, else a fresh tensor."""
    if out is not None:
        return kernels.linear_into(h.detach(), weight.detach(), out)
    return F.linear(h, weight).float()


class _Workspace:
    """A [rows, V] fp32 buffer reused from call to call for the logits of hidden_logprobs. A fresh 200 MB tensor
    per GRPO step (1,024 rows x V = 49,152) page-faults 49k times: 0.2-2 s of system time per step on a 2-core
    VM, more than the exp itself. The buffer is handed out again only once no chunk of it that a graph keeps for
    backward is alive (weak references); while one is, callers get a fresh tensor."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.kept: list = []

    def take(self, rows: int, V: int) -> torch.Tensor:
        if any(r() is not None for r in self.kept):
            return torch.empty(rows, V)
        self.kept = []
        if self.buf is None or self.buf.numel() < rows * V:
            self.buf = None                                   # free the old one before allocating
            self.buf = torch.empty(rows * V)
        return self.buf[:rows * V].view(rows, V)

    def keep(self, chunk: torch.Tensor) -> None:
        self.kept.append(weakref.ref(chunk))


_workspaces: "weakref.WeakKeyDictionary[torch.nn.Module, _Workspace]" = weakref.WeakKeyDictionary()


class _HeadLogProbs(torch.autograd.Function):
    """One chunk of rows: z = h W^T / T -> (log softmax(z)[t], entropy of softmax(z) without gradient), with
    the backward written out (d logp / dz = onehot(t) - p). On CPU in fp32 the logits go into `buf` (a
    workspace slice) and one kernel pass (kernels.softmax_rows) turns them into e = exp(z - max) in place with
    the row statistics, so a chunk makes no [c, V] allocation at all; elsewhere two [c, V] buffers (z, then p,
    in place) where autograd's logsumexp / gather / softmax graph made about ten. Only e (or p) is kept for
    backward; with `recompute` nothing of [c, V] size is kept and p is rebuilt in backward from h, W and the
    log-normaliser (one more lm_head matmul); without a gradient (a reference forward under no_grad) it is
    called with `recompute` and keeps nothing."""

    @staticmethod
    def forward(ctx, h, t, weight, inv_t: float, recompute: bool, want_entropy: bool, buf):
        z = _chunk_logits(h, weight, buf)                  # buf: only for fp32 CPU rows (hidden_logprobs)
        stats = kernels.softmax_rows(z, t, inv_t, want_entropy)
        if stats is not None:                                                        # z now holds e
            logp, lse, ent, s = stats
            ent = lse.new_zeros(lse.shape) if ent is None else ent
            p, inv_s = z, 1.0 / s
        else:
            if inv_t != 1.0:
                z.mul_(inv_t)
            zt = z.gather(1, t[:, None]).squeeze(1)
            m = z.amax(1, keepdim=True)
            z.sub_(m).clamp_(min=EXP_FLOOR)                                          # y = z - max <= 0
            p = torch.exp(z)
            s = p.sum(1, keepdim=True)
            log_s = s.log().squeeze(1)
            lse = m.squeeze(1) + log_s
            if want_entropy:                                                         # H = log s - sum(e^y y) / s
                ent = log_s - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1) / s.squeeze(1)
            else:
                ent = lse.new_zeros(lse.shape)
            logp, inv_s = zt - lse, 1.0 / s.squeeze(1)
            del z
        ctx.inv_t = inv_t
        ctx.save_for_backward(h, t, weight, lse)
        ctx.p, ctx.inv_s = (None, None) if recompute else (p, inv_s)                 # p = e * inv_s
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g, _g_entropy):
        h, t, weight, lse = ctx.saved_tensors
        g = g.float()
        if ctx.p is None:                              # recompute, or a second backward (retain_graph)
            z = _chunk_logits(h, weight)
            if ctx.inv_t != 1.0:
                z.mul_(ctx.inv_t)
            p, scale = z.sub_(lse[:, None]).clamp_(min=EXP_FLOOR).exp_(), -g
        else:
            p, ctx.p = ctx.p, None                     # consumed in place below
            scale = -g * ctx.inv_s
        dz = p.mul_(scale[:, None]).scatter_add_(1, t[:, None], g[:, None])            # g (onehot(t) - p)
        if ctx.inv_t != 1.0:
            dz.mul_(ctx.inv_t)
        dz = dz.to(h.dtype)
        gh = kernels.matmul_nn(dz, weight) if ctx.needs_input_grad[0] else None
        gw = dz.t().matmul(h) if ctx.needs_input_grad[2] else None
        return gh, None, gw, None, None, None, None


RECOMPUTE_BYTES = 1 << 30     # keep the logits for backward up to 1 GiB, recompute them above


def hidden_logprobs(h: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, chunk: int = 1024,
                    temperature: float = 1.0, recompute: bool | None = None, with_entropy: bool = False):
    """Final hidden states h [..., D] and targets [...] -> log p(target) [...], computing the [*, V] logits
    one chunk of rows at a time (`_HeadLogProbs`), on CPU into a workspace kept with `lm_head` between calls.
    With `recompute` each chunk's probabilities are rebuilt in backward instead of kept, so [N, V] never
    exists (N = all rows; at V = 49152 that is the largest tensor of a step); by default only when keeping
    them would take more than RECOMPUTE_BYTES (one more lm_head matmul).
    with_entropy: return (log-probs, entropies [...]) — the entropy of each row's distribution at
    `temperature`, from the same logits, without gradient (GRPO logs it)."""
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    weight = lm_head.weight
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("hidden_logprobs supports an lm_head without bias")
    grad = torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad)
    N, V = flat_h.shape[0], weight.shape[0]
    if recompute is None:
        recompute = N * V * 4 > RECOMPUTE_BYTES
    keep = grad and not recompute
    buf = None
    if flat_h.device.type == "cpu" and flat_h.dtype == torch.float32 and weight.dtype == torch.float32 and N:
        ws = _workspaces.setdefault(lm_head, _Workspace())
        buf = ws.take(N if keep else min(chunk, N), V)           # kept chunks each need their rows
    out = []
    for i in range(0, N, chunk):
        part = None
        if buf is not None:
            part = buf[i:i + chunk] if keep else buf[:min(chunk, N - i)]
            if keep:
                ws.keep(part)
        out.append(_HeadLogProbs.apply(flat_h[i:i + chunk], flat_t[i:i + chunk], weight, 1.0 / temperature,
                                       not keep, with_entropy, part))
    logp = torch.cat([o[0] for o in out]).view(targets.shape) if out else flat_h.new_zeros(targets.shape)
    if not with_entropy:
        return logp
    return logp, (torch.cat([o[1] for o in out]).view(targets.shape) if out else flat_h.new_zeros(targets.shape))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
