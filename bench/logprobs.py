"""The lm_head log-probs of a GRPO update, alone: `rftkit.logprobs.hidden_logprobs` (one autograd Function with its
backward written out) vs the autograd graph it replaced (logsumexp, gather, softmax for the entropy), in one run.

    python bench/logprobs.py            # 1,024 rows (16 completions x 64 tokens), SmolLM2's V = 49,152, D = 576

Forward + backward (gradient to the hidden states, the head frozen as under LoRA), entropy included; median of
repeats 2..N; prints both times, the ratio and the largest difference of the log-probs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    from rftkit.logprobs import hidden_logprobs
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    head = torch.nn.Linear(args.dim, args.vocab, bias=False).requires_grad_(False)
    h = torch.randn(args.rows, args.dim, requires_grad=True)
    t = torch.randint(0, args.vocab, (args.rows,))

    def graph(h):                                  # the previous implementation, op by op
        logits = F.linear(h, head.weight).float()
        lse = torch.logsumexp(logits, -1)
        logp = logits.gather(-1, t[:, None]).squeeze(-1) - lse
        with torch.no_grad():
            ent = lse - (F.softmax(logits, -1) * logits).sum(-1)
        return logp, ent

    def ours(h):
        return hidden_logprobs(h, t, head, chunk=args.rows, with_entropy=True)

    times: dict[str, list[float]] = {"autograd graph": [], "hidden_logprobs": []}
    for _ in range(args.repeats):
        for name, f in (("autograd graph", graph), ("hidden_logprobs", ours)):
            t0 = time.perf_counter()
            logp, _ent = f(h)
            logp.sum().backward()
            h.grad = None
            times[name].append(time.perf_counter() - t0)
    with torch.no_grad():
        diff = float((graph(h)[0] - ours(h)[0]).abs().max())
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"{args.rows} rows x V={args.vocab}, D={args.dim}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    for k, v in times.items():
        print(f"  {k:16s} median {med[k]:.3f} s  {[round(x, 3) for x in v]}")
    print(f"  ratio {med['autograd graph'] / med['hidden_logprobs']:.2f}x; max |log-prob difference| {diff:.2e}")


if __name__ == "__main__":
    main()
