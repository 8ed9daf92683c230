"""RFT quality at equal wall time: ours (`rftkit.grpo`, the `rft demo` settings) vs TRL's `GRPOTrainer`, several
seeds each, every adapter scored by one and the same held-out evaluation.

    python bench/rft_vs_trl.py --budget 1200 --seeds 0,1 --results runs/rft_vs_trl.jsonl
    python bench/rft_vs_trl.py --quick --results /tmp/rvt.jsonl        # smoke: 20 s budgets, 1 seed, 8 problems

Task: 2-digit additions (operands 10-99), the `rft demo` prompt through the chat template; both trainers draw
the same prompts in the same order (our task's train split, seeded stream `task.sample("train", k, seed)`;
TRL's dataset is that stream, unshuffled). Reward: the last integer of the completion equals a + b (the
verifier knows the answer; no answer is shown to either model).
  ours: rftkit defaults of `rft demo` — P=8 prompts x G=8, <= 32 tokens, lr 2e-4, LoRA r16 alpha 32 all-linear.
  TRL:  the issue's peer — PEFT LoRA r16 alpha 32 all-linear, lr 2e-4 (constant after 3 warm-up steps, as
        ours under a time budget), 16 completions (2 prompts x G=8) of <= 32 tokens per step, bf16=False,
        otherwise TRL's defaults (beta 0, loss dapo, T=1).
Each run trains until its training wall clock reaches --budget seconds (checked after every step: both may
overshoot by one step; the table shows the real seconds), saves its adapter in PEFT format, and is then
evaluated by `rftkit.evaluate.evaluate` on --eval-n problems of the held-out test split, greedy, <= 32 new
tokens (TRL's adapter is loaded into our model with `load_lora`, which reads PEFT's format).

Resumable: every finished run (and the base model's evaluation) is appended to --results as one JSON line;
a rerun skips the (system, seed) pairs already there. The summary prints mean +- std per system and whether
our mean beats TRL's by more than the spread (max - min) between seeds of either.
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


def done_runs(path: Path) -> dict[tuple[str, int], dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return {(r["system"], r["seed"]): r for r in rows}


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def held_out(adapter: str | None, args) -> float:
    """The one evaluation every adapter gets: our engine, greedy, <= 32 tokens, test split, last-integer rule."""
    from rftkit.evaluate import evaluate
    from rftkit.loading import load
    from rftkit.lora import load_lora
    from rftkit.tasks import arithmetic
    model, tok = load(None)
    if adapter is not None:
        load_lora(model, adapter)
    return evaluate(model, tok, arithmetic(), "test", args.eval_n, max_tokens=32, progress=False)["accuracy"]


def train_ours(seed: int, out: Path, args) -> dict:
    from rftkit.demo import DemoConfig
    from rftkit.grpo import GRPOConfig, train
    d = DemoConfig()
    cfg = GRPOConfig(task="arithmetic", output=str(out), steps=0, time_budget=args.budget,
                     prompts_per_step=d.prompts_per_step, group_size=d.group_size, max_tokens=d.train_max_tokens,
                     lr=d.lr, lora_r=d.lora_r, lora_alpha=2.0 * d.lora_r, seed=seed, checkpoint_every=10**9)
    result = train(cfg, progress=False)
    return {"steps": result["steps"], "train_s": result["seconds"], "adapter": result["adapter"]}


def budget_callback(budget: float, clock: dict):
    """A TrainerCallback that stops TRL once its steps (their own time, from step begin to step end) add up to
    `budget` seconds; it counts them in clock["train_s"] and clock["steps"]."""
    import transformers

    class Budget(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            clock["train_s"] += time.perf_counter() - clock["t0"]
            clock["steps"] += 1
            if clock["train_s"] >= budget:
                control.should_training_stop = True
    return Budget()


def train_trl(seed: int, out: Path, args) -> dict:
    import datasets
    import peft
    import transformers
    import trl as trl_lib
    from rftkit.loading.embedded import ensure_embedded
    from rftkit.rewards import last_integer
    from rftkit.tasks import arithmetic
    folder = str(ensure_embedded())
    transformers.set_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    task = arithmetic()
    stream = [task.sample("train", k, seed=seed) for k in range(task.size("train"))]
    ds = datasets.Dataset.from_list([{"prompt": s["messages"], "answer": s["answer"]} for s in stream])

    def reward(completions, answer, **kw):
        return [last_integer(c[0]["content"], {"answer": a}) for c, a in zip(completions, answer)]

    clock = {"train_s": 0.0, "steps": 0}

    cfg = trl_lib.GRPOConfig(output_dir=str(out / "trl"), max_steps=10**6, per_device_train_batch_size=16,
                             num_generations=8, max_completion_length=32, learning_rate=2e-4,
                             lr_scheduler_type="constant_with_warmup", warmup_steps=3, bf16=False, fp16=False,
                             gradient_checkpointing=False, shuffle_dataset=False, logging_steps=10,
                             report_to="none", save_strategy="no", seed=seed, disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl_lib.GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=ds,
                                  processing_class=tok, peft_config=lora,
                                  callbacks=[budget_callback(args.budget, clock)])
    trainer.train()
    adapter = out / "adapter"
    trainer.model.save_pretrained(str(adapter))
    return {"steps": clock["steps"], "train_s": clock["train_s"], "adapter": str(adapter)}


def summarise(rows: dict) -> None:
    by = {}
    for (system, seed), r in sorted(rows.items()):
        if system != "base":
            by.setdefault(system, []).append(r["accuracy"])
    if ("base", -1) in rows:
        print(f"base model: {rows[('base', -1)]['accuracy']:.1%}")
    for system, accs in by.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        print(f"{system:5s}: {statistics.mean(accs):.1%} +- {sd:.1%} over {len(accs)} seeds {[f'{a:.1%}' for a in accs]}")
    if len(by.get("ours", [])) >= 2 and len(by.get("trl", [])) >= 2:
        gap = statistics.mean(by["ours"]) - statistics.mean(by["trl"])
        spread = max(max(a) - min(a) for a in by.values())
        print(f"ours - TRL = {gap:+.1%}; largest spread between seeds {spread:.1%}: "
              f"{'ours higher by more than the spread' if gap > spread else 'NOT higher by more than the spread'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=1200.0, help="training seconds per run")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    ap.add_argument("--eval-n", type=int, default=200, help="held-out test problems per evaluation")
    ap.add_argument("--systems", default="ours,trl")
    ap.add_argument("--results", default="runs/rft_vs_trl.jsonl")
    ap.add_argument("--work", default="runs/rft_vs_trl", help="folders of the runs (adapters)")
    ap.add_argument("--quick", action="store_true", help="smoke: 20 s budgets, seed 0, 8 problems")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.seeds, args.eval_n = 20.0, [0], 8
    results, work = Path(args.results), Path(args.work)
    rows = done_runs(results)
    print(f"machine: CPU, {os.cpu_count()} cores, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}; "
          f"budget {args.budget:.0f} s, seeds {args.seeds}, {args.eval_n} held-out problems; "
          f"{len(rows)} results already in {results}")
    if ("base", -1) not in rows:
        rows[("base", -1)] = {"system": "base", "seed": -1, "accuracy": held_out(None, args), "eval_n": args.eval_n,
                              "load": os.getloadavg()[0]}
        append(results, rows[("base", -1)])
    trainers = {"ours": train_ours, "trl": train_trl}
    for seed in args.seeds:
        for system in args.systems.split(","):
            if (system, seed) in rows:
                continue
            out = work / f"{system}-s{seed}"
            t = time.perf_counter()
            run = trainers[system](seed, out, args)
            acc = held_out(run["adapter"], args)
            rows[(system, seed)] = {"system": system, "seed": seed, "accuracy": acc, "eval_n": args.eval_n,
                                    "budget_s": args.budget, **run, "wall_s": round(time.perf_counter() - t, 1),
                                    "load": round(os.getloadavg()[0], 2)}
            append(results, rows[(system, seed)])
    summarise(rows)


if __name__ == "__main__":
    main()
