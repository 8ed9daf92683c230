"""The machine a bench row ran on, for the first line every bench script prints: the CPU's model (with AMD's
family and model, which tell Zen 3 from Zen 5), its SIMD flags and cores, and the load average now (on a shared
VM a row taken under load is not evidence).

    from bench.machine import cpu, load_avg
    print(f"machine: {cpu()}, {load_avg()}")     # machine: AMD EPYC (family 25 model 1; avx2 fma), 2 cores, load 0.40/0.67/1.27
"""
from __future__ import annotations

import os

SIMD = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def _cpuinfo(field: str) -> str:
    """The first /proc/cpuinfo value of `field` ("" where there is none, e.g. off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpuinfo("model name") or "unknown CPU"


def cpu() -> str:
    flags = f" {_cpuinfo('flags')} "
    simd = " ".join(f for f in SIMD if f" {f} " in flags) or "no AVX2"
    fam = f"family {_cpuinfo('cpu family')} model {_cpuinfo('model')}; " if "AMD" in _cpuinfo("vendor_id") else ""
    return f"{cpu_model()} ({fam}{simd}), {os.cpu_count()} cores"


def load_avg() -> str:
    return "load " + "/".join(f"{x:.2f}" for x in os.getloadavg())
