"""Scale-out with torch.distributed: process-group set-up from torchrun's environment, sharding, and the few
collectives the training loops need, each guarded by a timeout that names the rank that did not arrive.

    torchrun --nproc_per_node 4 -m rftkit.cli sft --data train.jsonl      # the loops call init() themselves
    rank, world = init(timeout_s=600); mine = shard(batch); ...; all_reduce_grads(params, "step 3")

Outside torchrun (no WORLD_SIZE in the environment) every function here is a no-op on one process, so the
loops read the same either way. Backends: gloo on CPU; on a GPU machine "cpu:gloo,cuda:nccl", so CUDA tensors
go through NCCL and CPU tensors through gloo.

Gradients are summed with one all-reduce after a rank's local backward passes (bucketed, flat buffers) rather
than by wrapping the model in DistributedDataParallel. DDP overlaps communication with backward, but it needs
every rank to run the same number of forward/backward passes, and here they do not: examples differ in length,
and GRPO's dynamic sampling drops groups on one rank and not on another. The losses are normalised by the
global batch's token and sequence counts (rftkit.sft, rftkit.grpo_loss), so the sum over ranks is exactly the
single-process gradient. The price is no overlap: negligible for LoRA (megabytes of gradient), noticeable for
full fine-tuning of large models over slow links.

FSDP (`shard_model`, `rft sft --fsdp`): for models whose weights do not fit one device, PyTorch's FSDP2
(`fully_shard`) shards every decoder block's parameters, gradients and optimizer state across the ranks and
gathers a block's weights just for its forward and backward. Gradients are reduce-scattered as sums (the same
global-batch normalisation applies), and every rank runs the same number of forward/backward passes (shorter
shards add passes with zero weight), because each pass is a collective. Checkpoints gather the full tensors
and rank 0 writes them in the usual format, so an FSDP run resumes with or without FSDP, on any rank count.
It works on CPU (gloo) and GPU (NCCL); the tests run it on CPU.

Timeouts: before each collective every rank passes a gloo `monitored_barrier`; rank 0 waits at most
`timeout_s` for the others and fails with the ranks that did not arrive, torchrun then stops the rest. The
process group's own timeout is the same, as a backstop.
"""
from __future__ import annotations

import datetime
import os
import re

import torch
import torch.distributed as dist

_state = {"timeout": 1800.0, "check_group": None}


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun; launch with "
                         f"`torchrun --nproc_per_node N -m rftkit.cli ...`)") from None


def init(timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); returns
    (rank, world size). Without WORLD_SIZE: (0, 1) and nothing is set up. Safe to call again."""
    if timeout_s <= 0:
        raise ValueError(f"dist_timeout must be > 0 seconds, got {timeout_s}")
    _state["timeout"] = float(timeout_s)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        world, rank, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE is set but {name} is not: launch with torchrun, which sets both")
        backend = "gloo"
        if torch.cuda.is_available():
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPUs: "
                                 f"--nproc_per_node must not exceed the GPU count")
            torch.cuda.set_device(local)
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    # a gloo group of its own for the monitored barriers (they exist on gloo only) and for Python objects
    _state["check_group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _state["check_group"] = None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs, plots and the final adapter."""
    return rank() == 0


def shard(items: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous share of `items` (sizes differ by at most one; concatenating the shares in rank
    order gives `items` back)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    n = len(items)
    return items[n * r // w: n * (r + 1) // w]


def sync(what: str) -> None:
    """Wait for every rank at `what`; fail within the timeout naming the ranks that did not come."""
    if world_size() == 1:
        return
    timeout = _state["timeout"]
    try:
        dist.monitored_barrier(group=_state["check_group"], timeout=datetime.timedelta(seconds=timeout),
                               wait_all_ranks=True)
    except RuntimeError as e:
        me = rank()
        if me == 0:
            found = re.search(r"Ranks? ([\d, ]+) failed", str(e))
            who = f"rank(s) {found.group(1).strip()}" if found else "some rank"
            msg = f"{who} did not reach {what} within {timeout:g} s (hung or dead); stopping the job"
        else:
            msg = (f"rank {me} reached {what} but heard nothing from rank 0 within {timeout:g} s: rank 0 hung or "
                   f"died, or is reporting a rank that did (see its message)")
        raise RuntimeError(f"rftkit.distributed: {msg}. [{e}]") from e


def all_reduce_grads(params, what: str = "gradients", bucket_bytes: int = 64 << 20) -> None:
    """Sum .grad of `params` over all ranks in place (a missing .grad counts as zeros: a rank with no data this
    step still takes part). Flat buckets of at most bucket_bytes per dtype and device."""
    if world_size() == 1:
        return
    sync(what)
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if bucket and (p.grad.dtype != bucket[0].grad.dtype or p.grad.device != bucket[0].grad.device
                       or size >= bucket_bytes):
            _reduce_bucket(bucket)
            bucket, size = [], 0
        bucket.append(p)
        size += p.grad.numel() * p.grad.element_size()
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(params: list[torch.Tensor]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` across the ranks with FSDP2: each decoder block (`model.model.layers[i]`) is one unit, the
    root (embeddings, tied lm_head, final norm) another. Gradients are reduced as sums, not means."""
    from torch.distributed.fsdp import fully_shard
    if world_size() == 1:
        return model
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"shard_model: {type(model).__name__} has no model.layers to shard block by block")
    for block in layers:
        fully_shard(block)
    fully_shard(model)
    for unit in [*layers, model]:                      # the setting is per unit
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)   # gloo has no PREMUL_SUM
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP-sharded parameter or state (a collective: every rank must call it), or
    `t` itself when it is not sharded."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) where dst may be a sharded DTensor and src the whole tensor (every rank has it)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(dst, DTensor):
        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(src)


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An optimizer state `value` (whole, from a checkpoint) laid out like `param` (sharded or not)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value.to(param.device)


def all_reduce_floats(values: list[float], op: str = "sum", what: str = "statistics") -> list[float]:
    """Sum (or max) a few Python numbers over ranks, in float64."""
    if world_size() == 1:
        return list(values)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    sync(what)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=ops[op], group=_state["check_group"])
    return t.tolist()


def all_gather(obj, what: str = "objects") -> list:
    """Every rank's `obj` (picklable), in rank order. In-memory only: files are never pickles."""
    if world_size() == 1:
        return [obj]
    sync(what)
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj, group=_state["check_group"])
    return out
