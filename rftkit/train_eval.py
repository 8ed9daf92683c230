"""Evaluation during training, and the best adapter on validation kept as `adapter-best/`.

    row = eval_row(model, tok, task, step=10, elapsed=61.2, n=200, max_tokens=32, rewards=rewards)
    best = BestAdapter(out / "adapter-best", base="smollm2-135m-instruct")
    best.offer(model, step=10, value=row["eval/accuracy"])     # saved when it beats every earlier evaluation

A run's last step is a lottery: training accuracy of the demo moved between 0.48 and 0.97 over its last 20
steps, so the adapter to ship is the one that scored best on problems training never saw. The evaluation is
greedy, through the engine with the live adapter (no merge), on the task's "validation" split, which is what a
user's `--eval-data` becomes; never the test split, which stays for the final report.

`adapter-best/` is a PEFT folder like `adapter/`, plus `best.json` (the step, the metric and its value). It is
built beside the old one and swapped in with renames, so a kill leaves the previous best or the new one, whole.
Ties keep the earlier adapter. A resumed run reads `best.json` and replays the same steps (resume is exact), so
it keeps the same best.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rftkit.evaluate import evaluate, evaluate_conversations
from rftkit.lora import save_lora

BEST_FILE = "best.json"


def eval_row(model, tok, task, step: int, elapsed: float, n: int, max_tokens: int, rewards: dict | None = None,
             split: str = "validation", seed: int = 0, make_env=None, limits=None) -> dict:
    """One evaluation as a metrics row: eval/accuracy, eval/reward/<name> for each reward, eval/completion_len,
    eval/truncated_frac, and its size and cost (eval/n, eval/seconds). n is capped at the split's size. With
    `make_env` and `limits`, multi-turn conversations (rftkit.evaluate.evaluate_conversations), and eval/turns."""
    n = min(n, task.size(split))
    was_training = model.training
    model.eval()
    if make_env is None:
        res = evaluate(model, tok, task, split, n, max_tokens=max_tokens, seed=seed, progress=False, rewards=rewards)
    else:
        res = evaluate_conversations(model, tok, task, split, n, make_env, limits, seed=seed, rewards=rewards)
    model.train(was_training)
    return {"step": step, "time": round(elapsed, 2), "eval/accuracy": res["accuracy"],
            **{f"eval/reward/{k}": v for k, v in res["rewards"].items()},
            "eval/completion_len": res["completion_len"], "eval/truncated_frac": res["truncated_frac"],
            "eval/n": res["n"], "eval/seconds": round(res["seconds"], 2), "eval/split": split,
            **({"eval/turns": res["turns"]} if "turns" in res else {})}


class BestAdapter:
    """The adapter with the best value of one evaluation metric so far, kept in `folder`."""

    def __init__(self, folder: Path, base: str, metric: str = "eval/accuracy", higher: bool = True):
        self.folder, self.base, self.metric, self.higher = Path(folder), base, metric, higher
        self._recover()
        info = self.info()
        self.value = info["value"] if info else None
        self.step = info["step"] if info else None

    def info(self) -> dict | None:
        """best.json of the kept adapter, or None when there is none yet."""
        f = self.folder / BEST_FILE
        return json.loads(f.read_text()) if f.is_file() else None

    def better(self, value: float) -> bool:
        return self.value is None or (value > self.value if self.higher else value < self.value)

    def offer(self, model, step: int, value: float, write: bool = True) -> bool:
        """Keep the model's adapter if `value` beats every earlier one; True when it did."""
        if not self.better(value):
            return False
        self.value, self.step = value, step
        if not write:
            return True
        tmp = self.folder.with_name(f".{self.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_lora(model, tmp, base=self.base)
        (tmp / BEST_FILE).write_text(json.dumps({"step": step, "metric": self.metric, "value": value}, indent=1))
        old = self.folder.with_name(f".{self.folder.name}.old-{os.getpid()}")
        if self.folder.exists():            # moved aside, never deleted first: a kill leaves one whole folder
            os.replace(self.folder, old)
        os.replace(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)
        return True

    def _recover(self) -> None:
        """Undo what a swap killed half-way left: the old folder back if the new never arrived; temporaries go."""
        parent = self.folder.parent
        for old in parent.glob(f".{self.folder.name}.old-*"):
            if self.folder.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, self.folder)
        for tmp in parent.glob(f".{self.folder.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
