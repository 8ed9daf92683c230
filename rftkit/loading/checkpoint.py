"""Training checkpoints: what a run needs to continue exactly (safetensors + JSON, never pickle), and the seeds
and RNG states they carry.

    save_checkpoint(run_dir / "checkpoints", step=10, model=model, optimizer=opt, state={"offset": 640})
    state = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"), model, opt); set_rng_state(state["rng"])

A checkpoint holds nothing that depends on how many processes ran it: trainable weights, optimizer state, the
RNG states, and whatever the loop puts in `state` (the data position as a global sample offset). Tensors go to
safetensors, everything else to JSON.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import torch

from rftkit.distributed import copy_into, full_tensor, like


def set_seed(seed: int) -> None:
    """Seed python, numpy (when installed) and torch (CPU and every GPU)."""
    random.seed(seed)
    torch.manual_seed(seed)          # also seeds all CUDA devices
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def get_rng_state() -> dict:
    """Every RNG a training loop draws from, as plain JSON data (no pickle)."""
    version, mt, gauss = random.getstate()
    state = {"python": [version, list(mt), gauss], "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters as whole CPU tensors (FSDP-sharded ones gathered: then every rank must call it)."""
    return {n: full_tensor(p.detach()).cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2, rng: dict | None = None, write: bool = True) -> Path:
    """folder/step-N/{weights,optimizer}.safetensors + state.json; the last `keep` checkpoints are kept. `rng`
    defaults to the RNG states now (`get_rng_state()`). With an FSDP-sharded model every rank calls it (the
    tensors are gathered) and only the one with write=True writes.

    Durable against a kill or a power cut at any moment: the files go to a temporary folder, are fsync'ed with
    it, and only then renamed into place (the parent fsync'ed after); a step saved again keeps its old folder
    until the new one is in place; temporary folders left by a killed save are removed here."""
    from safetensors.torch import save_file
    folder = Path(folder)
    weights = trainable_state(model)
    opt_tensors, opt_scalars = {}, {}
    by_param = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                key = f"{by_param[id(p)]}::{k}"
                if torch.is_tensor(v):
                    opt_tensors[key] = full_tensor(v.detach()).cpu().contiguous()
                else:
                    opt_scalars[key] = v
    final = folder / f"step-{step:07d}"
    if not write:
        return final
    folder.mkdir(parents=True, exist_ok=True)
    recover_checkpoints(folder)
    tmp = folder / f".tmp-step-{step:07d}-{os.getpid()}"
    tmp.mkdir()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    save_file(weights, str(tmp / "weights.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "trainable": names, "optimizer_scalars": opt_scalars,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
            "state": state, "rng": rng if rng is not None else get_rng_state(), "time": time.time()}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for f in ("weights.safetensors", "optimizer.safetensors", "state.json", "."):
        _fsync(tmp / f)
    old = folder / f".old-step-{step:07d}-{os.getpid()}"
    if final.exists():                  # the step saved again: move the old copy aside, never delete it first
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(folder)
    shutil.rmtree(old, ignore_errors=True)
    for stale in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def recover_checkpoints(folder: Path) -> None:
    """Undo what a save killed half-way left: an old copy moved aside for a re-save whose new copy never
    arrived goes back into place; temporary folders are removed."""
    folder = Path(folder)
    for old in folder.glob(".old-step-*"):
        final = folder / old.name[len(".old-"):].rsplit("-", 1)[0]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for tmp in folder.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder` (those with their state.json), oldest first."""
    return sorted(p for p in Path(folder).glob("step-*") if (p / "state.json").is_file())


def read_checkpoint(path: Path) -> dict:
    """Every file of a checkpoint read and parsed (nothing applied): {"meta", "weights", "optimizer"}. Raises
    on a torn or corrupt file."""
    from safetensors.torch import load_file
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    for key in ("step", "trainable", "optimizer_scalars", "param_groups", "state"):
        if key not in meta:
            raise ValueError(f"{path / 'state.json'} has no {key!r}")
    return {"meta": meta, "weights": load_file(str(path / "weights.safetensors")),
            "optimizer": load_file(str(path / "optimizer.safetensors"))}


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    read: dict | None = None) -> dict:
    """Restore trainable weights and optimizer state; returns the saved `state` dict plus "step" and "rng"
    (restore it with `set_rng_state` where the loop draws random numbers). Names and shapes are checked
    before anything is changed."""
    path = Path(path)
    ck = read if read is not None else read_checkpoint(path)
    meta, weights, opt_tensors = ck["meta"], ck["weights"], ck["optimizer"]
    params = dict(model.named_parameters())
    missing = [n for n in meta["trainable"] if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint parameters {missing[:3]} are not in the model")
    for n, t in weights.items():
        if n not in params or params[n].shape != t.shape:
            raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, the model "
                             f"{tuple(params[n].shape) if n in params else 'has no such parameter'}")
    with torch.no_grad():
        for n, t in weights.items():
            copy_into(params[n], t)
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group.update(saved)
    by_param = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = by_param[id(p)]
            st = {}
            for key, v in opt_tensors.items():
                if key.startswith(name + "::"):
                    st[key.split("::", 1)[1]] = like(p, v)
            for key, v in meta["optimizer_scalars"].items():
                if key.startswith(name + "::"):
                    st[key.split("::", 1)[1]] = v
            if st:
                optimizer.state[p] = st
    return {**meta["state"], "step": meta["step"], "rng": meta.get("rng")}


def newest_readable_checkpoint(folder: Path) -> tuple[Path | None, dict | None]:
    """(path, read_checkpoint(path)) of the newest checkpoint whose files all read, falling back to older ones
    (that is what keeping two is for) with a warning naming the one skipped; (None, None) when there is none."""
    if Path(folder).is_dir():
        recover_checkpoints(folder)
    for path in reversed(checkpoints(folder)):
        try:
            return path, read_checkpoint(path)
        except Exception as e:
            warnings.warn(f"checkpoint {path} does not load ({type(e).__name__}: {e}); trying the one before")
    return None, None
