"""Pretraining from scratch: a small dense model and a small MoE model with the same active parameters, on the
same tokens of a local corpus, as one flat loop.

    rft pretrain --output runs/pre --tokens 2000000 --seed 0       # dense, then MoE; runs/pre/loss.png
    run_pretrain(PretrainConfig(arch="moe", tokens=500_000))

Corpus (no download): the Python reference text shipped with CPython (`pydoc_data.topics`, ~465 KB) plus
generated text of a few kinds (additions and products, templated English sentences, small Python functions
with their printed results, sorted lists, key-value records), read as bytes: the tokenizer is byte-level
(vocabulary 256), which keeps the embedding small enough for a ~1M-parameter model. The held-out set is every
10th pydoc topic plus generated text from another seed, so it shares no document with training. The corpus
does not depend on the run's seed; the seed sets the initialisation and the batch order, and the dense and MoE
models of one seed see exactly the same batches.

Sizes: the MoE model replaces each SwiGLU MLP of width F by E experts of width F/K with top-K routing, so its
active parameters per token equal the dense model's (plus the E x D router); its total parameters grow by
about E/K times the MLPs. Balancing: Switch loss and router z-loss (rftkit.moe), added to the LM loss.

Logged per step (metrics.jsonl of each model): LM loss, balance and z losses, per-layer expert load (the
assignments of that step's batch), learning rate, tokens/s; held-out loss every `eval_every` steps and at
the end. Checkpoints hold all weights, the optimizer state and the step; the batch of step s is drawn from a
generator seeded by (seed, s), so `--resume` continues a killed run exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from rftkit.model import ModelConfig, Transformer
from rftkit.loading.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rftkit.loading.hf import config_to_hf
from rftkit.lr_schedule import lr_at
from rftkit.memory import keep_freed_memory
from rftkit.metrics import MetricsLog, drawing


@dataclass
class PretrainConfig:
    output: str = "pretrain-run"          # run folder: one subfolder per model (metrics, checkpoints, model)
    arch: Literal["dense", "moe", "both"] = "both"   # which model to train; both = dense then MoE, one plot
    dim: int = 128                        # D
    n_layers: int = 4                     # transformer blocks
    n_heads: int = 4                      # attention heads (head dim = dim / n_heads, no GQA)
    ffn_dim: int = 384                    # dense MLP width F; the MoE's experts have F / top_k each
    experts: int = 8                      # E routed experts per MoE layer
    top_k: int = 2                        # K experts per token
    balance_coef: float = 0.01            # Switch load-balancing loss weight
    z_coef: float = 0.001                 # router z-loss weight
    seq_len: int = 256                    # tokens (bytes) per training sequence
    batch_size: int = 16                  # sequences per step
    tokens: int = 2_000_000               # training tokens per model (steps = tokens / (batch_size * seq_len))
    lr: float = 3e-3                      # peak learning rate (AdamW)
    warmup_steps: int = 30                # linear warm-up
    min_lr_ratio: float = 0.1             # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1             # AdamW weight decay on matrices
    grad_clip: float = 1.0                # max gradient norm (0 = off)
    eval_every: int = 50                  # steps between held-out evaluations (and at the end)
    eval_tokens: int = 32768              # held-out tokens per evaluation
    generated_bytes: int = 600_000        # generated text added to the ~420 KB of training pydoc text
    seed: int = 0                         # initialisation and batch order (the corpus is fixed)
    checkpoint_every: int = 50            # steps between checkpoints
    resume: bool = False                  # continue from the latest checkpoints in output
    threads: int = 0                      # torch CPU threads (0 = torch's default)
    device: str = "cpu"                   # cpu or cuda

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "experts", "top_k", "seq_len", "batch_size",
                     "tokens", "eval_every", "eval_tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        if self.ffn_dim % self.top_k:
            raise ValueError(f"ffn_dim={self.ffn_dim} must be a multiple of top_k={self.top_k} (experts of "
                             f"width ffn_dim/top_k keep the active parameters equal)")
        if self.arch not in ("dense", "moe", "both"):
            raise ValueError(f"arch must be dense, moe or both, got {self.arch!r}")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


# ----------------------------------------------------------------------------------------------------------
# corpus: pydoc topics + generated text, as bytes

NOUNS = ("cat dog bird fox horse fish teacher child farmer doctor river tree house garden city robot engine "
         "letter window mountain").split()
VERBS = "sees follows finds likes paints builds carries watches helps opens".split()
ADJS = "small red quick quiet old young bright dark heavy green happy tired".split()
PLACES = "in the garden|near the river|on the hill|at the station|under the bridge|behind the house".split("|")
KEYS = ("name", "age", "city", "color", "score", "id")
NAMES = "alice bob carol dave erin frank grace heidi ivan judy".split()
CITIES = "paris lima oslo tokyo cairo quito delhi rome".split()


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        if rng.random() < 0.6:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"{a} + {b} = {a + b}")
        else:
            a, b = rng.randint(0, 15), rng.randint(0, 15)
            lines.append(f"{a} * {b} = {a * b}")
    return "\n".join(lines) + "\n\n"


def _sentences(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 5)):
        s, o = rng.choice(NOUNS), rng.choice(NOUNS)
        plural = rng.random() < 0.3
        verb = rng.choice(VERBS)
        if plural:                                   # subject-verb agreement: the cats see, the cat sees
            s, verb = s + ("es" if s.endswith(("x", "sh", "ch")) else "s"), verb[:-1]
        out.append(f"the {rng.choice(ADJS)} {s} {verb} a {rng.choice(ADJS)} {o} {rng.choice(PLACES)}.")
    return " ".join(out).capitalize() + "\n\n"


def _code(rng: random.Random) -> str:
    k, x = rng.randint(1, 9), rng.randint(0, 20)
    op, fn = rng.choice([("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)])
    name = f"{rng.choice(['add', 'scale', 'shift', 'step'])}_{k}"
    return (f"def {name}(x):\n    return x {op} {k}\n\n\nprint({name}({x}))  # {fn(x, k)}\n\n")


def _sorting(rng: random.Random) -> str:
    xs = [rng.randint(0, 50) for _ in range(rng.randint(3, 7))]
    return f"sorted({xs}) == {sorted(xs)}\n\n"


def _records(rng: random.Random) -> str:
    rows = []
    for _ in range(rng.randint(2, 4)):
        rows.append("; ".join(f"{k}: {rng.choice(NAMES) if k == 'name' else rng.choice(CITIES) if k == 'city' else rng.randint(1, 99)}"
                              for k in rng.sample(KEYS, rng.randint(2, 4))))
    return "\n".join(rows) + "\n\n"


GENERATORS = (_arithmetic, _sentences, _code, _sorting, _records)


def generated_text(n_bytes: int, seed: int) -> str:
    """About n_bytes of generated documents of the kinds in GENERATORS, reproducible from seed."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        doc = rng.choice(GENERATORS)(rng)
        parts.append(doc)
        size += len(doc)
    return "".join(parts)


def corpus(generated_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, held-out bytes) as uint8 tensors. Held out: every 10th pydoc topic (sorted by name) and
    generated text from a seed training never uses; documents are shuffled into one stream each."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    held = {n for i, n in enumerate(names) if i % 10 == 5}
    rng = random.Random(1234)

    def stream(docs: list[str]) -> torch.Tensor:
        rng.shuffle(docs)
        data = "\n\n".join(docs).encode("utf-8", errors="replace")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

    def gen_docs(n: int, seed: int) -> list[str]:
        return [d + "\n" for d in generated_text(n, seed).split("\n\n\n")]     # keep multi-part docs whole

    train_pydoc = [topics[n] for n in names if n not in held]
    held_pydoc = [topics[n] for n in names if n in held]
    n_held_gen = max(1, sum(map(len, held_pydoc)))            # as much generated as pydoc text held out
    return (stream(train_pydoc + gen_docs(generated_bytes, 1)), stream(held_pydoc + gen_docs(n_held_gen, 2)))


def _seed(*parts) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def batch_at(data: torch.Tensor, step: int, cfg: PretrainConfig) -> torch.Tensor:
    """The [B, T+1] windows of step `step`: random starts from a generator seeded by (seed, step)."""
    g = torch.Generator().manual_seed(_seed(cfg.seed, "batch", step))
    starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    return torch.stack([data[s:s + cfg.seq_len + 1] for s in starts.tolist()]).long()


def eval_windows(data: torch.Tensor, cfg: PretrainConfig) -> torch.Tensor:
    """Fixed [N, T+1] held-out windows, evenly spaced over the held-out stream."""
    n = max(1, min(cfg.eval_tokens // cfg.seq_len, (len(data) - 1) // cfg.seq_len))
    starts = torch.linspace(0, len(data) - cfg.seq_len - 1, n).long()
    return torch.stack([data[s:s + cfg.seq_len + 1] for s in starts.tolist()]).long()


# ----------------------------------------------------------------------------------------------------------
# models

def model_config(cfg: PretrainConfig, arch: str) -> ModelConfig:
    from rftkit.moe import MoEConfig
    common = dict(vocab_size=256, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                  head_dim=cfg.dim // cfg.n_heads, ffn_dim=cfg.ffn_dim, max_seq_len=cfg.seq_len, norm_eps=1e-5,
                  tie_embeddings=True)
    if arch == "dense":
        return ModelConfig(**common)
    mc = MoEConfig(n_experts=cfg.experts, top_k=cfg.top_k, expert_ffn_dim=cfg.ffn_dim // cfg.top_k,
                   renormalize=True, balance_coef=cfg.balance_coef, z_coef=cfg.z_coef)
    return ModelConfig(model_type="rftkit_moe", moe=asdict(mc), **common)


@torch.no_grad()
def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) for embeddings, projections, experts and routers; residual outputs (o_proj,
    down_proj) scaled by 1/sqrt(2L); norms 1."""
    out_std = std / math.sqrt(2 * model.cfg.n_layers)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        p.normal_(0, out_std if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) else std)


def active_parameters(model: Transformer) -> dict[str, int]:
    from rftkit.upcycle import parameter_counts
    return parameter_counts(model)


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, micro_batch: int = 16) -> float:
    """Mean next-byte loss (nats) over the windows."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), micro_batch):
        w = windows[i:i + micro_batch].to(model.device)
        logits, _ = model(w[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        n += w[:, 1:].numel()
    return total / n


def expert_shares(rows: list[dict], last_fraction: float = 0.1) -> dict[str, list[float]]:
    """{layer: share of routed assignments per expert} summed over the last `last_fraction` of logged steps."""
    rows = [r for r in rows if "expert_load" in r]
    if not rows:
        return {}
    tail = rows[-max(1, math.ceil(len(rows) * last_fraction)):]
    out = {}
    for layer in tail[0]["expert_load"]:
        counts = torch.tensor([r["expert_load"][layer] for r in tail]).sum(0).float()
        out[layer] = (counts / counts.sum()).tolist()
    return out


# ----------------------------------------------------------------------------------------------------------
# the loop

def train(cfg: PretrainConfig, arch: str, data: tuple[torch.Tensor, torch.Tensor] | None = None,
          on_step=None) -> dict:
    """Train one model ("dense" or "moe") into output/<arch>; returns its summary (also in summary.json).
    `on_step(step, row)` is called after each step."""
    from rftkit.moe import expert_load
    if arch not in ("dense", "moe"):
        raise ValueError(f"arch must be dense or moe, got {arch!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()                                 # no page faults re-allocating each step's activations
    out = Path(cfg.output) / arch
    out.mkdir(parents=True, exist_ok=True)
    train_data, held = data if data is not None else corpus(cfg.generated_bytes)
    windows = eval_windows(held, cfg)
    torch.manual_seed(_seed(cfg.seed, "init"))        # same seed, same attention/embedding init draws order
    model = Transformer(model_config(cfg, arch))
    init_weights(model)
    model.to(cfg.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    log = MetricsLog(out / "metrics.jsonl")
    start, elapsed = 0, 0.0
    ckpt = latest_checkpoint(out / "checkpoints") if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start, elapsed = state["step"], state["elapsed"]
        kept = [r for r in log.read() if r.get("step", 0) <= start]       # drop rows logged after the checkpoint
        log.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        print(f"rft pretrain: {arch} resumed from {ckpt} (step {start})")
    elif log.path.exists():
        log.path.unlink()
    counts = active_parameters(model)
    (out / "config.json").write_text(json.dumps({"pretrain": asdict(cfg), "arch": arch, "parameters": counts,
                                                 "model": config_to_hf(model.cfg)}, indent=1))
    total = cfg.steps
    eval_loss = None
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, total, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch_at(train_data, step, cfg).to(cfg.device)              # [B, T+1]
        model.train()
        logits, aux = model(batch[:, :-1])                                   # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        total_loss = loss + sum(aux.values())
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) if cfg.grad_clip else None
        optimizer.step()
        dt = time.perf_counter() - t0
        elapsed += dt
        row = {"step": step + 1, "tokens": (step + 1) * cfg.batch_size * cfg.seq_len, "loss": loss.item(),
               "lr": lr, "grad_norm": grad_norm, "tok_per_s": round(batch[:, 1:].numel() / dt, 1),
               "time": round(elapsed, 2)}
        for name, value in aux.items():
            row[name] = value.item()
        if arch == "moe":
            row["expert_load"] = {str(i): c.tolist() for i, c in expert_load(model).items()}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
            eval_loss = row["eval_loss"] = evaluate(model, windows.to(cfg.device))
        log.write(row)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            save_checkpoint(out / "checkpoints", step + 1, model, optimizer, {"elapsed": elapsed}, keep=1)
        if on_step is not None:
            on_step(step + 1, row)
    rows = log.read()
    if eval_loss is None:                      # resumed at the end: take it from the log
        eval_loss = next((r["eval_loss"] for r in reversed(rows) if "eval_loss" in r), None)
    from rftkit.loading.weights import save_model_folder
    save_model_folder(model, out / "model")
    shares = expert_shares(rows) if arch == "moe" else {}
    summary = {"arch": arch, "seed": cfg.seed, "steps": total, "tokens": total * cfg.batch_size * cfg.seq_len,
               "eval_loss": eval_loss, "train_loss_last10": _mean_last([r["loss"] for r in rows], 0.1),
               "parameters": counts, "seconds": round(elapsed, 1),
               "min_expert_share_last10": {k: min(v) for k, v in shares.items()},
               "expert_share_last10": shares}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _mean_last(xs: list[float], fraction: float) -> float | None:
    if not xs:
        return None
    tail = xs[-max(1, math.ceil(len(xs) * fraction)):]
    return sum(tail) / len(tail)


@drawing
def plot_runs(folders: list[Path], path: Path, title: str = "") -> Path | None:
    """Training loss (smoothed) and held-out loss against tokens for each run folder (output/<arch>)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, folder in enumerate(folders):
        rows = MetricsLog(Path(folder) / "metrics.jsonl").read()
        label = f"{Path(folder).name}" if len({Path(f).parent for f in folders}) == 1 else \
            f"{Path(folder).parent.name}/{Path(folder).name}"
        k = max(1, len(rows) // 50)               # moving average over ~2% of the run
        loss = [sum(r["loss"] for r in rows[max(0, j - k + 1):j + 1]) / len(rows[max(0, j - k + 1):j + 1])
                for j in range(len(rows))]
        ax.plot([r["tokens"] for r in rows], loss, color=f"C{i}", alpha=0.45, lw=1, label=f"{label} train")
        ev = [(r["tokens"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if ev:
            ax.plot(*zip(*ev), color=f"C{i}", lw=2, marker=".", label=f"{label} held-out")
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("loss (nats per byte, log scale)")
    ax.set_yscale("log")
    ax.set_title(title or "rft pretrain: dense vs MoE at equal active parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def run_pretrain(cfg: PretrainConfig) -> dict:
    arches = ["dense", "moe"] if cfg.arch == "both" else [cfg.arch]
    data = corpus(cfg.generated_bytes)
    print(f"rft pretrain: corpus {len(data[0]) / 1e6:.2f} MB train, {len(data[1]) / 1e3:.0f} KB held out; "
          f"{cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens per model")
    results = {}
    for arch in arches:
        s = results[arch] = train(cfg, arch, data)
        print(f"rft pretrain: {arch}: {s['parameters']['active'] / 1e6:.2f}M active / "
              f"{s['parameters']['total'] / 1e6:.2f}M parameters, held-out loss {s['eval_loss']:.4f} after "
              f"{s['tokens']} tokens in {s['seconds']:.0f} s"
              + (f"; min expert share (last 10%) {min(s['min_expert_share_last10'].values()):.3f}"
                 if s["min_expert_share_last10"] else ""))
    plot_runs([Path(cfg.output) / a for a in arches], Path(cfg.output) / "loss.png")
    if len(results) == 2:
        print(f"rft pretrain: held-out loss dense - moe = "
              f"{results['dense']['eval_loss'] - results['moe']['eval_loss']:+.4f} nats")
    return results
