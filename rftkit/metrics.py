"""The metrics log of a run (JSON lines, optionally TensorBoard) and its curves as a PNG.

    log = MetricsLog(run_dir / "metrics.jsonl"); log.write({"step": 1, "reward": 0.4})
    plot_curves(log.read(), "step", ["reward"], run_dir / "reward.png")
"""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """One JSON object per line in `path`, appended (a resumed run continues the same file); numeric fields
    also go to TensorBoard when `tensorboard` is set and the package is installed."""

    def __init__(self, path: Path, tensorboard: bool = False, step_key: str = "step"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step_key = step_key
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:       # optional: the JSONL log is the record
                SummaryWriter = None
            if SummaryWriter is not None:
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
        if not self.path.is_file():
            return []
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]


def plot_curves(rows: list[dict], x: str, ys: list[str], path: Path, title: str = "",
                hlines: dict[str, float] | None = None) -> Path:
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
