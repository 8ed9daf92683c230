"""RFT with no demonstrations against SFT with 10 and with 100, at the same wall-time budget (issue 5, acc. 5).

    python bench/rft_vs_sft.py --budget 300 --results runs/rft_vs_sft.jsonl --plot docs/img/rft-vs-sft.png
    python bench/rft_vs_sft.py --quick --results /tmp/rvs.jsonl       # smoke: 15 s budgets, 1 seed, 8 problems

Task: 2-digit additions (operands 10-99), the `rft demo` prompt through the model's chat template.
  rft:    GRPO with the `rft demo` settings (P=8 prompts x G=8, <= 32 tokens, LoRA r16 all-linear); the
          training signal is only the reward, and the reward's verifier knows the answer (a + b).
  sft10, sft100: LoRA SFT (r16 all-linear, batch 8, the loss on the reply only) on 10 or 100 demonstrations
          drawn from the train split per seed, each the prompt and the bare answer ("57"), for as many
          epochs as the budget allows (lr constant after 10 warm-up steps).
Hyperparameters are chosen on the validation split: every (arm, lr) of the grid trains seed 0 for the whole
budget; the lr with the best validation accuracy (200 problems, greedy) is then trained with seeds 1 and 2.
Reported: held-out test accuracy (--eval-n problems, greedy, <= 32 new tokens, the last integer of the reply
must equal a + b) of the adapters at 25/50/75/100% of the training budget: curves, and mean +- std over the
3 seeds at the end. Training seconds exclude these evaluations (snapshots are saved and scored after each
run).

Resumable: each finished run is one JSON line in --results; a rerun skips what is there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

EMBEDDED = "smollm2-135m-instruct"
GRID = {"rft": [2e-4, 5e-4], "sft10": [1e-4, 3e-4, 1e-3], "sft100": [1e-4, 3e-4, 1e-3]}
MARKS = (0.25, 0.5, 0.75)           # snapshot points, as fractions of the budget (the end is the 4th)


def load_rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


def accuracy(adapter: str | None, split: str, n: int) -> float:
    from rftkit.evaluate import evaluate
    from rftkit.loading import load
    from rftkit.lora import load_lora
    from rftkit.tasks import arithmetic
    model, tok = load(None)
    if adapter is not None:
        load_lora(model, adapter)
    return evaluate(model, tok, arithmetic(), split, n, max_tokens=32, progress=False)["accuracy"]


class Snapshots:
    """on_step callback: save the live adapter the first time training time passes each mark."""

    def __init__(self, model, out: Path, budget: float):
        self.model, self.out, self.todo, self.saved = model, out, [m * budget for m in MARKS], []

    def __call__(self, step: int, row: dict) -> None:
        from rftkit.lora import save_lora
        if self.todo and row["time"] >= self.todo[0]:
            while self.todo and row["time"] >= self.todo[0]:      # one snapshot for the marks a step passed
                self.todo.pop(0)
            path = self.out / f"snap{len(self.saved)}"
            save_lora(self.model, path, base=EMBEDDED)
            self.saved.append((row["time"], str(path)))


def train_rft(lr: float, seed: int, out: Path, budget: float) -> dict:
    from rftkit.demo import DemoConfig
    from rftkit.grpo import GRPOConfig, train
    from rftkit.loading import load
    d = DemoConfig()
    model, tok = load(None)
    snaps = Snapshots(model, out, budget)
    cfg = GRPOConfig(task="arithmetic", output=str(out), steps=0, time_budget=budget,
                     prompts_per_step=d.prompts_per_step, group_size=d.group_size, max_tokens=d.train_max_tokens,
                     lr=lr, lora_r=d.lora_r, lora_alpha=2.0 * d.lora_r, seed=seed, checkpoint_every=10**9)
    result = train(cfg, model, tok, progress=False, on_step=snaps)
    return {"steps": result["steps"], "train_s": result["seconds"], "adapter": result["adapter"],
            "snapshots": snaps.saved}


def train_sft(n_demos: int, lr: float, seed: int, out: Path, budget: float) -> dict:
    from rftkit.loading import load
    from rftkit.sft import SFTConfig, train
    from rftkit.tasks import arithmetic
    demos = arithmetic().samples("train", n_demos, seed=1000 + seed)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": s["messages"], "completion": str(s["answer"])}) + "\n"
                            for s in demos))
    model, tok = load(None)
    snaps = Snapshots(model, out, budget)
    cfg = SFTConfig(data=str(data), output=str(out), eval_fraction=0.0, epochs=1e5, time_budget=budget,
                    batch_size=8, micro_batch=8, lr=lr, warmup_steps=10, lora_r=16, lora_alpha=32.0, seed=seed,
                    checkpoint_every=10**9, keep_checkpoints=1, device="cpu")
    result = train(cfg, model, tok, progress=False, on_step=snaps)
    return {"steps": result["steps"], "train_s": result["seconds"], "adapter": result["output"],
            "snapshots": snaps.saved}


def run(arm: str, lr: float, seed: int, args) -> dict:
    out = Path(args.work) / f"{arm}-lr{lr:g}-s{seed}"
    t = time.perf_counter()
    if arm == "rft":
        r = train_rft(lr, seed, out, args.budget)
    else:
        r = train_sft(int(arm[3:]), lr, seed, out, args.budget)
    snaps = [(s, p) for s, p in r.pop("snapshots") if s < r["train_s"]]        # not the final step's twin
    curve = [[round(s, 1), accuracy(p, "test", args.eval_n)] for s, p in snaps]
    test = accuracy(r["adapter"], "test", args.eval_n)
    curve.append([round(r["train_s"], 1), test])
    val = accuracy(r["adapter"], "validation", args.eval_n) if seed == 0 else None
    return {"arm": arm, "lr": lr, "seed": seed, "budget_s": args.budget, **r, "test": test, "val": val,
            "curve": curve, "eval_n": args.eval_n, "wall_s": round(time.perf_counter() - t, 1),
            "load": round(os.getloadavg()[0], 2)}


def chosen_lr(rows: list[dict], arm: str) -> float | None:
    """The grid's lr with the best seed-0 validation accuracy (ties: the first in the grid)."""
    val = {r["lr"]: r["val"] for r in rows if r["arm"] == arm and r["seed"] == 0}
    if any(lr not in val for lr in GRID[arm]):
        return None
    return max(GRID[arm], key=lambda lr: (val[lr], -GRID[arm].index(lr)))


def summarise(rows: list[dict], base: float | None, seeds: list[int], plot: str | None) -> None:
    if base is not None:
        print(f"base model: {base:.1%} on the test split")
    finals = {}
    for arm in GRID:
        for r in rows:
            if r["arm"] == arm and r["seed"] == 0:
                print(f"  {arm:6s} lr {r['lr']:g}: validation {r['val']:.1%}, test {r['test']:.1%} "
                      f"({r['steps']} steps)")
        lr = chosen_lr(rows, arm)
        if lr is None:
            continue
        runs = [r for r in rows if r["arm"] == arm and r["lr"] == lr and r["seed"] in seeds]
        accs = [r["test"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        finals[arm] = (lr, runs)
        print(f"{arm:6s}: lr {lr:g} (chosen on validation); test {statistics.mean(accs):.1%} +- {sd:.1%} over "
              f"{len(accs)} seeds {[f'{a:.1%}' for a in accs]}")
    if plot and finals:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        names = {"rft": "RFT (GRPO), no demonstrations", "sft10": "SFT, 10 demonstrations",
                 "sft100": "SFT, 100 demonstrations"}
        for (arm, (lr, runs)), color in zip(finals.items(), ["tab:red", "tab:blue", "tab:green"]):
            for r in runs:
                xs, ys = [0.0] + [c[0] for c in r["curve"]], [base or 0.0] + [c[1] for c in r["curve"]]
                ax.plot(xs, ys, color=color, alpha=0.3, lw=1)
            k = min(len(r["curve"]) for r in runs)
            xs = [0.0] + [statistics.mean(r["curve"][i][0] for r in runs) for i in range(k)]
            ys = [base or 0.0] + [statistics.mean(r["curve"][i][1] for r in runs) for i in range(k)]
            ax.plot(xs, ys, color=color, lw=2.2, marker="o", label=f"{names[arm]} (lr {lr:g}, {len(runs)} seeds)")
        ax.set_xlabel("training seconds (2-core CPU, fp32)")
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title("2-digit additions, SmolLM2-135M-Instruct: RFT vs SFT at equal wall time")
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        print(f"plot: {plot}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per run")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--eval-n", type=int, default=200, help="problems per evaluation (test and validation)")
    ap.add_argument("--arms", default="rft,sft10,sft100")
    ap.add_argument("--results", default="runs/rft_vs_sft.jsonl")
    ap.add_argument("--work", default="runs/rft_vs_sft", help="folders of the runs (adapters, snapshots)")
    ap.add_argument("--plot", default=None, help="accuracy-vs-time PNG")
    ap.add_argument("--quick", action="store_true", help="smoke: 15 s budgets, seed 0, 8 problems, one lr per arm")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.seeds, args.eval_n = 15.0, [0], 8
        for arm in GRID:
            GRID[arm] = GRID[arm][:1]
    arms = args.arms.split(",")
    results = Path(args.results)
    rows = load_rows(results)
    print(f"machine: CPU, {os.cpu_count()} cores, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}; "
          f"budget {args.budget:.0f} s, seeds {args.seeds}, {args.eval_n} problems; {len(rows)} rows in {results}",
          flush=True)

    def append(row: dict) -> None:
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "adapter"}), flush=True)

    if not any(r.get("arm") == "base" for r in rows):
        append({"arm": "base", "test": accuracy(None, "test", args.eval_n), "eval_n": args.eval_n})
    base = next(r["test"] for r in rows if r["arm"] == "base")
    runs = [r for r in rows if r["arm"] != "base"]
    have = {(r["arm"], r["lr"], r["seed"]) for r in runs}
    for arm in arms:                                  # 1. the grid, seed 0, chosen on validation
        for lr in GRID[arm]:
            if (arm, lr, 0) not in have:
                runs.append(run(arm, lr, 0, args))
                append(runs[-1])
    for arm in arms:                                  # 2. the chosen lr, the other seeds
        lr = chosen_lr(runs, arm)
        for seed in args.seeds:
            if (arm, lr, seed) not in have and seed != 0:
                runs.append(run(arm, lr, seed, args))
                append(runs[-1])
    summarise(runs, base, args.seeds, args.plot)


if __name__ == "__main__":
    main()
