"""The training kernels (packed attention, SwiGLU) against torch's ops, paired in one process.

    python bench/train_kernels.py [--lens 120 250 180 90 300 200 160 230] [--pairs 10]

The embedded model with LoRA r16 on every linear runs a forward and backward over the packed sequences (the log-probs'
head left out), with the C kernels on and off (`kernels.set_enabled`: SDPA per sequence and F.silu * up) alternating
A B B A; prints each side's median and the median of the pairs' ratios. On a shared VM whose speed drifts between
minutes, only such paired ratios compare code.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[120, 250, 180, 90, 300, 200, 160, 230])
    ap.add_argument("--pairs", type=int, default=10)
    args = ap.parse_args()
    from rftkit import kernels
    from rftkit.loading import load
    from rftkit.lora import LoRAConfig, LoRALinear, apply_lora
    print(f"machine: {cpu()}, {torch.get_num_threads()} threads, {kernels.status()}, {load_avg()}", flush=True)
    model, _ = load(None)
    apply_lora(model, LoRAConfig(r=16, alpha=32.0))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.01)
    model.train()
    ids = torch.randint(0, model.cfg.vocab_size, (1, sum(args.lens)), generator=torch.Generator().manual_seed(0))

    def step(on: bool) -> float:
        kernels.set_enabled(on)
        try:
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            h, _ = model(ids, return_hidden=True, seq_lens=args.lens)
            h.square().mean().backward()
            return time.perf_counter() - t
        finally:
            kernels.set_enabled(True)

    step(True), step(False)                                           # warm-up (and kernel build)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.pairs):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            times[on].append(step(on))
    ratio = statistics.median(b / a for a, b in zip(times[True], times[False]))
    print(f"{sum(args.lens)} packed tokens in {len(args.lens)} sequences, forward + backward, median of {args.pairs}: "
          f"kernels {statistics.median(times[True]):.3f} s, torch {statistics.median(times[False]):.3f} s; "
          f"torch / kernels, median of pairs: {ratio:.3f}x ({load_avg()})")


if __name__ == "__main__":
    main()
