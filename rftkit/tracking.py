"""Experiment tracking through the libraries people already watch runs with: `--report-to tensorboard,trackio,
wandb,mlflow` (none by default). metrics.jsonl stays the record; a reporter is a copy for a dashboard.

    check_report_to(["trackio"])                 # before the run: a missing package fails here, naming the pip
    reporters = open_reporters(["trackio"], out, config=vars(cfg), resume=False)
    for r in reporters: r.scalars({"reward": 0.4}, step=1); r.table("completions", cols, rows, step=1)

Each backend is the same four lines over the library's own API: scalars at a step, a table of sampled
completions, close. TensorBoard writes `output/tensorboard/` (torch's SummaryWriter); trackio its local
SQLite store (`trackio show --project rftkit`; project "rftkit", run named after the output folder); wandb and
mlflow go wherever their own settings send them (WANDB_MODE=offline, MLFLOW_TRACKING_URI). All four are
optional installs, checked before the run starts so that a missing one never costs a trained run.
"""
from __future__ import annotations

import importlib
from pathlib import Path

INSTALL = {"tensorboard": "pip install tensorboard", "trackio": "pip install trackio", "wandb": "pip install wandb",
           "mlflow": "pip install mlflow"}
PROJECT = "rftkit"


def check_report_to(names: list[str]) -> list[str]:
    """The backends asked for, validated: an unknown name or a missing package raises, naming the install."""
    names = [n.strip().lower() for n in names if n.strip() and n.strip().lower() != "none"]
    for n in names:
        if n not in INSTALL:
            raise ValueError(f"--report-to {n!r}: not a tracking backend; use some of {', '.join(INSTALL)} (or none)")
        try:
            importlib.import_module(n)          # imported, not just found: an install missing its dependencies
        except ImportError as e:                # fails here too
            raise ValueError(f"--report-to {n} needs the {n} package: {INSTALL[n]} ({e})") from None
    return names


class TensorBoard:
    def __init__(self, out: Path, run: str, config: dict, resume: bool):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(str(Path(out) / "tensorboard"))
        self.w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def scalars(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        cell = lambda x: str(x).replace("|", "\\|").replace("\n", "<br>")
        md = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                       + ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows])
        self.w.add_text(name, md, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class Trackio:
    def __init__(self, out: Path, run: str, config: dict, resume: bool):
        import trackio
        self.t = trackio
        self.run = trackio.init(project=PROJECT, name=run, config=config, resume="allow" if resume else "never",
                                embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({name: self.t.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Wandb:
    def __init__(self, out: Path, run: str, config: dict, resume: bool):
        import wandb
        self.wb = wandb
        self.run = wandb.init(project=PROJECT, name=run, config=config, dir=str(out), resume="allow" if resume else None)

    def scalars(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({name: self.wb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, out: Path, run: str, config: dict, resume: bool):
        import mlflow
        self.ml = mlflow
        mlflow.set_experiment(PROJECT)
        mlflow.start_run(run_name=run)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def scalars(self, values: dict, step: int) -> None:
        self.ml.log_metrics(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        # log_dict, not log_table: log_table lists every table in one run tag of at most 5,000 characters
        self.ml.log_dict({"columns": columns, "data": rows}, f"{name}/step-{step:07d}.json")

    def close(self) -> None:
        self.ml.end_run()


BACKENDS = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": Wandb, "mlflow": MLflow}


def open_reporters(names: list[str], out: Path, config: dict | None = None, resume: bool = False) -> list:
    """One reporter per backend in `names` (checked again), the run named after the output folder."""
    config = {k: v for k, v in (config or {}).items() if isinstance(v, (int, float, str, bool, list)) or v is None}
    return [BACKENDS[n](Path(out), Path(out).resolve().name, config, resume) for n in check_report_to(names)]
