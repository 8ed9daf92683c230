"""Decode attention (`kernels.paged_attention`) over the paged KV cache, as a batched decode step reads it.

    python bench/attention.py                          # 64 rows x 101 positions, 30 layers, the embedded shapes
    python bench/attention.py --against OLD.so         # this tree's kernel against another build, paired

Each of `--layers` layers has its own K and V pools (SmolLM2-135M's 3 KV heads x 64, 16-token blocks), every
row's blocks scattered over the pool at random as the engine's allocator leaves them, so a pass over all layers
reads the keys and values from memory (30 x 64 x 101 x 1.5 KB = 298 MB), not from cache. Prints ms per pass
and the bytes read per second; with --against, the two builds alternate pass by pass (A B B A, bench/paired.py)
and the ratio is the median of the pairs'.
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
    import rftkit.kernels.build as build
    from rftkit.kernels.attention import paged_attention_reference
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", help="another build of the kernel library (.so) to pair with")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--positions", type=int, default=101, help="keys per row (prompt + tokens so far)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--passes", type=int, default=40)
    args = ap.parse_args()
    new = build.load()
    if new is None:
        sys.exit(f"bench/attention.py: no kernels here ({build.error()})")
    libs = (other_library(args.against) if args.against else new, new)
    B, H, Hkv, hd, bs, L = args.rows, 9, 3, 64, 16, args.positions
    nb = -(-L // bs)
    slots = B * nb + 1                                  # block 0 is the engine's padding block
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(args.layers):
        kc, vc = torch.randn(slots * bs, Hkv, hd, generator=g), torch.randn(slots * bs, Hkv, hd, generator=g)
        table = (torch.randperm(slots - 1, generator=g)[:B * nb] + 1).view(B, nb).contiguous()
        layers.append((kc, vc, table))
    qpos = torch.full((B,), L - 1, dtype=torch.int64)
    q, out = torch.randn(B, H, hd, generator=g), torch.empty(B, H, hd)
    nt = torch.get_num_threads()

    def run(lib, kc, vc, table):
        lib.paged_attn(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), table.data_ptr(), qpos.data_ptr(),
                       out.data_ptr(), B, H, Hkv, hd, nb, bs, 0, hd ** -0.5, nt)

    for lib in libs:                                    # both builds agree with the reference
        run(lib, *layers[0])
        err = (out - paged_attention_reference(q, *layers[0], qpos, bs, None)).abs().max().item()
        if err > 1e-4:
            sys.exit(f"bench/attention.py: {lib._name} differs from the reference by {err:.2e}")
    times = ([], [])
    for i in range(args.passes):
        side = abba(i) if args.against else 1
        t = time.perf_counter()
        for layer in layers:
            run(libs[side], *layer)
        times[side].append(time.perf_counter() - t)
    gb = args.layers * B * L * Hkv * hd * 4 * 2 / 1e9
    ms = statistics.median(times[1]) * 1e3
    print(f"machine: {cpu()}, threads {nt}, {load_avg()}")
    line = (f"{B} rows x {L} positions x {args.layers} layers: {ms:.2f} ms a pass, {gb / ms * 1e3:.1f} GB/s of "
            f"keys and values")
    if args.against:
        line += (f"; other build {statistics.median(times[0]) * 1e3:.2f} ms, other / this "
                 f"{paired_ratio(times[0], times[1]):.3f} (median of {len(times[1])} pairs)")
    print(line)


if __name__ == "__main__":
    main()
