"""Models named by Hugging Face Hub id (`--model Qwen/Qwen2.5-0.5B-Instruct`), resolved through
`huggingface_hub` to a snapshot folder in the standard cache.

    folder = resolve_hub("Qwen/Qwen2.5-0.5B-Instruct")    # .../models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/<rev>

The cache comes first: a model already in it (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub;
read when called, not when imported) loads without asking the Hub, so a laptop offline loads what it has.
Only when it is missing, and HF_HUB_OFFLINE is not set, are the config, tokenizer and safetensors files
downloaded (never pickle weights: a repo that has only `pytorch_model.bin` is refused by id). `ORG/NAME@REV`
picks a branch, tag or commit. Errors name the id and what to do.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]      # never *.bin / *.pt
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_hub_id(spec: str) -> bool:
    """ORG/NAME (optionally @REV) that is not a local path."""
    return bool(HUB_ID.match(spec)) and not spec.endswith(".gguf") and not Path(spec).expanduser().exists()


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _pickle_only(repo_id: str, files: list[str]) -> ValueError:
    pickles = sorted(f for f in files if f.endswith(PICKLES))
    return ValueError(f"model {repo_id!r}: no safetensors weights, only pickle files {pickles[:3]}; rftkit never "
                      f"loads pickles (they can run code). Use a repo that ships model.safetensors, or convert "
                      f"the weights on a trusted machine and pass the folder")


def resolve_hub(spec: str) -> Path:
    """A Hub model id -> its snapshot folder (config.json + safetensors + tokenizer files)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    repo_id, _, revision = spec.partition("@")
    revision = revision or None
    cache = hub_cache()
    folder = None
    try:                                             # the cache first: no network for a model we have
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    except Exception:                               # e.g. an incomplete snapshot: treated as absent
        folder = None
    if folder is not None and _has_weights(folder):
        return folder
    if hub_offline():
        if folder is not None and any(p.suffix in PICKLES for p in folder.iterdir()):
            raise _pickle_only(repo_id, [p.name for p in folder.iterdir()])
        raise FileNotFoundError(
            f"model {spec!r}: no such local folder, not in the Hugging Face cache {cache}, and HF_HUB_OFFLINE is "
            f"set, so it cannot be downloaded. On a connected machine run `hf download {repo_id}` (with the same "
            f"HF_HOME / HF_HUB_CACHE), unset HF_HUB_OFFLINE, or pass a local model folder")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(
            f"model {spec!r}: no such local folder, and the Hub has no model {repo_id!r} that this machine may "
            f"read ({type(e).__name__}); check the id, or log in (`hf auth login`) for a gated or private "
            f"model") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"model {spec!r}: the Hub model {repo_id!r} has no revision {revision!r}") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"model {spec!r}: no such local folder, not in the Hugging Face cache {cache}, and the Hub could not "
            f"be reached "
            f"({type(e).__name__}). Connect, or download it on a connected machine with `hf download {repo_id}` "
            f"and copy the cache, or pass a local model folder") from None
    if not _has_weights(folder):
        try:
            from huggingface_hub import HfApi
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except Exception:
            files = [p.name for p in folder.iterdir()]
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model {spec!r}: the Hub repo has no config.json: not a transformers model")
        raise _pickle_only(repo_id, files)
    return folder
