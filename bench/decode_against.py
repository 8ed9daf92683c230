"""The one-call decode stack of this tree against another build of the kernel library, in one engine run.

    python bench/decode_against.py OLD.so                       # 1 row x 300 tokens, base model
    python bench/decode_against.py OLD.so --rows 16 --lora      # rollouts' shape: 16 rows, live LoRA r16

OLD.so: a kernel library built from other sources (bench/paired.py says how). The engine generates on the
embedded SmolLM2-135M; its `kernels.decode_layers` calls (every decoder block of a step, not the lm_head or
sampling) alternate between the two libraries A B B A, and the ratio is the median of the pairs' ratios (two
calls of one pair are ~0.1 s apart).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu, load_avg  # noqa: E402
from bench.paired import abba, other_library, paired_ratio  # noqa: E402


def main() -> None:
    import rftkit.decode_stack as stack
    from rftkit import kernels
    import rftkit.kernels.build as build
    from rftkit.engine import Engine
    from rftkit.loading import load
    from rftkit.lora import LoRAConfig, apply_lora
    from rftkit.sampling import SamplingParams
    ap = argparse.ArgumentParser()
    ap.add_argument("old", help="the other build of the kernel library (.so)")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--lora", action="store_true", help="a live LoRA r16 on every linear (as GRPO's rollouts)")
    args = ap.parse_args()
    new = build.load()
    if new is None:
        sys.exit(f"bench/decode_against.py: no kernels here ({build.error()})")
    old = other_library(args.old)
    kernels.set_lanes16(False)                                 # both at 8 lanes
    libs, times, calls = (old, new), ([], []), [0]
    decode_layers = stack.kernels.decode_layers

    def timed(*a, **k):
        side = abba(calls[0])
        calls[0] += 1
        build._lib = libs[side]
        try:
            t = time.perf_counter()
            out = decode_layers(*a, **k)
            times[side].append(time.perf_counter() - t)
        finally:
            build._lib = new
        return out

    stack.kernels.decode_layers = timed
    model, tok = load(None)
    if args.lora:
        apply_lora(model, LoRAConfig(r=16, alpha=32))
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.01)
    print(f"machine: {cpu()}, threads {torch.get_num_threads()}, 8 lanes, {load_avg()}")
    prompt = tok.encode_chat([{"role": "user", "content": "What is 23 + 45?"}])
    engine = Engine(model, max_seq_len=len(prompt) + args.tokens + 8, max_batch=args.rows)
    with torch.inference_mode():
        engine.generate([prompt] * args.rows, SamplingParams(temperature=1.0, max_tokens=args.tokens,
                                                             ignore_eos=True))
    n = min(len(times[0]), len(times[1]))
    if n == 0:
        sys.exit("bench/decode_against.py: the decode stack did not run (kernels disabled or not applicable)")
    ratio = paired_ratio(times[0][:n], times[1][:n])
    print(f"{args.rows} rows{' + LoRA r16' if args.lora else ''}: decode stack ms per step "
          f"{statistics.median(times[0]) * 1e3:.2f} (old) -> {statistics.median(times[1]) * 1e3:.2f} (this tree), "
          f"old / new {ratio:.3f} (median of {n} pairs)  [{load_avg()}]")


if __name__ == "__main__":
    main()
