"""MoE dispatch speed: fast (sorted, grouped matmuls) vs the per-expert masked loop, and a dense MLP of the
same active FLOPs, forward + backward, in one run.

    python bench/moe.py [--tokens 4096] [--dim 512] [--ffn 1024] [--experts 8] [--top-k 2] [--repeats 5]
                        [--threads N]

The routing comes from a random softmax top-k router (Mixtral-style, renormalised), so loads are uneven as in
a real layer. Active FLOPs per token = 3 projections * 2*D*F * K, x3 for forward + backward; the dense
baseline is one SwiGLU MLP of width K*F on the same tokens (same FLOPs, no dispatch). Prints the median time
of each, its GFLOP/s, and the ratios; checks fast == loop before timing.
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


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function; repeats interleave the functions so load from other processes on a
    shared machine falls on all of them alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()                                          # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    from rftkit.moe import MoEConfig, experts_fast, experts_loop, route
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    N, D, Fd, E, K = args.tokens, args.dim, args.ffn, args.experts, args.top_k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).requires_grad_()
    router = torch.randn(E, D, generator=g) / D ** 0.5
    gate_up = (torch.randn(E, 2 * Fd, D, generator=g) / D ** 0.5).requires_grad_()
    down = (torch.randn(E, D, Fd, generator=g) / Fd ** 0.5).requires_grad_()
    weights, experts = route(x.detach() @ router.T, MoEConfig(n_experts=E, top_k=K, expert_ffn_dim=Fd))
    weights.requires_grad_()
    dense_gate_up = (torch.randn(2 * K * Fd, D, generator=g) / D ** 0.5).requires_grad_()
    dense_down = (torch.randn(D, K * Fd, generator=g) / Fd ** 0.5).requires_grad_()
    grad_out = torch.randn(N, D, generator=g)

    def step(run):
        def fn():
            out = run(x, weights, experts, gate_up, down)
            torch.autograd.grad(out, [x, weights, gate_up, down], grad_out)
        return fn

    def dense():
        gt, up = F.linear(x, dense_gate_up).chunk(2, dim=-1)
        out = F.linear(F.silu(gt) * up, dense_down)
        torch.autograd.grad(out, [x, dense_gate_up, dense_down], grad_out)

    with torch.no_grad():
        diff = (experts_fast(x, weights, experts, gate_up, down) - experts_loop(x, weights, experts, gate_up, down))
    counts = torch.bincount(experts.reshape(-1), minlength=E).tolist()
    flops = 3 * 3 * 2 * N * D * Fd * K                # 3 projections, fwd + bwd = 3x fwd
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={N} D={D} F={Fd} E={E} K={K}; "
          f"tokens per expert {counts}; max |fast - loop| {diff.abs().max():.2e}")
    results = timed({"fast dispatch": step(experts_fast), "masked loop": step(experts_loop),
                     "dense MLP (same FLOPs)": dense}, args.repeats)
    for name, t in results.items():
        print(f"{name:24s} {t * 1e3:8.1f} ms  {flops / t / 1e9:6.1f} GFLOP/s (fwd+bwd {flops / 1e9:.1f} GFLOP)")
    print(f"fast / loop speed-up: {results['masked loop'] / results['fast dispatch']:.2f}x; "
          f"fast / dense FLOP/s: {results['dense MLP (same FLOPs)'] / results['fast dispatch']:.2f}")


if __name__ == "__main__":
    main()
