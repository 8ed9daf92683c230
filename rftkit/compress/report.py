"""What compression cost: `rft compress` runs one method (or a sweep) and measures it against the original.

    rft compress --method wanda --sparsity 0.5 --adapter rft-demo/adapter --out smol-wanda50
    rft compress --sweep --adapter rft-demo/adapter --out sweep/ --n 1000     # sweep.csv/json + pareto.png

Every number is measured on what was written: the folder is saved, loaded back (`load_compressed`) and that
model is evaluated. The original is measured once per run (or sweep) in the same process: bytes of its
safetensors, parameters, perplexity on held-out pydoc text (the tokens after the calibration ones),
accuracy on `n` held-out task problems without and with the adapter (kept unmerged), and decode tok/s
single-stream and batched, original and compressed alternately, best of two (the machine is shared; the
load average is stored with the numbers). With an adapter, the speeds are those of the deployment pair
(model + unmerged adapter).

Structured pruning and distillation change layer shapes, so with an adapter they compress the specialist
(base + adapter merged): their accuracy and perplexity are reported in the `_adapter` columns, against the
original base + adapter.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from rftkit.compress.folder import folder_bytes, load_compressed, save_compressed
from rftkit.compress.transforms import (CompressConfig, calibration_batches, compress, count_params, perplexity,
                                        text_tokens, validate)
from rftkit.metrics import drawing

STRUCTURAL = ("structured", "distill")
COLUMNS = ("params", "nonzero", "perplexity", "perplexity_adapter", "accuracy", "accuracy_adapter")
# the sweep grid: settings tried per method (anything not named keeps the command line's value)
GRID = {
    "int8": [{}],
    "int4": [{"group_size": 32}, {"group_size": 64}],    # 64 divides every width of the SmolLM2 family
    "magnitude": [{"sparsity": 0.3}, {"sparsity": 0.5}],
    "wanda": [{"sparsity": 0.3}, {"sparsity": 0.5}, {"pattern": "2:4"}],
    "structured": [{"ratio": 0.15}, {"ratio": 0.3}],
    "svd": [{"energy": 0.95}, {"energy": 0.99}],
    "kmeans": [{"clusters": 16}, {"clusters": 256}],
    "distill": [{"ratio": 0.3}],
}


def _stage(what: str) -> None:
    """One line per stage on stderr (a --n 1000 run takes minutes per evaluation)."""
    print(f"rft compress [{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def decode_speed(model, tok, rows: int, tokens: int, prompt: str = "Write a story about a robot.") -> float:
    """Generated tokens per second through the engine: `rows` prompts decoding `tokens` tokens each."""
    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    engine = Engine(model, max_seq_len=len(ids) + tokens + 8, max_batch=max(rows, 1))
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.generate([ids] * rows, params, progress=False)          # warm-up (and kernel build)
    t0 = time.perf_counter()
    engine.generate([ids] * rows, params, progress=False)
    return rows * tokens / (time.perf_counter() - t0)


def speeds(pairs: dict, tok, cfg: CompressConfig) -> dict:
    """Decode tok/s of each model, single-stream and batched, measured alternately in one run, best of two."""
    res = {name: {"single": [], "batched": []} for name in pairs}
    _stage(f"decode speed of {' and '.join(pairs)}: 1 row and {cfg.batch} rows, twice each")
    for _ in range(2):
        for name, model in pairs.items():
            res[name]["single"].append(decode_speed(model, tok, 1, cfg.speed_tokens))
            res[name]["batched"].append(decode_speed(model, tok, cfg.batch, max(cfg.speed_tokens // 2, 1)))
    return {name: {k: max(v) for k, v in r.items()} for name, r in res.items()}


def measure(model, tok, cfg: CompressConfig, task, adapter: str | None, ppl_ids) -> dict:
    """Parameters, perplexity and accuracy; with `adapter` it is then applied (unmerged, and left on)."""
    from rftkit.evaluate import evaluate
    from rftkit.lora import load_lora
    out: dict = {}
    out["params"], out["nonzero"] = count_params(model)
    if ppl_ids is not None:
        _stage(f"perplexity on {ppl_ids.numel()} held-out tokens")
        out["perplexity"] = perplexity(model, ppl_ids)
    if cfg.n:
        _stage(f"accuracy on {cfg.n} held-out {task.name} problems")
        out["accuracy"] = evaluate(model, tok, task, "test", cfg.n, seed=cfg.seed, progress=False)["accuracy"]
    if adapter:
        load_lora(model, adapter)
        if ppl_ids is not None:
            _stage("perplexity with the adapter")
            out["perplexity_adapter"] = perplexity(model, ppl_ids)
        if cfg.n:
            _stage(f"accuracy on {cfg.n} held-out {task.name} problems with the adapter")
            out["accuracy_adapter"] = evaluate(model, tok, task, "test", cfg.n, seed=cfg.seed,
                                               progress=False)["accuracy"]
    return out


def compress_settings(cfg: CompressConfig) -> dict:
    return dict(group_size=cfg.group_size, head_bits=cfg.head_bits, sparsity=cfg.sparsity, pattern=cfg.pattern,
                ratio=cfg.ratio, head_ratio=cfg.head_ratio, energy=cfg.energy, rank=cfg.rank, clusters=cfg.clusters,
                distill_steps=cfg.distill_steps, distill_lr=cfg.distill_lr, distill_batch=cfg.distill_batch,
                seed=cfg.seed, log_every=10)


def distill_text(teacher, tok, cfg: CompressConfig, task, calib: torch.Tensor) -> list[list[int]]:
    """Calibration text in rows of 128 tokens plus the teacher's answers to `distill_samples` train prompts of
    the task (short rows: a step's cost grows with the longest row of its batch)."""
    rows = [c.tolist() for r in calib for c in r.split(128)]
    if cfg.distill_samples:
        from rftkit.compress.distill import teacher_samples
        convs = [s["messages"] for s in task.samples("train", cfg.distill_samples, seed=cfg.seed)]
        rows += teacher_samples(teacher, tok, convs)
    return rows


def baseline(cfg: CompressConfig) -> dict:
    """The original, loaded and measured once: {folder, tok, task, ppl_ids, pair (model + adapter), measures}."""
    from rftkit.loading import load_model, load_tokenizer, resolve
    from rftkit.tasks import get_task
    folder = resolve(cfg.model)
    tok = load_tokenizer(str(folder))
    task = get_task(cfg.task)
    ppl_ids = text_tokens(tok, cfg.ppl_tokens, cfg.calib_tokens) if cfg.ppl_tokens else None
    pair = load_model(str(folder))
    _stage(f"measuring the original {folder.name}" + (f" (+ adapter {cfg.adapter})" if cfg.adapter else ""))
    measures = measure(pair, tok, cfg, task, cfg.adapter, ppl_ids)
    return {"folder": folder, "tok": tok, "task": task, "ppl_ids": ppl_ids, "pair": pair, "measures": measures,
            "bytes": folder_bytes(folder)}


def run_one(cfg: CompressConfig, ctx: dict | None = None) -> dict:
    """Compress, save, reload, measure; writes `out`/report.json and prints the table."""
    from rftkit.loading import load_config, load_model, resolve
    from rftkit.lora import load_lora, merge_lora
    if not cfg.out:
        raise ValueError("--out is required: the folder to write the compressed model to")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"{out}: output folder exists and is not empty (pass --overwrite to replace it)")
    validate(cfg.method, model_cfg=load_config(resolve(cfg.model)), **{k: getattr(cfg, k) for k in (
        "group_size", "head_bits", "sparsity", "pattern", "ratio", "energy", "clusters", "rank", "head_ratio")})
    ctx = ctx or baseline(cfg)
    tok, task, folder = ctx["tok"], ctx["task"], ctx["folder"]
    torch.manual_seed(cfg.seed)
    model = load_model(str(folder))
    merged = bool(cfg.adapter) and cfg.method in STRUCTURAL
    if merged:                          # shapes change: compress the specialist (base + adapter merged)
        load_lora(model, cfg.adapter)
        merge_lora(model)
    calib = calibration_batches(tok, cfg.calib_tokens) if cfg.method in ("wanda",) + STRUCTURAL else None
    teacher = copy.deepcopy(model) if cfg.method == "distill" else None
    data = distill_text(teacher, tok, cfg, task, calib) if teacher is not None else None
    _stage(f"compressing: {cfg.method}")
    t0 = time.perf_counter()
    model, record = compress(model, cfg.method, calib=calib, teacher=teacher, distill_data=data,
                             **compress_settings(cfg))
    record["seconds"] = time.perf_counter() - t0
    record["adapter_merged"] = cfg.adapter if merged else None
    del teacher
    save_compressed(model, record, out, folder, cfg.overwrite)
    model = load_compressed(out)                       # measure what was written
    _stage(f"measuring the compressed model written to {out}")
    c = measure(model, tok, cfg, task, None if merged else cfg.adapter, ppl_ids=ctx["ppl_ids"])
    if merged:                                         # the specialist: compare with the original pair
        c = {k if k in ("params", "nonzero") else k + "_adapter": v for k, v in c.items()}
    from rftkit.compress.quantize import kernel_status
    report: dict = {"method": cfg.method, "settings": {k: v for k, v in record["settings"].items() if k != "log_every"},
                    "compress_seconds": record["seconds"], "adapter": cfg.adapter, "adapter_merged": merged,
                    "kernel": kernel_status(), "bytes": {"original": ctx["bytes"], "compressed": folder_bytes(out)},
                    "original": ctx["measures"], "compressed": c}
    if "distill" in record:
        report["distill"] = record["distill"]
    if cfg.speed_tokens:
        report["speed"] = speeds({"original": ctx["pair"], "compressed": model}, tok, cfg)
    report["loadavg"] = os.getloadavg()
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report), flush=True)
    return report


def format_report(r: dict) -> str:
    b = r["bytes"]
    merged = f"  (adapter {r['adapter']} merged before compressing)" if r.get("adapter_merged") else ""
    lines = [f"rft compress {r['method']} {r['settings']}  ({r['kernel']}){merged}",
             "| | original | compressed | ratio |", "|---|---|---|---|",
             f"| bytes on disk | {b['original']:,} | {b['compressed']:,} | {b['compressed'] / b['original']:.3f} |"]
    o, c = r["original"], r["compressed"]
    for key in COLUMNS:
        if key in o or key in c:
            fmt = "{:,}" if key in ("params", "nonzero") else "{:.4f}"
            a, z = o.get(key), c.get(key)
            ratio = f"{z / a:.3f}" if a and z is not None else "-"
            lines.append(f"| {key} | {'-' if a is None else fmt.format(a)} | {'-' if z is None else fmt.format(z)} "
                         f"| {ratio} |")
    if "speed" in r:
        s = r["speed"]
        for k in ("single", "batched"):
            lines.append(f"| decode tok/s {k} | {s['original'][k]:.1f} | {s['compressed'][k]:.1f} | "
                         f"{s['compressed'][k] / s['original'][k]:.2f} |")
    lines.append(f"(load average {r['loadavg'][0]:.2f}, {r['compress_seconds']:.0f} s to compress)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# sweep

def sweep_row(name: str, r: dict) -> dict:
    row = {"name": name, "method": r["method"], "bytes": r["bytes"]["compressed"],
           "size_ratio": r["bytes"]["compressed"] / r["bytes"]["original"], "adapter_merged": r["adapter_merged"],
           "loadavg": r["loadavg"][0], "settings": json.dumps(r["settings"], sort_keys=True)}
    for k in COLUMNS:
        row[k] = r["compressed"].get(k)
    for k in ("single", "batched"):
        row[f"tok_s_{k}"] = r["speed"]["compressed"][k] if "speed" in r else None
        row[f"tok_s_{k}_original"] = r["speed"]["original"][k] if "speed" in r else None
    return row


def run_sweep(cfg: CompressConfig) -> list[dict]:
    """Each method of `sweep_methods` at each GRID setting, into `out`/<name>/; the original first. Rows are
    written to sweep.json / sweep.csv after every run (a cut-off sweep keeps what it measured)."""
    if not cfg.out:
        raise ValueError("--out is required: the folder to write the sweep's models and tables to")
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    methods = cfg.sweep_methods.split(",")
    ctx = baseline(cfg)
    o = ctx["measures"]
    rows = [{"name": "original", "method": "fp32", "bytes": ctx["bytes"], "size_ratio": 1.0, "adapter_merged": False,
             "loadavg": os.getloadavg()[0], "settings": "{}", **{k: o.get(k) for k in COLUMNS}}]
    skipped = []
    for method in methods:
        for over in GRID[method]:
            name = method + "".join(f"-{k}{v}".replace(":", "_") for k, v in over.items())
            try:
                r = run_one(replace(cfg, method=method, sweep=False, out=str(root / name), **over), ctx)
            except ValueError as e:     # a setting this model's shapes do not take: say so, measure the rest
                skipped.append(f"{name}: {e}")
                _stage(f"skipped {name}: {e}")
                continue
            rows.append(sweep_row(name, r))
            write_table(rows, root)
    plot_pareto(rows, root / "pareto.png")
    for line in skipped:
        print(f"rft compress --sweep: skipped {line}", file=sys.stderr)
    return rows


def write_table(rows: list[dict], root: Path) -> None:
    (root / "sweep.json").write_text(json.dumps(rows, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(root / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size (smaller) and score (larger), by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


@drawing
def plot_pareto(rows: list[dict], path: Path) -> Path | None:
    """Size on disk (MB) against accuracy with the adapter (else accuracy, else -perplexity), frontier drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = next((k for k in ("accuracy_adapter", "accuracy") if all(r.get(k) is not None for r in rows)), None)
    pts = [(r["bytes"] / 1e6, r[key] if key else -r["perplexity"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for r, p in zip(rows, pts):
        ax.annotate(r["name"], p, fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "r--", label="Pareto frontier")
    ax.set_xlabel("bytes on disk (MB)")
    ax.set_ylabel(key or "-perplexity (held-out pydoc)")
    ax.set_title("rft compress --sweep: size vs accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_compress(cfg: CompressConfig) -> dict:
    """rft compress: one method (or `--sweep`), measured against the original."""
    return run_sweep(cfg) if cfg.sweep else run_one(cfg)
