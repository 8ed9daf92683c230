"""The quantized decode kernel (qgemm.c) against the fp32 GEMV kernel, on a whole stack of SmolLM2-135M's layers.

    python bench/qgemm.py                      # rows 1, 8, 16, 32, 64
    python bench/qgemm.py --rows 32 --layers 30

Per decoder block, the four calls a decode step makes: q/k/v in one call (576 -> 576 + 192 + 192), o (576 -> 576),
gate/up in one call (576 -> 2 x 1536), down (1536 -> 576); --layers blocks of random weights, so each call reads
its weight from memory as a decode step does. Columns: fp32 (the GEMV kernel the fp32 engine runs), int8, int4
(group 32), int4 with an unmerged r = 16 LoRA on every layer fused in the call (what the int4 pair of
bench/compress.py runs). The four alternate --reps times;
prints milliseconds per pass over the stack (the fastest of the reps: this machine's speed drifts), GMAC/s of the base product and
the ratio fp32 time / int4 time (above 1: int4 is faster), with the load average.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu, load_avg  # noqa: E402

D, F_, KV = 576, 1536, 192
BLOCK = [((D, D), (KV, D), (KV, D)), ((D, D),), ((F_, D), (F_, D)), ((D, F_),)]   # calls: (N, K) per layer
MACS = sum(n * k for call in BLOCK for n, k in call)


def one_s(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main() -> None:
    from rftkit import kernels
    from rftkit.compress.quantize import QuantLinear, linear_many
    from rftkit.kernels.gemv import linear_many as gemv_many
    from rftkit.lora import LoRALinear
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not kernels.available():
        sys.exit(f"bench/qgemm.py: no kernels here ({kernels.status()})")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {cpu()}, threads {args.threads}, {kernels.status()}, {load_avg()}")
    fp32, q8, q4, q4l = [], [], [], []
    for _ in range(args.layers):
        blk = [[nn.Linear(k, n, bias=False) for n, k in call] for call in BLOCK]
        fp32.append([[lin.weight.detach() for lin in call] for call in blk])
        q8.append([[QuantLinear.from_linear(lin, 8) for lin in call] for call in blk])
        q4.append([[QuantLinear.from_linear(lin, 4, 32) for lin in call] for call in blk])
        lo = [[LoRALinear(m, 16, 32) for m in call] for call in q4[-1]]
        for call in lo:
            for m in call:
                nn.init.normal_(m.lora_B, std=0.01)
        q4l.append(lo)

    def run_fp32(xs):
        for blk in fp32:
            for ws in blk:
                gemv_many(xs[ws[0].shape[1]], ws, [None] * len(ws))

    def run_q(stack):
        def go(xs):
            for blk in stack:
                for mods in blk:
                    linear_many(mods, xs[mods[0].in_features])
        return go

    print(f"{args.layers} blocks, {MACS / 1e6:.1f} M multiply-adds per row per block; ms per pass (GMAC/s)")
    print(f"{'rows':>4} | {'fp32 GEMV':>16} | {'int8':>16} | {'int4':>16} | {'int4 + LoRA r16':>16} | int4 vs fp32")
    with torch.no_grad():
        for M in args.rows:
            x = {K: torch.randn(M, K) for K in (D, F_)}                # each call's input, contiguous
            fns = (run_fp32, run_q(q8), run_q(q4), run_q(q4l))
            for fn in fns:
                fn(x)
            times = [min(ts) for ts in zip(*[[one_s(fn, x) for fn in fns] for _ in range(args.reps)])]
            cells = [f"{t * 1e3:7.2f} ({M * MACS * args.layers / t / 1e9:5.1f})" for t in times]
            print(f"{M:>4} | " + " | ".join(f"{c:>16}" for c in cells) + f" | {times[0] / times[2]:.2f}x"
                  f" (with LoRA {times[0] / times[3]:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
