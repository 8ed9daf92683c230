"""The GEMV kernel (8 lanes; 16 lanes where the CPU has AVX-512) against MKL's F.linear, at SmolLM2-135M's shapes.

    python bench/gemv.py                  # rows 1, 2, 4, 8, 16, 32, 64
    python bench/gemv.py --rows 1 64
    python bench/gemv.py --against OLD.so # this tree's kernel against another build of the library, paired

--against takes a kernel library built from other sources (bench/paired.py says how): calls alternate A B B A
between the two on the same inputs, each ratio the median of the pairs' ratios; prints old ms -> new ms
(old / new).

Each shape cycles through copies of its weight totalling ~600 MB (more than any L3 here) so each call reads its
weight from memory, as a decode step does (with 8 copies, ~28 MB, an L3 fed the 16-row calls 1.6x faster).
Prints milliseconds per call (median), GFLOP/s and the ratio MKL / kernel (above 1: the kernel is faster), and
checks each kernel's result against F.linear.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu, load_avg  # noqa: E402
from bench.paired import abba, other_library, paired_ratio  # noqa: E402

SHAPES = [(576, 576, "q/o"), (192, 576, "k/v"), (1536, 576, "gate/up"), (576, 1536, "down"), (49152, 576, "head")]


def median_s(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def paired(libs, M: int) -> None:
    """Each shape: libs[0] vs libs[1] (8 lanes), A B B A over weights from memory; median of the pairs' ratios."""
    cells = []
    for N, K, name in SHAPES:
        Ws = [torch.randn(N, K) for _ in range(max(2, 600 * 2**20 // (N * K * 4)))]
        x, y = torch.randn(M, K), torch.empty(M, N)
        ts: dict[int, list[float]] = {0: [], 1: []}
        for i in range(600 if N < 40000 else 40):
            v = abba(i)
            W = Ws[i % len(Ws)]
            t = time.perf_counter()
            libs[v].gemv(x.data_ptr(), W.data_ptr(), 0, y.data_ptr(), M, N, K, torch.get_num_threads())
            ts[v].append(time.perf_counter() - t)
            if i < 2:
                err = float((y - F.linear(x, W)).abs().max())
                assert err < 1e-3 * K ** 0.5, f"library {v} off by {err} at {M}x{K} @ {N}"
        ratio = paired_ratio(ts[0], ts[1])
        cells.append(f"{name} {statistics.median(ts[0]) * 1e3:.3f}->{statistics.median(ts[1]) * 1e3:.3f} "
                     f"({ratio:.2f}x)")
    print(f"rows {M:3d}  " + "  ".join(cells), flush=True)


def main() -> None:
    from rftkit import kernels
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--against", default=None, help="another build of the kernel library (.so): paired A/B")
    args = ap.parse_args()
    if not kernels.available():
        sys.exit(f"bench/gemv.py: no kernels here ({kernels.status()})")
    lib = kernels.load()
    if args.against:
        old = other_library(args.against)
        kernels.set_lanes16(False)
        torch.set_num_threads(2)
        print(f"machine: {cpu()}, threads {torch.get_num_threads()}, 8 lanes, {load_avg()}")
        print(f"ms per call, {Path(args.against).name} -> this tree (old / new, median of paired ratios)")
        for M in args.rows:
            paired((old, lib), M)
        return
    wide = " avx512f" in kernels.build._cpuinfo()
    default16 = kernels.lanes() == 16
    torch.set_num_threads(2)
    print(f"machine: {cpu()}, threads {torch.get_num_threads()}, {kernels.status()}, {load_avg()}")
    print("ms per call: kernel 8 lanes / kernel 16 lanes / MKL (ratio MKL over the default kernel, GFLOP/s)")
    try:
        for M in args.rows:
            cells = []
            for N, K, name in SHAPES:
                Ws = [torch.randn(N, K) for _ in range(max(2, 600 * 2**20 // (N * K * 4)))]
                x, y = torch.randn(M, K), torch.empty(M, N)
                turn = [0]

                def weight():
                    turn[0] += 1
                    return Ws[turn[0] % len(Ws)]

                def ours():
                    lib.gemv(x.data_ptr(), weight().data_ptr(), 0, y.data_ptr(), M, N, K, torch.get_num_threads())

                reps = 30 if N < 40000 else 6
                times = {}
                for lanes in ((8, 16) if wide else (8,)):
                    kernels.set_lanes16(lanes == 16)
                    times[lanes] = median_s(ours, reps)
                    err = float((y - F.linear(x, Ws[turn[0] % len(Ws)])).abs().max())
                    assert err < 1e-3 * K ** 0.5, f"{lanes}-lane kernel off by {err} at {M}x{K} @ {N}"
                t_mkl = median_s(lambda: F.linear(x, weight()), reps)
                t_def = times[16 if default16 else 8]
                lanes_s = "/".join(f"{times[k] * 1e3:.3f}" for k in sorted(times))
                cells.append(f"{name} {lanes_s}/{t_mkl * 1e3:.3f} ({t_mkl / t_def:.2f}x, "
                             f"{2 * M * N * K / t_def / 1e9:.0f} GF)")
            print(f"rows {M:3d}  " + "  ".join(cells), flush=True)
    finally:
        kernels.set_lanes16(default16)


if __name__ == "__main__":
    main()
