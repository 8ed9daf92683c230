"""The non-quantization table of docs/compression.md (issue 7, acceptance 3): several methods against one
measured original, in one process (the original is evaluated once), resumable (a method whose report.json
exists is skipped).

    python scripts/compress_table.py --adapter rft-demo/adapter --out runs/c-table [--n 1000] [--threads 1]

Each method's folder holds its compressed model and report.json; `table.md` is rewritten after each one.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

RUNS = {   # name -> settings over the command line's
    "wanda50": dict(method="wanda", sparsity=0.5),
    "magnitude50": dict(method="magnitude", sparsity=0.5),
    "structured30": dict(method="structured", ratio=0.3),                      # MLP neurons and query heads
    "structured30-mlp": dict(method="structured", ratio=0.3, head_ratio=0.0),  # MLP neurons only
    "distill30-mlp": dict(method="distill", ratio=0.3, head_ratio=0.0),
    "svd95": dict(method="svd", energy=0.95),
    "kmeans256": dict(method="kmeans", clusters=256),
}


def table(root: Path) -> str:
    lines = ["| model | bytes on disk | perplexity (with adapter) | accuracy with adapter |", "|---|---|---|---|"]
    first = True
    for name in RUNS:
        f = root / name / "report.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        if first:
            o = r["original"]
            lines.append(f"| original | {r['bytes']['original']:,} | {o.get('perplexity_adapter', float('nan')):.3f} "
                         f"| {o.get('accuracy_adapter', float('nan')):.3f} |")
            first = False
        c = r["compressed"]
        lines.append(f"| {name} | {r['bytes']['compressed']:,} | {c.get('perplexity_adapter', float('nan')):.3f} "
                     f"| {c.get('accuracy_adapter', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def measured_baseline(cfg, report: dict) -> dict:
    """baseline(cfg)'s context without measuring the original again: its numbers from an earlier report."""
    from rftkit.compress.folder import folder_bytes
    from rftkit.compress.transforms import text_tokens
    from rftkit.loading import load_tokenizer, resolve
    from rftkit.tasks import get_task
    folder = resolve(cfg.model)
    tok = load_tokenizer(str(folder))
    ppl_ids = text_tokens(tok, cfg.ppl_tokens, cfg.calib_tokens) if cfg.ppl_tokens else None
    return {"folder": folder, "tok": tok, "task": get_task(cfg.task), "ppl_ids": ppl_ids, "pair": None,
            "measures": report["original"], "bytes": folder_bytes(folder)}


def main(argv=None):
    from rftkit.compress.transforms import CompressConfig
    from rftkit.compress.report import baseline, run_one
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--distill-samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", default=",".join(RUNS), help="comma-separated names of RUNS")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    todo = [n for n in a.only.split(",") if not (root / n / "report.json").is_file()]
    unknown = [n for n in todo if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run names {unknown}; choose from {list(RUNS)}")
    cfg = CompressConfig(adapter=a.adapter, n=a.n, speed_tokens=0, distill_steps=a.distill_steps,
                         distill_samples=a.distill_samples, overwrite=True)
    ctx = None
    done = [json.loads((root / n / "report.json").read_text()) for n in RUNS if (root / n / "report.json").is_file()]
    if todo and done and done[0]["original"].get("accuracy_adapter") is not None:
        ctx = measured_baseline(cfg, done[0])      # resuming: the original was measured by an earlier run
    elif todo:
        ctx = baseline(cfg)
    for name in todo:
        run_one(replace(cfg, out=str(root / name), **RUNS[name]), ctx)
        (root / "table.md").write_text(table(root))
    print(table(root))


if __name__ == "__main__":
    sys.exit(main())
