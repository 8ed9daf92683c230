"""Paired A/B of two builds of the kernel library in one process (bench/gemv.py --against,
bench/decode_against.py): calls alternate A B B A, and a ratio is the median of the pairs' ratios, so that the
machine's drift (up to 70% between minutes on the shared VMs) cancels.

    old = other_library("/root/.cache/rftkit/kernels/kernels-<hash>.so")   # at 8 lanes, signatures set
    side = abba(i)                                                          # 0 (old) or 1 (new) for call i
    ratio = paired_ratio(times_old, times_new)

The other build comes from other sources: `git worktree add /tmp/old <commit>`, then `cd /tmp/old && python -c
"import rftkit.kernels.build as b; b.load(); print(b._lib._name)"`.
"""
from __future__ import annotations

import ctypes
import statistics


def other_library(path: str):
    """Another build of the kernel library, with this tree's ctypes signatures (those of the entry points it has: an
    older build lacks the newer ones), its GEMV at 8 lanes."""
    import rftkit.kernels.build as build
    lib = ctypes.CDLL(path)
    build._apply(lib, {name: sig for name, sig in build._signatures.items() if hasattr(lib, name)})
    lib.set_wide.argtypes = [ctypes.c_int]
    lib.set_wide(0)
    return lib


def abba(i: int) -> int:
    """Which side call i runs: A B B A A B B A ... (each side first half the time)."""
    return (i // 2) % 2 if i % 2 == 0 else 1 - (i // 2) % 2


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over the pairs (k-th A time, k-th B time) of A / B."""
    return statistics.median(x / y for x, y in zip(a, b))
