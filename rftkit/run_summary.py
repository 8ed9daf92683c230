"""The end of a run as a person wants to see it: `summary.png` (reward and accuracy, train and eval, length,
entropy, KL against step, wall time on the top axis) and a short `report.md` (the evaluations, the chosen
adapter, and whatever the command adds, e.g. the demo's before/after table).

    write_summary(out, "rft train", MetricsLog(out / "metrics.jsonl").read(), best={"step": 40, ...})

Both are drawn from metrics.jsonl, which is written first: the picture goes through metrics.drawing, so a
failing plot is a warning and never costs the run; the report is plain text and always written.
"""
from __future__ import annotations

from pathlib import Path

from rftkit.metrics import drawing

# (panel title, training keys, evaluation keys): a panel is drawn when any of its keys was logged
PANELS = [("reward and accuracy", ["reward", "accuracy"], ["eval/accuracy", "eval/reward/task"]),
          ("loss", ["loss"], ["eval_loss"]),
          ("completion length (tokens)", ["completion_len"], ["eval/completion_len"]),
          ("truncated share", ["truncated_frac"], ["eval/truncated_frac"]),
          ("entropy (nats/token)", ["entropy"], []),
          ("KL to the base model", ["kl"], [])]


def _points(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]


@drawing
def plot_summary(rows: list[dict], path: Path, title: str = "", best_step: int | None = None) -> Path | None:
    """One figure, a panel per logged quantity against step; training curves solid, evaluations with markers;
    the kept adapter's step dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator
    panels = [p for p in PANELS if any(_points(rows, k) for k in p[1] + p[2])]
    if not panels:
        raise ValueError("no metric to draw")
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    timed = sorted({(r["step"], r["time"]) for r in rows if "step" in r and isinstance(r.get("time"), (int, float))})
    for ax, (name, train_keys, eval_keys) in zip(axes.flat, panels):
        for k in train_keys:
            pts = _points(rows, k)
            if pts:
                ax.plot(*zip(*pts), label=k, alpha=0.8)
        for k in eval_keys:
            pts = _points(rows, k)
            if pts:
                ax.plot(*zip(*pts), label=k, marker="o", markersize=3)
        if best_step is not None:
            ax.axvline(best_step, color="grey", linestyle="--", linewidth=1, label=f"kept adapter (step {best_step})")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if len(timed) >= 2:            # wall time on the top axis, read off the logged (step, time) pairs
            s, t = np.array(timed, dtype=float).T
            top = ax.secondary_xaxis("top", functions=(lambda x: np.interp(x, s, t), lambda y: np.interp(y, t, s)))
            top.set_xticks([v for v in MaxNLocator(5).tick_values(t[0], t[-1]) if t[0] <= v <= t[-1]])
            top.set_xlabel("seconds", fontsize=8)
            top.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_md(title: str, rows: list[dict], best: dict | None, final: str, extra: list[str] = ()) -> str:
    """The report's text: what ran, the last training steps, every evaluation, the chosen adapter, extras."""
    train = [r for r in rows if "step" in r and not any(k.startswith("eval/") for k in r)
             and any(k in r for k in ("reward", "loss"))]
    evals = [r for r in rows if "eval/accuracy" in r or "eval_loss" in r]
    lines = [f"# {title}", ""]
    if train:
        last = train[-10:]
        means = {k: sum(r[k] for r in last) / len(last) for k in ("reward", "accuracy", "loss", "completion_len",
                                                                    "entropy", "kl")
                 if all(isinstance(r.get(k), (int, float)) for r in last)}
        lines += [f"{train[-1]['step']} steps in {train[-1].get('time', 0):.0f} s of training. Over the last "
                  f"{len(last)} steps: " + ", ".join(f"{k} {_fmt(v)}" for k, v in means.items()) + ".", ""]
    if evals:
        keys = [k for k in ("eval/accuracy", "eval/reward/task", "eval/completion_len", "eval/truncated_frac",
                            "eval_loss", "eval/seconds") if any(k in r for r in evals)]
        split = next((r["eval/split"] for r in evals if "eval/split" in r), "held-out")
        lines += [f"Evaluations during training ({split} split, greedy):", "",
                  "| step | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {r['step']} | " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in evals]
        lines.append("")
    if best:
        lines.append(f"Chosen adapter: `adapter-best/` from step {best['step']} ({best['metric']} "
                     f"{_fmt(best['value'])}); the last step's adapter is `{final}`.")
    else:
        lines.append(f"Adapter: `{final}` (the last step's; no evaluation during training chose another).")
    lines += ["", *extra, "", "![summary](summary.png)", ""]
    return "\n".join(lines)


def write_summary(out: Path, title: str, rows: list[dict], best: dict | None = None, final: str = "adapter/",
                  extra: list[str] = ()) -> dict:
    """Write report.md (always) and summary.png (a warning if it cannot be drawn); returns their paths."""
    out = Path(out)
    report = out / "report.md"
    report.write_text(report_md(title, rows, best, final, extra))
    png = plot_summary(rows, out / "summary.png", title, best["step"] if best else None)
    return {"report": report, "png": png}
