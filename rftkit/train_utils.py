"""Shared training maths and plumbing for SFT, GRPO and scale-out: token log-probs, masked means, LR
schedules, seeds and RNG state, checkpoints (safetensors + JSON, never pickle), metrics logging and curves.

    save_checkpoint(run_dir / "checkpoints", step=10, model=model, optimizer=opt, state={"offset": 640})

A checkpoint holds what a run needs to continue exactly and nothing that depends on how many processes ran
it: trainable weights, optimizer state, the RNG states, and whatever the loop puts in `state` (the data
position as a global sample offset). Tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import base64
import functools
import inspect
import json
import math
import os
import random
import shutil
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from rftkit import kernels


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> log p(target) [B, T], a chunk of rows at a time so that the
    softmax's [*, V] temporaries stay small (the logits themselves are the caller's)."""
    flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = [flat[i:i + chunk].float().gather(-1, t[i:i + chunk, None]).squeeze(-1)
           - torch.logsumexp(flat[i:i + chunk].float(), dim=-1) for i in range(0, flat.shape[0], chunk)]
    return torch.cat(out).view(targets.shape)


# exp(y) for y below about -87.3 underflows to a denormal or zero, and torch's CPU exp takes a slow path there:
# 0.29 s instead of 0.025 s for [1024, 49152] log-probs spread over [-120, 0] (most of a real vocabulary sits
# that far below the top token). Flooring y at -87 first costs one in-place pass; the probabilities it changes
# are below 1.7e-38, nothing next to a row sum >= 1. (The CPU kernel floors at -86 as it goes.)
EXP_FLOOR = -87.0


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h W^T in fp32: into `out` (a workspace slice) when given, else a fresh tensor."""
    if out is not None:
        return kernels.linear_into(h.detach(), weight.detach(), out)
    return F.linear(h, weight).float()


class _Workspace:
    """A [rows, V] fp32 buffer reused from call to call for the logits of hidden_logprobs. A fresh 200 MB tensor
    per GRPO step (1,024 rows x V = 49,152) page-faults 49k times: 0.2-2 s of system time per step on a 2-core
    VM, more than the exp itself. The buffer is handed out again only once no chunk of it that a graph keeps for
    backward is alive (weak references); while one is, callers get a fresh tensor."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.kept: list = []

    def take(self, rows: int, V: int) -> torch.Tensor:
        if any(r() is not None for r in self.kept):
            return torch.empty(rows, V)
        self.kept = []
        if self.buf is None or self.buf.numel() < rows * V:
            self.buf = None                                   # free the old one before allocating
            self.buf = torch.empty(rows * V)
        return self.buf[:rows * V].view(rows, V)

    def keep(self, chunk: torch.Tensor) -> None:
        self.kept.append(weakref.ref(chunk))


_workspaces: "weakref.WeakKeyDictionary[torch.nn.Module, _Workspace]" = weakref.WeakKeyDictionary()


class _HeadLogProbs(torch.autograd.Function):
    """One chunk of rows: z = h W^T / T -> (log softmax(z)[t], entropy of softmax(z) without gradient), with
    the backward written out (d logp / dz = onehot(t) - p). On CPU in fp32 the logits go into `buf` (a
    workspace slice) and one kernel pass (kernels.softmax_rows) turns them into e = exp(z - max) in place with
    the row statistics, so a chunk makes no [c, V] allocation at all; elsewhere two [c, V] buffers (z, then p,
    in place) where autograd's logsumexp / gather / softmax graph made about ten. Only e (or p) is kept for
    backward; with `recompute` nothing of [c, V] size is kept and p is rebuilt in backward from h, W and the
    log-normaliser (one more lm_head matmul); without a gradient (a reference forward under no_grad) it is
    called with `recompute` and keeps nothing."""

    @staticmethod
    def forward(ctx, h, t, weight, inv_t: float, recompute: bool, want_entropy: bool, buf):
        z = _chunk_logits(h, weight, buf)                  # buf: only for fp32 CPU rows (hidden_logprobs)
        stats = kernels.softmax_rows(z, t, inv_t, want_entropy)
        if stats is not None:                                                        # z now holds e
            logp, lse, ent, s = stats
            ent = lse.new_zeros(lse.shape) if ent is None else ent
            p, inv_s = z, 1.0 / s
        else:
            if inv_t != 1.0:
                z.mul_(inv_t)
            zt = z.gather(1, t[:, None]).squeeze(1)
            m = z.amax(1, keepdim=True)
            z.sub_(m).clamp_(min=EXP_FLOOR)                                          # y = z - max <= 0
            p = torch.exp(z)
            s = p.sum(1, keepdim=True)
            log_s = s.log().squeeze(1)
            lse = m.squeeze(1) + log_s
            if want_entropy:                                                         # H = log s - sum(e^y y) / s
                ent = log_s - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1) / s.squeeze(1)
            else:
                ent = lse.new_zeros(lse.shape)
            logp, inv_s = zt - lse, 1.0 / s.squeeze(1)
            del z
        ctx.inv_t = inv_t
        ctx.save_for_backward(h, t, weight, lse)
        ctx.p, ctx.inv_s = (None, None) if recompute else (p, inv_s)                 # p = e * inv_s
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g, _g_entropy):
        h, t, weight, lse = ctx.saved_tensors
        g = g.float()
        if ctx.p is None:                              # recompute, or a second backward (retain_graph)
            z = _chunk_logits(h, weight)
            if ctx.inv_t != 1.0:
                z.mul_(ctx.inv_t)
            p, scale = z.sub_(lse[:, None]).clamp_(min=EXP_FLOOR).exp_(), -g
        else:
            p, ctx.p = ctx.p, None                     # consumed in place below
            scale = -g * ctx.inv_s
        dz = p.mul_(scale[:, None]).scatter_add_(1, t[:, None], g[:, None])            # g (onehot(t) - p)
        if ctx.inv_t != 1.0:
            dz.mul_(ctx.inv_t)
        dz = dz.to(h.dtype)
        gh = kernels.matmul_nn(dz, weight) if ctx.needs_input_grad[0] else None
        gw = dz.t().matmul(h) if ctx.needs_input_grad[2] else None
        return gh, None, gw, None, None, None, None


RECOMPUTE_BYTES = 1 << 30     # keep the logits for backward up to 1 GiB, recompute them above


def hidden_logprobs(h: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, chunk: int = 1024,
                    temperature: float = 1.0, recompute: bool | None = None, with_entropy: bool = False):
    """Final hidden states h [..., D] and targets [...] -> log p(target) [...], computing the [*, V] logits
    one chunk of rows at a time (`_HeadLogProbs`), on CPU into a workspace kept with `lm_head` between calls.
    With `recompute` each chunk's probabilities are rebuilt in backward instead of kept, so [N, V] never
    exists (N = all rows; at V = 49152 that is the largest tensor of a step); by default only when keeping
    them would take more than RECOMPUTE_BYTES (one more lm_head matmul).
    with_entropy: return (log-probs, entropies [...]) — the entropy of each row's distribution at
    `temperature`, from the same logits, without gradient (GRPO logs it)."""
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    weight = lm_head.weight
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("hidden_logprobs supports an lm_head without bias")
    grad = torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad)
    N, V = flat_h.shape[0], weight.shape[0]
    if recompute is None:
        recompute = N * V * 4 > RECOMPUTE_BYTES
    keep = grad and not recompute
    buf = None
    if flat_h.device.type == "cpu" and flat_h.dtype == torch.float32 and weight.dtype == torch.float32 and N:
        ws = _workspaces.setdefault(lm_head, _Workspace())
        buf = ws.take(N if keep else min(chunk, N), V)           # kept chunks each need their rows
    out = []
    for i in range(0, N, chunk):
        part = None
        if buf is not None:
            part = buf[i:i + chunk] if keep else buf[:min(chunk, N - i)]
            if keep:
                ws.keep(part)
        out.append(_HeadLogProbs.apply(flat_h[i:i + chunk], flat_t[i:i + chunk], weight, 1.0 / temperature,
                                       not keep, with_entropy, part))
    logp = torch.cat([o[0] for o in out]).view(targets.shape) if out else flat_h.new_zeros(targets.shape)
    if not with_entropy:
        return logp
    return logp, (torch.cat([o[1] for o in out]).view(targets.shape) if out else flat_h.new_zeros(targets.shape))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def lr_at(step: int, base_lr: float, warmup: int, total: int | None = None, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio·base over `total` steps
    (constant after warm-up when total is None, e.g. for a wall-clock budget)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if not total or total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


_malloc_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the OS (once per process;
    True when it took). A training step frees and reallocates the same activations every step; by default glibc
    serves blocks above a moving threshold with fresh mmaps and trims its heap, so a step re-faults hundreds of
    MB page by page. Measured on a 2-core VM (GRPO update, SmolLM2-135M, 1,024 completion tokens): forward
    2.2-4.6 s with 16k-263k page faults per step, and 2.0-2.1 s with none once blocks up to 32 MB come from the
    heap and up to 1 GB of free heap is kept. The cost: the process's resident memory does not shrink back."""
    global _malloc_kept
    if _malloc_kept is None:
        _malloc_kept = False
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
            _malloc_kept = (libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
                            and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1)
        except (OSError, AttributeError):        # not glibc (musl, macOS, Windows): nothing to tune
            pass
    return _malloc_kept


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
    from rftkit.distributed import full_tensor
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
    from rftkit.distributed import full_tensor
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
    from rftkit.distributed import copy_into, like
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


class StopRequest:
    """SIGTERM (a preempted job) asks a training loop to stop after the step it is in: the loop checks
    `requested`, saves a checkpoint and its command exits with status 143 (128 + SIGTERM), ready for --resume.

        with StopRequest() as stop:
            while step < steps and not stop.requested: ...
    """
    EXIT_STATUS = 143

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():        # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            import signal
            signal.signal(signal.SIGTERM, self._previous)


def require_tensorboard() -> None:
    """Fail before a run starts, naming the install, when TensorBoard logging is asked for without the package."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


class MetricsLog:
    """One JSON object per line in `path`, appended (a resumed run continues the same file); numeric fields
    also go to TensorBoard when `tensorboard` is set (the package is then required)."""

    def __init__(self, path: Path, tensorboard: bool = False, step_key: str = "step"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step_key = step_key
        self.tb = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != self.step_key:
                    self.tb.add_scalar(k, v, row.get(self.step_key, 0))
            self.tb.flush()

    def read(self) -> list[dict]:
        """The rows; a torn last line (a kill during its write) is left out, a bad line elsewhere raises."""
        if not self.path.is_file():
            return []
        lines = [l for l in self.path.read_text().splitlines() if l.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path}: line {i + 1} is not JSON: {line[:80]!r}") from None
        return rows

    def rewind(self, step: int) -> None:
        """Keep only the rows up to `step` (a resumed run's checkpoint; 0 for a fresh run), so rows logged after
        that checkpoint are not written twice; replaced atomically."""
        rows = [r for r in self.read() if r.get(self.step_key, 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)


def drawing(plot):
    """Mark a plot function: a plot is a picture of results already written, so a failure to draw it (no
    matplotlib backend, a full disk, odd data) is a warning and returns None, never an error that would end a
    finished run."""
    signature = inspect.signature(plot)

    @functools.wraps(plot)
    def draw(*args, **kwargs):
        try:
            return plot(*args, **kwargs)
        except Exception as e:
            path = signature.bind(*args, **kwargs).arguments.get("path", "a plot")
            warnings.warn(f"could not draw {path}: {type(e).__name__}: {e} (the run's results are saved)")
            return None
    return draw


@drawing
def plot_curves(rows: list[dict], x: str, ys: list[str], path: Path, title: str = "",
                hlines: dict[str, float] | None = None) -> Path | None:
    """Curves of `ys` against `x` from metric rows, plus labelled horizontal reference lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for y in ys:
        pts = [(r[x], r[y]) for r in rows if y in r and x in r]
        if pts:
            ax.plot(*zip(*pts), label=y, marker="." if len(pts) < 40 else None)
    for i, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(value, color=f"C{i + len(ys)}", linestyle="--", label=label)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
