"""Supervised fine-tuning on the user's rows, as one flat loop.

    rft sft --data train.jsonl --output runs/sft --epochs 3
    run_sft(SFTConfig(data="train.jsonl"))                      # -> runs/sft/adapter (PEFT format)

Each row (JSONL/JSON/CSV/Parquet or a dataset folder, read by rftkit.data) is a chat, `{"messages": [...]}`, or
`{"prompt": ..., "completion": ...}` (strings become a user and an assistant message; lists of messages are
taken as they are); `--columns` renames other column names. The model's chat template renders the
chat; the loss is on the assistant tokens only. Each assistant turn is tokenized after the prompt it answers
was tokenized exactly as `rft generate` tokenizes it, so training sees the token ids inference will see.

The loss is the mean negative log-likelihood over the completion tokens of the whole global batch (not a
mean of micro-batch means), so micro-batching and, in scale-out, the number of ranks do not change the
gradient: `batch_backward(model, examples, micro_batch, n_tokens)` is that computation, callable with the
global token count. Under torchrun each process takes its share of every global batch (rftkit.distributed),
gradients are summed across processes, and only rank 0 writes. Checkpoints hold the adapter (or all weights),
the optimizer, the RNG states and the data position as a global sample offset, so `--resume` continues a
killed run exactly, and a run resumed with another number of processes continues from the same sample.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rftkit import distributed as dist
from rftkit.data import read_rows
from rftkit.loading.checkpoint import (load_checkpoint, newest_readable_checkpoint, save_checkpoint, set_rng_state,
                                      set_seed)
from rftkit.lora import LoRAConfig, apply_lora, lora_modules, save_lora
from rftkit.logprobs import hidden_logprobs
from rftkit.lr_schedule import lr_at
from rftkit.memory import keep_freed_memory
from rftkit.metrics import MetricsLog, plot_curves
from rftkit.precision import adapter_to_fp32, check_base_bits, prepare_base, resolve_device, resolve_dtype
from rftkit.preemption import StopRequest
from rftkit.run_folder import prepare_output
from rftkit.run_summary import write_summary
from rftkit.tracking import check_report_to
from rftkit.train_eval import BestAdapter, eval_row

EMBEDDED = "smollm2-135m-instruct"


@dataclass
class SFTConfig:
    data: str = ""                       # training rows: .jsonl/.json/.csv/.parquet or a dataset folder, with
                                         # `messages` or `prompt` + `completion` (docs/data.md)
    model: str | None = None             # model folder / .gguf / None = embedded smollm2-135m-instruct
    output: str = "sft-run"              # run folder: metrics, checkpoints, adapter, loss curve
    eval_data: str | None = None         # held-out rows (default: none, or eval_fraction of data)
    eval_fraction: float = 0.0           # share of data held out when eval_data is not given (0 = none)
    columns: list[str] = field(default_factory=list)  # column renames NAME=COLUMN, e.g. prompt=question,completion=a
    init_adapter: str | None = None      # start from this PEFT adapter (RFT -> SFT, SFT -> SFT); its rank, alpha
                                         # and targets must equal --lora-r, --lora-alpha, --lora-targets
    eval_every: int = 50                 # steps between held-out evaluations (0 = only at the end); the adapter
                                         # with the lowest eval_loss (or best eval_task accuracy) is kept as
                                         # output/adapter-best
    eval_task: str = ""                  # also evaluate greedily on this task's validation split (arithmetic,
                                         # jsonl:FILE, ...) and keep the best adapter by its accuracy
    eval_n: int = 200                    # eval_task problems per evaluation (at most the split's size)
    eval_max_tokens: int = 32            # new tokens per eval_task completion
    epochs: float = 1.0                  # passes over the training data (when steps = 0)
    steps: int = 0                       # optimizer steps (0 = from epochs)
    time_budget: float = 0.0             # training seconds at most (0 = no limit): the run ends at the budget
                                         # or at steps / epochs, whichever comes first (lr schedule: steps)
    batch_size: int = 8                  # examples per optimizer step (the global batch)
    micro_batch: int = 8                 # examples per forward/backward (memory only: same gradients)
    max_length: int = 1024               # tokens per example, prompt + completion
    overlong: Literal["truncate", "drop"] = "truncate"   # what to do with longer examples
    lr: float = 2e-4                     # peak learning rate (AdamW)
    warmup_steps: int = 10               # linear warm-up
    min_lr_ratio: float = 0.1            # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0            # AdamW weight decay
    grad_clip: float = 1.0               # max gradient norm (0 = off)
    full: bool = False                   # fine-tune all weights instead of a LoRA adapter
    lora_r: int = 16                     # LoRA rank
    lora_alpha: float = 32.0             # LoRA alpha
    lora_dropout: float = 0.0            # dropout on the adapter input
    rslora: bool = False                 # scale by alpha / sqrt(r)
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])  # LoRA target modules
    seed: int = 0                        # data order, held-out split, LoRA init
    checkpoint_every: int = 100          # steps between checkpoints
    keep_checkpoints: int = 2            # checkpoints kept
    resume: bool = False                 # continue from the latest checkpoint in output
    overwrite: bool = False              # replace the run already in output (its metrics, checkpoints, adapter)
    device: str = "auto"                 # cpu, cuda, cuda:N, or auto (CUDA is untested: docs/benchmarks.md)
    dtype: Literal["fp32", "bf16"] = "fp32"   # the base weights' dtype; the adapter stays fp32 (bf16: half the
                                         # memory, for GPUs; far slower than fp32 on CPUs)
    base_bits: int = 0                   # 4 = QLoRA: the frozen base linears in int4 (groups of 32), LoRA on top
                                         # (8 = int8); 0 = the base as loaded
    grad_checkpointing: bool = False     # recompute each block in backward instead of keeping its activations
    report_to: list[str] = field(default_factory=list)   # also log to tensorboard, trackio, wandb, mlflow (none
                                         # by default; metrics.jsonl is the record): docs/tracking.md
    tensorboard: bool = False            # the same as --report-to tensorboard
    dist_timeout: float = 1800.0         # under torchrun: seconds a process waits for the others before failing
    fsdp: bool = False                   # under torchrun: shard weights, gradients and optimizer state (FSDP2)

    def __post_init__(self):
        for name in ("batch_size", "micro_batch", "max_length", "lora_r", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.epochs <= 0 and self.steps == 0:
            raise ValueError(f"set steps > 0 or epochs > 0 (got steps={self.steps}, epochs={self.epochs})")
        if self.time_budget < 0:
            raise ValueError(f"time_budget must be >= 0 seconds, got {self.time_budget}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be truncate or drop, got {self.overlong!r}")
        if self.eval_n < 1 or self.eval_max_tokens < 1:
            raise ValueError(f"eval_n and eval_max_tokens must be >= 1, got {self.eval_n}, {self.eval_max_tokens}")
        if self.tensorboard and "tensorboard" not in self.report_to:
            self.report_to = [*self.report_to, "tensorboard"]
        resolve_dtype(self.dtype)
        check_base_bits(self.base_bits, self.dtype)
        if self.base_bits and self.full:
            raise ValueError(f"base_bits {self.base_bits} freezes a quantized base under a LoRA adapter; it does not "
                             f"apply with --full")
        self.report_to = check_report_to(self.report_to)    # a missing package fails now, not after training


# ----------------------------------------------------------------------------------------------------------
# data: JSONL -> (token ids, completion mask)

Example = tuple[list[int], list[int]]      # ids [T], mask [T]: 1 where the token is a completion token


def _messages(row: dict, where: str) -> list[dict]:
    if "messages" in row:
        msgs = row["messages"]
    elif "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        msgs = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + (
            [{"role": "assistant", "content": c}] if isinstance(c, str) else c)
    else:
        raise ValueError(f"{where}: expected 'messages' or 'prompt' and 'completion', got keys "
                         f"{sorted(k for k in row if not k.startswith('_'))} (rename yours with --columns "
                         f"prompt=COLUMN,completion=COLUMN)")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise ValueError(f"{where}: messages must be a list of {{'role', 'content'}} objects")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{where}: no assistant message to learn from")
    return msgs


def encode_example(tok, row: dict, where: str = "example") -> Example:
    """Token ids of the rendered chat and the mask of the assistant tokens (each turn incl. its end token)."""
    if tok.chat_template is None:                # plain text: prompt, completion, eos
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise ValueError(f"{where}: the tokenizer has no chat template: give 'prompt' and 'completion' "
                             f"strings")
        p, c = tok.encode(row["prompt"]), tok.encode(row["completion"]) + tok.eos_token_ids[:1]
        return p + c, [0] * len(p) + [1] * len(c)
    msgs = _messages(row, where)
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(msgs[:i], add_generation_prompt=True)
        full = tok.apply_chat_template(msgs[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"{where}: the chat template does not render turn {i} as a continuation of the "
                             f"turns before it; cannot tell the assistant tokens apart")
        p, c = tok.encode(prompt[len(done):]), tok.encode(full[len(prompt):])
        ids += p + c
        mask += [0] * len(p) + [1] * len(c)
        done = full
    return ids, mask


def encode_dataset(tok, rows: list[dict], path: str, max_length: int, overlong: str) -> tuple[list[Example], dict]:
    """Encode rows; longer examples are cut to max_length or dropped. Returns the examples and counts."""
    out, counts = [], {"examples": len(rows), "truncated": 0, "dropped": 0}
    for row in rows:
        ids, mask = encode_example(tok, row, row.get("_where") or f"{path}:{row['_line']}")
        cut = len(ids) > max_length
        if cut and overlong == "truncate":
            ids, mask = ids[:max_length], mask[:max_length]
        if (cut and overlong == "drop") or sum(mask[1:]) == 0:    # nothing to learn if the prompt fills it
            counts["dropped"] += 1
            continue
        counts["truncated"] += cut
        out.append((ids, mask))
    counts["kept"] = len(out)
    return out, counts


def _seed(*parts) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def sample_order(n: int, seed: int, offset: int, count: int) -> list[int]:
    """Indices of global samples offset .. offset+count-1: epoch e is a permutation seeded by (seed, e). A
    data position is this global offset, whatever the number of processes."""
    out, perms = [], {}
    for k in range(offset, offset + count):
        e = k // n
        if e not in perms:
            perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, "epoch", e))).tolist()
        out.append(perms[e][k % n])
    return out


# ----------------------------------------------------------------------------------------------------------
# the loss: completion tokens of a micro-batch, normalised by the global batch's count

def _packed(examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The examples back to back in one row (no padding): ids [1, N], next-token target mask [N], lengths."""
    lens = [len(x) for x, _ in examples]
    ids = torch.tensor([t for x, _ in examples for t in x], dtype=torch.long)
    # position i predicts token i+1 of the same example: the target is the next token's completion bit,
    # and the last position of each example predicts nothing
    target = torch.tensor([b for _, m in examples for b in list(m[1:]) + [0]], dtype=torch.bool)
    return ids[None].to(device), target.to(device), lens


def completion_nll(model, examples: list[Example]) -> tuple[torch.Tensor, int, dict]:
    """Summed -log p of the completion tokens of `examples` (one forward over them packed into one row, so no
    compute goes to padding), their count, and the model's auxiliary losses. Only the completion positions go
    through lm_head."""
    ids, target, lens = _packed(examples, model.device)                            # [1, N], [N]
    h, aux = model(ids, return_hidden=True, seq_lens=lens)                          # [1, N, D]
    nxt = torch.cat([ids[0, 1:], ids.new_zeros(1)])                                # token i+1 at position i
    logp = hidden_logprobs(h[0][target], nxt[target], model.lm_head)               # [n]
    return -logp.sum(), int(target.sum()), aux


def _passes(n: int, micro_batch: int, world: int) -> int:
    """Forward/backward passes of the rank with the largest share of n examples (FSDP: all ranks run these)."""
    return max(-(-len(dist.shard(list(range(n)), r, world)) // micro_batch) for r in range(world))


def batch_backward(model, examples: list[Example], micro_batch: int, n_tokens: int | None = None,
                   n_examples: int | None = None, passes: int = 0) -> dict:
    """Accumulate into .grad the gradient of  sum(-log p over completion tokens) / n_tokens  over `examples`,
    micro_batch examples per forward. n_tokens / n_examples default to this batch's; scale-out passes the
    global batch's so that ranks' gradients sum to the single-process one. Each micro-batch is packed into
    one row (no padding), its examples grouped by length. `passes`: at least this many forward/backward
    passes, the extra ones with zero weight (under FSDP every pass is a collective, so all ranks run the
    same number)."""
    n_tokens = n_tokens or sum(sum(m[1:]) for _, m in examples)
    n_examples = n_examples or len(examples)
    ordered = sorted(examples, key=lambda e: len(e[0]))
    starts = list(range(0, len(ordered), micro_batch))
    nll_sum, seen = 0.0, 0
    for j in range(max(len(starts), passes)):
        real = j < len(starts)
        mb = ordered[starts[j]:starts[j] + micro_batch] if real else ordered[:1]
        nll, _, aux = completion_nll(model, mb)
        loss = nll / n_tokens
        for value in aux.values():       # MoE balancing losses, weighted by this share of the batch
            loss = loss + value * len(mb) / n_examples
        (loss if real else loss * 0.0).backward()
        if real:
            nll_sum += float(nll.detach())
            seen += sum(len(x) for x, _ in mb)
    return {"nll_sum": nll_sum, "n_tokens": n_tokens, "seen_tokens": seen}


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], micro_batch: int, fsdp: bool = False) -> float:
    """Token-mean held-out loss over the completion tokens of `examples` (shared out across processes)."""
    ordered = sorted(dist.shard(examples), key=lambda e: len(e[0]))
    starts = list(range(0, len(ordered), micro_batch))
    passes = _passes(len(examples), micro_batch, dist.world_size()) if fsdp else 0
    total, n = 0.0, 0
    for j in range(max(len(starts), passes)):
        if j >= len(starts):                          # FSDP: a pass the other ranks need; nothing counted
            completion_nll(model, examples[:1])
            continue
        nll, k, _ = completion_nll(model, ordered[starts[j]:starts[j] + micro_batch])
        total, n = total + float(nll), n + k
    total, n = dist.all_reduce_floats([total, n], what="held-out loss")
    return total / max(n, 1)


# ----------------------------------------------------------------------------------------------------------
# the loop

def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    n_eval = round(len(examples) * fraction)
    if fraction > 0 and n_eval == 0 and len(examples) >= 2:
        n_eval = 1
    if n_eval >= len(examples):
        raise ValueError(f"eval_fraction {fraction} leaves no training examples out of {len(examples)}")
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(_seed(seed, "split"))).tolist()
    return [examples[i] for i in perm[n_eval:]], [examples[i] for i in perm[:n_eval]]


def train(cfg: SFTConfig, model=None, tok=None, progress: bool = True, on_step=None) -> dict:
    """Run SFT; returns {"steps", "seconds", "output" (adapter or model folder), "data", "eval_loss"}.
    `on_step(step, row)` is called after each step (and its checkpoint)."""
    from rftkit.loading import load, resolve
    if not cfg.data:
        raise ValueError("--data is required: a JSONL file of chats or prompt/completion pairs")
    rank, world = dist.init(cfg.dist_timeout)          # (0, 1) outside torchrun
    main = rank == 0                                    # only rank 0 writes
    keep_freed_memory()                                 # no page faults re-allocating each step's activations
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {world} processes: each needs at least "
                         f"one example per step")
    device = resolve_device(cfg.device, dist.local_rank() if world > 1 else None)
    rows = read_rows(cfg.data, cfg.columns)                 # a bad file fails before the model loads
    out = prepare_output(Path(cfg.output), cfg.resume, cfg.overwrite, "rft sft")
    eval_task = None
    if cfg.eval_task:
        from rftkit.tasks import get_task
        eval_task = get_task(cfg.eval_task)
    loaded_here = model is None
    if loaded_here:
        model, tok = load(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype))
    prepare_base(model, cfg.base_bits, cfg.grad_checkpointing)

    examples, counts = encode_dataset(tok, rows, cfg.data, cfg.max_length, cfg.overlong)
    if cfg.eval_data:
        if cfg.eval_fraction:
            raise ValueError(f"give --eval-data or --eval-fraction, not both (got {cfg.eval_data} and "
                             f"{cfg.eval_fraction})")
        train_set = examples
        eval_set, eval_counts = encode_dataset(tok, read_rows(cfg.eval_data, cfg.columns, "validation"),
                                               cfg.eval_data, cfg.max_length, cfg.overlong)
        counts["eval"] = eval_counts
        held = f"all of {cfg.eval_data}"
    else:
        train_set, eval_set = _split(examples, cfg.eval_fraction, cfg.seed)
        held = (f"--eval-fraction {cfg.eval_fraction} of {cfg.data}, seed {cfg.seed}" if cfg.eval_fraction else
                "none: give --eval-data FILE or --eval-fraction F for a held-out loss")
    if not train_set:
        raise ValueError(f"{cfg.data}: no training examples left ({counts})")
    counts.update(train=len(train_set), held_out=len(eval_set))
    total_steps = cfg.steps or math.ceil(cfg.epochs * len(train_set) / cfg.batch_size)
    if main:
        print(f"rft sft: {counts['examples']} examples, {counts['truncated']} truncated to {cfg.max_length} tokens, "
              f"{counts['dropped']} dropped; {len(train_set)} train / {len(eval_set)} held out ({held}); "
              f"{total_steps} steps")

    set_seed(cfg.seed)
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
    elif not lora_modules(model):
        apply_lora(model, LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                     rslora=cfg.rslora, targets=cfg.lora_targets))
        adapter_to_fp32(model)
    if cfg.init_adapter:
        from rftkit.warm_start import init_from_adapter
        if cfg.full:
            raise ValueError("--init-adapter starts a LoRA run from an adapter; it does not apply with --full")
        about = init_from_adapter(model, cfg.init_adapter, LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha,
                                                                      rslora=cfg.rslora, targets=cfg.lora_targets))
        if main:
            print(f"rft sft: {about}")
    fsdp = cfg.fsdp and world > 1
    if fsdp:
        dist.shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    log = MetricsLog(out / "metrics.jsonl", report_to=cfg.report_to if main else [], config=asdict(cfg),
                     resume=cfg.resume)
    best = None             # the adapter with the best held-out score (LoRA on one process, or DDP: rank 0 saves)
    if main and not cfg.full and not fsdp and (eval_set or eval_task):
        best = BestAdapter(out / "adapter-best", cfg.model or EMBEDDED, *(("eval/accuracy", True) if eval_task
                                                                          else ("eval_loss", False)))
    start, elapsed, tokens_seen = 0, 0.0, 0
    ckpt, read = newest_readable_checkpoint(out / "checkpoints") if cfg.resume else (None, None)
    found = dist.all_gather(str(ckpt), "resume")
    if len(set(found)) > 1:
        raise ValueError(f"processes see different latest checkpoints {found}: --output must be a folder all of "
                         f"them share")
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, read)
        set_rng_state(state["rng"])
        start, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens"]
        if state["offset"] != start * cfg.batch_size:
            raise ValueError(f"{ckpt}: data offset {state['offset']} is not step {start} x batch_size "
                             f"{cfg.batch_size}; resume with the batch size the run was started with")
        if main:
            log.rewind(start)           # rows logged after the checkpoint would otherwise appear twice
            print(f"rft sft: resumed from {ckpt} (step {start})")
    elif main:
        log.rewind(-1)
        log.write({"step": 0, "data": counts})
    if main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    if world > 1:               # different dropout masks on each process (the data differs already)
        torch.manual_seed(_seed(cfg.seed, "rank", rank, start))

    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start, desc="rft sft", unit="step", dynamic_ncols=True)
    eval_loss = None
    done = start
    stopping = False
    with StopRequest() as stop:         # SIGTERM: finish the step, checkpoint, exit 143
        for step in range(start, total_steps):
            if cfg.time_budget > 0 and elapsed >= cfg.time_budget:
                break
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = sample_order(len(train_set), cfg.seed, step * cfg.batch_size, cfg.batch_size)
            batch = [train_set[i] for i in order]
            model.train()
            optimizer.zero_grad(set_to_none=True)
            n_tokens = sum(sum(m[1:]) for _, m in batch)      # the global batch's: ranks' gradients sum to it
            passes = _passes(len(batch), cfg.micro_batch, world) if fsdp else 0
            if fsdp:
                dist.sync(f"step {step + 1}")
            st = batch_backward(model, dist.shard(batch), cfg.micro_batch, n_tokens, len(batch), passes)
            if not fsdp:                                    # FSDP reduce-scatters the gradients in backward
                dist.all_reduce_grads(params, f"step {step + 1}")
            nll_sum, seen = dist.all_reduce_floats([st["nll_sum"], st["seen_tokens"]])
            st.update(nll_sum=nll_sum, seen_tokens=int(seen))
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(dist.full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
            optimizer.step()
            model.eval()
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            elapsed += dt
            tokens_seen += st["seen_tokens"]
            row = {"step": step + 1, "loss": st["nll_sum"] / st["n_tokens"], "lr": lr, "grad_norm": grad_norm,
                   "completion_tokens": st["n_tokens"], "tokens": st["seen_tokens"],
                   "tok_per_s": round(st["seen_tokens"] / dt, 1), "step_s": round(dt, 3), "time": round(elapsed, 2),
                   "epoch": round((step + 1) * cfg.batch_size / len(train_set), 3)}
            done = step + 1
            last = step + 1 == total_steps or 0 < cfg.time_budget <= elapsed
            erow = None
            if (eval_set or eval_task) and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                if eval_set:
                    eval_loss = row["eval_loss"] = evaluate_loss(model, eval_set, cfg.micro_batch, fsdp)
                if eval_task is not None and main:
                    erow = eval_row(model, tok, eval_task, step + 1, elapsed, cfg.eval_n, cfg.eval_max_tokens,
                                    seed=cfg.seed)
            if main:
                log.write(row)
                if erow is not None:
                    log.write(erow)
                if best is not None and (erow is not None or "eval_loss" in row):
                    best.offer(model, step + 1, erow["eval/accuracy"] if erow is not None else row["eval_loss"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tok_per_s']:.0f}")
            stopping = dist.all_reduce_floats([float(stop.requested)], "max", "a stop request")[0] > 0
            if (main or fsdp) and ((step + 1) % cfg.checkpoint_every == 0 or last or stopping):   # FSDP: all gather
                save_checkpoint(out / "checkpoints", step + 1, model, optimizer,
                                {"offset": (step + 1) * cfg.batch_size, "elapsed": elapsed, "tokens": tokens_seen},
                                keep=cfg.keep_checkpoints, write=main)
            if on_step is not None:
                on_step(step + 1, row)
            if stopping:
                break
    if bar is not None:
        bar.close()

    log.close()
    if stopping:                    # preempted: the checkpoint is the result; --resume continues it
        if main:
            print(f"\nrft sft: stopped by SIGTERM after step {done}; checkpoint saved in {out / 'checkpoints'} "
                  f"(continue with --resume)", file=sys.stderr)
        return {"steps": done, "seconds": elapsed, "output": None, "data": counts, "eval_loss": eval_loss,
                "tokens": tokens_seen, "stopped": "SIGTERM"}
    final = out / ("model" if cfg.full else "adapter")
    if (main or fsdp) and cfg.full:
        from rftkit.loading.weights import save_model_folder
        tok_dir = resolve(cfg.model) if loaded_here or cfg.model else None     # its tokenizer files
        save_model_folder(model, final, tokenizer_dir=tok_dir, write=main)
    elif main or fsdp:
        save_lora(model, final, base=cfg.model or EMBEDDED, write=main)
    rows = log.read() if main else []
    rows_logged = [r for r in rows if "loss" in r]
    kept = best.info() if best is not None else None
    if rows_logged:
        plot_curves(rows_logged, "step", ["loss", "eval_loss"], out / "loss.png", title="SFT loss")
        write_summary(out, f"rft sft on {cfg.data}", rows, kept, final=final.name + "/")
    return {"steps": done, "seconds": elapsed, "output": str(final), "data": counts, "eval_loss": eval_loss,
            "tokens": tokens_seen, "best": kept, "best_adapter": str(out / "adapter-best") if kept else None}


def run_sft(cfg: SFTConfig) -> Path | int:
    result = train(cfg)
    main = dist.is_main()
    dist.close()
    if result.get("stopped"):
        return StopRequest.EXIT_STATUS
    if main:
        print(f"rft sft: {result['steps']} steps in {result['seconds']:.0f} s "
              f"({result['tokens'] / max(result['seconds'], 1e-9):.0f} tokens/s); saved to {result['output']}")
        if result["best"]:
            b = result["best"]
            print(f"rft sft: best held-out: step {b['step']} ({b['metric']} {b['value']:.4g}), saved to "
                  f"{result['best_adapter']}")
    return Path(result["output"])
