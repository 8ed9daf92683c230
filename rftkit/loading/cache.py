"""The user cache folder of rftkit, and folders built into it atomically.

    cache_dir() / "models"          # converted models; $RFTKIT_CACHE, default ~/.cache/rftkit

Several processes may convert the same model at once (two `rft` commands on first use): each builds its folder
in a temporary directory beside the final one and renames it into place; the first rename wins.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("RFTKIT_CACHE") or Path.home() / ".cache" / "rftkit")


def atomic_folder(final: Path, build) -> Path:
    """Build a folder in a temp dir next to `final`, then rename it into place (first writer wins)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        for p in [tmp, *tmp.iterdir()]:     # mkdtemp/mkstemp make 0700/0600; a cache may be shared
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        try:
            os.rename(tmp, final)
        except OSError:                      # another process finished first
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final

