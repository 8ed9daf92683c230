"""The machine's roofs, measured now: fp32 FMA throughput, the int8 block and int4 tile products of the quantized
decode kernels (alone, and as whole tiles with every op the kernels run), MKL's sgemm, and memory bandwidth;
then what share of them the hot paths reach.

    python bench/roofline.py            # 1 and 2 threads

Run it in the same sitting as the other bench scripts (the CPU of a shared VM changes speed between runs):
their GFLOP/s or tok/s over these roofs is the "fraction of the roofline" in docs/benchmarks.md. The compute
probes (bench/roofline.c) are built with the system compiler and run independent chains in registers, so they
give the core's throughput, not a kernel's; MKL's sgemm (2048^3) is what a well-blocked GEMM reaches here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu, load_avg  # noqa: E402


def compute_probes(threads: int) -> str:
    src = Path(__file__).with_name("roofline.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "roofline"
        subprocess.run(["cc", "-O2", "-mavx2", "-mfma", "-fopenmp", str(src), "-o", str(exe)], check=True)
        return subprocess.run([str(exe), str(threads)], check=True, capture_output=True, text=True).stdout


def sgemm_gflops(threads: int, n: int = 2048) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    return 2 * n ** 3 * 3 / (time.perf_counter() - t) / 1e9


def main() -> None:
    from engine import bandwidth_gbs
    threads = os.cpu_count() or 2
    print(f"CPU: {cpu()}, {load_avg()}")
    print(compute_probes(threads), end="")
    for t in range(1, threads + 1):
        print(f"threads {t}: MKL sgemm 2048^3 {sgemm_gflops(t):.1f} GFLOP/s")
    torch.set_num_threads(threads)
    read, copy = bandwidth_gbs()
    print(f"memory bandwidth ({threads} threads): read {read:.1f} GB/s, copy {copy:.1f} GB/s")


if __name__ == "__main__":
    main()
