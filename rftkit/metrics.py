"""The metrics log of a run (JSON lines, copied to the --report-to trackers) and its curves as a PNG.

    log = MetricsLog(run_dir / "metrics.jsonl"); log.write({"step": 1, "reward": 0.4})
    plot_curves(log.read(), "step", ["reward"], run_dir / "reward.png")
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from pathlib import Path


class MetricsLog:
    """One JSON object per line in `path`, appended (a resumed run continues the same file); the numeric fields
    of each row also go to the `report_to` backends (rftkit.tracking: tensorboard, trackio, wandb, mlflow),
    whose packages are checked here, before the run starts."""

    def __init__(self, path: Path, step_key: str = "step", report_to: list[str] = (), config: dict | None = None,
                 resume: bool = False):
        from rftkit.tracking import check_report_to, open_reporters
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step_key = step_key
        self.reporters = open_reporters(check_report_to(list(report_to)), self.path.parent, config, resume) \
            if report_to else []

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != self.step_key}
        for r in self.reporters:
            r.scalars(scalars, row.get(self.step_key, 0))

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table (e.g. the step's completions with their rewards) to the backends; metrics.jsonl keeps its own
        samples."""
        for r in self.reporters:
            r.table(name, columns, rows, step)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
        self.reporters = []

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
