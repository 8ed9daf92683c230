"""Build and load the C kernels: every .c file of this folder, with the one header kernels.h, compiled once by the
system compiler into ONE shared library in the cache (named by a hash of the sources) and loaded with ctypes.

    lib = load()                # the library, or None where this machine cannot build it (then `error()` says why)
    set_enabled(False)          # the torch reference paths everywhere (A/B benchmarks, tests)

No torch headers (~5 s to build); the library links `libgomp.so.1`, which torch has loaded already, so the
kernels and torch share one OpenMP pool. The cache folder is found here, by the rule rftkit.loading uses
(RFTKIT_CACHE, else ~/.cache/rftkit): the kernels import nothing from rftkit.

Each family module declares the ctypes signatures of its entry points next to its structs (`declare`); they
are set on the library when it loads. Also here: the CPU's features. The GEMV and BGMV kernels run 16 lanes
wide on Intel CPUs with AVX-512 and on AMD Zen 5 (`set_lanes16`); on AMD the GEMV then takes every row count
(`_all_rows`). The measurements behind these choices are in docs/benchmarks.md ("Kernel design notes").
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]

_lib = None
_error: str | None = None
_enabled = True
_signatures: dict[str, tuple[list, object]] = {}   # entry point -> (argtypes, restype)
_lanes16: bool | None = None
_all_rows = False              # the GEMV kernel takes any number of rows (16 lanes on AMD), not just few
_amd = False                   # an AMD CPU: the training logits (linear_into) go through the kernel at any lanes


def cache_dir() -> Path:
    """rftkit's cache folder, by the rule of rftkit.loading.cache.cache_dir (the kernels import nothing from rftkit)."""
    return Path(os.environ.get("RFTKIT_CACHE") or Path.home() / ".cache" / "rftkit")


def sources() -> list[Path]:
    """The header and the C files, in a fixed order (the library's hash covers them all)."""
    return [HERE / "kernels.h"] + sorted(HERE.glob("*.c"))


def declare(signatures: dict[str, tuple[list, object]]) -> None:
    """Register entry points' ctypes signatures {name: (argtypes, restype)}; set now if the library is loaded."""
    _signatures.update(signatures)
    if _lib is not None:
        _apply(_lib, signatures)


def _apply(lib, signatures: dict) -> None:
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype


def _cpuinfo() -> str:
    return open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    """Compile the sources once into the cache (`kernels/kernels-{hash}.so`) and load the library: (library,
    None), or (None, why not) on a CPU without AVX2+FMA or a machine without a compiler."""
    flags = _cpuinfo()
    if " avx2" not in flags or " fma" not in flags:
        return None, "CPU without AVX2+FMA"
    files = sources()
    h = hashlib.sha256(" ".join(FLAGS).encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    so = cache_dir() / "kernels" / f"kernels-{h.hexdigest()[:12]}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / so.name
            cmd = [os.environ.get("CC", "cc"), *FLAGS, "-I", str(HERE), *(str(f) for f in files[1:]),
                   "-o", str(out), "-lm"]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                return None, f"could not compile the decode kernels ({cmd[0]}: {e})"
            os.replace(out, so)                  # atomic: a concurrent process sees all or nothing
    return ctypes.CDLL(str(so)), None


def load():
    """Build (once, into the cache) and load the kernels; None when this machine cannot. Not affected by
    `set_enabled` (rftkit.compress.quantize's layers use the library whenever it exists)."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    lib, _error = _build()
    if lib is None:
        return None
    _apply(lib, _signatures)
    lib.set_wide.argtypes = [ctypes.c_int]
    cpuinfo = _cpuinfo()
    _set_lanes(lib, _default_lanes16(cpuinfo), cpuinfo)
    _lib = lib
    return lib


def error() -> str | None:
    """Why the library could not be built, once `load` has tried; else None."""
    return _error


def set_enabled(on: bool) -> None:
    """Use the kernels where they apply (default) or the torch reference everywhere."""
    global _enabled
    _enabled = bool(on)


def available() -> bool:
    return _enabled and load() is not None


def status() -> str:
    if not _enabled:
        return "torch reference (kernels disabled)"
    return f"C kernels ({lanes()} lanes)" if load() is not None else f"torch reference ({_error})"


def usable(*tensors: torch.Tensor):
    """The library when every tensor is a CPU fp32 tensor outside autograd (and the kernels are enabled), else
    None."""
    if not _enabled:
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or (t.requires_grad and torch.is_grad_enabled()):
            return None
    return load()


# ----------------------------------------------------------------------------------------------------------
# lanes

def _default_lanes16(cpuinfo: str) -> bool:
    """16 lanes on Intel CPUs with AVX-512 and on AMD Zen 5 or later (cpu family >= 26) with it; earlier AMD
    CPUs with AVX-512 (Zen 4 double-pumps 512-bit ops) keep 8 lanes, unmeasured there."""
    if " avx512f" not in cpuinfo:
        return False
    if "GenuineIntel" in cpuinfo:
        return True
    family = re.search(r"^cpu family\s*:\s*(\d+)", cpuinfo, re.M)
    return "AuthenticAMD" in cpuinfo and family is not None and int(family.group(1)) >= 26


def set_lanes16(on: bool) -> None:
    """The GEMV kernel's 16-lane AVX-512 path on or off (A/B benchmarks, tests); on by default on Intel CPUs
    with AVX-512 and AMD Zen 5 (`_default_lanes16`). On AMD it also lifts the kernel's row limit (MKL has no
    AVX-512 path there). K % 16 != 0 always runs 8 lanes."""
    lib = load()
    if lib is None:
        return
    info = _cpuinfo()
    if on and " avx512f" not in info:
        raise ValueError("set_lanes16(True): this CPU has no AVX-512")
    _set_lanes(lib, bool(on), info)


def _set_lanes(lib, on: bool, cpuinfo: str) -> None:
    global _lanes16, _all_rows, _amd
    _lanes16 = on
    _amd = "AuthenticAMD" in cpuinfo
    _all_rows = on and _amd
    lib.set_wide(int(on))


def lanes() -> int:
    """How wide the GEMV kernel runs on this CPU: 16 (AVX-512 path on) or 8."""
    load()
    return 16 if _lanes16 else 8
