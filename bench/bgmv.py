"""Per-row adapters of a mixed batch: rftkit.kernels.lora_bgmv against torch's grouped path.

    python bench/bgmv.py [--repeats 7] [--rows 64 512] [--slots 1 16]

The peer is what a mixed batch costs in torch (PEFT's mixed-adapter inference and our bank's own fallback on
CUDA or under autograd): per slot, index_select its rows, two small matmuls, index_add. Both run the 7 linear
shapes of SmolLM2-135M over its 30 layers (r = 16 on every module), a separate adapter per layer and slot, so
the adapters come from memory as in a decode step (16 slots: ~310 MB). Prints the median time per pass over
the 210 modules and the ratio.
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

from bench.machine import cpu  # noqa: E402
from rftkit import kernels  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)
LAYERS, RANK = 30, 16


def tables(n_slots: int, g: torch.Generator) -> list[tuple[kernels.SlotTable, int, int]]:
    out = []
    for _ in range(LAYERS):
        for K, N in SHAPES:
            t = kernels.SlotTable(n_slots)
            for k in range(1, n_slots + 1):
                t.set(k, torch.randn(RANK, K, generator=g) * 0.02, torch.randn(N, RANK, generator=g) * 0.02, 2.0)
            out.append((t, K, N))
    return out


def torch_grouped(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, table: kernels.SlotTable,
                  groups: list[tuple[int, torch.Tensor]]) -> None:
    for k, idx in groups:
        A, B, s = table.tensors[k]
        y.index_add_(0, idx, F.linear(F.linear(x.index_select(0, idx), A), B), alpha=s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    print(f"machine: {cpu()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"kernels: {kernels.status()}")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for S in args.slots:
            tabs = tables(S, g)
            mb = sum(S * RANK * (K + N) * 4 for _, K, N in tabs) / 1e6
            for M in args.rows:
                rows = (torch.arange(M) % S + 1).to(torch.int32)
                groups = [(k, (rows == k).nonzero().flatten()) for k in range(1, S + 1)]
                xs = {K: torch.randn(M, K, generator=g) for K in (576, 1536)}
                ys = {N: torch.zeros(M, N) for N in (192, 576, 1536)}

                def ours():
                    for t, K, N in tabs:
                        kernels.lora_bgmv(xs[K], ys[N], rows, t)

                def peer():
                    for t, K, N in tabs:
                        torch_grouped(xs[K], ys[N], rows, t, groups)

                times = {"ours": [], "torch": []}
                for f in (ours, peer):                      # warm-up
                    f()
                for _ in range(args.repeats):               # interleaved
                    for name, f in (("ours", ours), ("torch", peer)):
                        t0 = time.perf_counter()
                        f()
                        times[name].append(time.perf_counter() - t0)
                a, b = statistics.median(times["ours"]), statistics.median(times["torch"])
                flops = 2 * M * RANK * sum(K + N for _, K, N in tabs)
                print(f"{S:2d} slots x {M:3d} rows ({mb:4.0f} MB of adapters): ours {a * 1e3:7.2f} ms "
                      f"({flops / a / 1e9:4.0f} GFLOP/s)  torch grouped {b * 1e3:7.2f} ms  ratio {b / a:5.2f}x",
                      flush=True)
            del tabs


if __name__ == "__main__":
    main()
