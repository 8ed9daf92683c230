"""A run's output folder holds one run. A second `rft train` / `rft sft` / `rft demo` into a used folder would
append to the first run's metrics and let a later `--resume` pick up the other run's checkpoint, so it is
refused unless the user says which they meant: `--resume` (continue it) or `--overwrite` (replace it).

    prepare_output(Path("runs/add"), resume=False, overwrite=False, command="rft train")

Only the files a run writes are removed by `--overwrite`; anything else the user keeps in the folder stays.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from rftkit import distributed as dist

# what rft train / sft / demo write into their output folder (tensorboard/ and wandb/ with --report-to)
RUN_FILES = ("metrics.jsonl", "checkpoints", "adapter", "adapter-best", "model", "config.json", "report.json",
             "report.md", "eval_before.jsonl", "eval_after.jsonl", "reward.png", "loss.png", "summary.png",
             "tensorboard", "wandb")


def run_files(out: Path) -> list[str]:
    """The names in RUN_FILES that exist in `out`."""
    return [name for name in RUN_FILES if (Path(out) / name).exists()]


def prepare_output(out: Path, resume: bool, overwrite: bool, command: str) -> Path:
    """Create `out`, refusing one that holds a run unless `resume` or `overwrite`; with `overwrite` the old
    run's files are removed (by the main process, after every process has looked)."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError(f"{command}: --resume continues the run in {out} and --overwrite replaces it; pass one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{command}: --output {out} is a file, not a folder")
    used = run_files(out)
    dist.all_gather(len(used), "the output folder check")        # every process looks before anyone deletes
    if used and not resume:
        if not overwrite:
            raise ValueError(f"{command}: {out} already holds a run ({', '.join(used)}); pass --resume to continue "
                             f"it, --overwrite to replace it, or choose another --output")
        if dist.is_main():
            for name in used:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        dist.all_gather(0, "the old run's removal")
    out.mkdir(parents=True, exist_ok=True)
    return out
