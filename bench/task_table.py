"""RFT across tasks (issue 27, acceptance 4): base vs RFT accuracy of the embedded SmolLM2-135M-Instruct on
held-out problems of many tasks, each trained for the same wall time with a recipe and no per-task tuning
beyond it; TRL's GRPOTrainer at equal wall time on some of them.

    OMP_NUM_THREADS=1 python bench/task_table.py --budget 900                    # every row, in ROWS order
    python bench/task_table.py --rows countdown,rg-chain_sum --budget 900         # some rows
    python bench/task_table.py --quick --results /tmp/tt.jsonl --rows countdown   # smoke: 20 s, 8 problems
    python bench/task_table.py --rescore --rows rg-chain_sum                      # evaluate a finished row again
    python bench/task_table.py --table                                            # the results as markdown
    python bench/task_table.py --plot docs/img/task_table.png                     # and as bars

Each row: evaluate the base model (greedy, --eval-n problems of the task's test split, the row's max_tokens),
train by GRPO for --budget seconds of training (rollouts + updates; evaluations not counted) with the row's
recipe, evaluate the last adapter on the same problems the same way, append one JSON line to --results with
the steps done, the seconds, `uptime`'s load before and after, the CPU model and the date. Resumable: rows
already in --results are skipped, and a run cut off mid-training continues from its checkpoint (--resume).
The machine is shared: a row trained under load gets fewer steps, so each row records its steps and load.
OMP_NUM_THREADS=1: on the 2-core machine at load ~11, 32 countdown problems x 32 tokens took 55 s with one thread
and 313 s with two (a parallel region waits for both threads to be scheduled).

Correct means the task's own scorer gives 1: countdown's expression check, reasoning-gym's `score_answer` on the
answer in <answer> tags, all fields equal for JSON extraction (schema validity is recorded beside it), every
unit test passing for code. The format and field rewards of a recipe shape training only. Beside accuracy, each
evaluation counts its distinct replies, and each row the accuracy of always giving the most common reference
answer: a policy that collapses to one answer reaches that bar without solving anything.

TRL rows (`trl-*`) use bench/rft_vs_trl.py's set-up (PEFT LoRA r16 alpha 32 all-linear, lr 2e-4, 2 prompts x
G=8 per step, TRL's defaults otherwise) with the row's max_tokens and the same rewards and weights as ours,
and the same budget, measured the same way (training steps only); the adapter is scored by our evaluation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu  # noqa: E402

RG = "recipes/reasoning_gym.yaml"
# id -> (recipe, overrides of the recipe, how the held-out test split is made). In the order that tells the most
# first: countdown and reasoning-gym tasks of different kinds, then JSON and code, then TRL on two of them.
ROWS = {
    "countdown": ("recipes/countdown.yaml", {}, None),
    "rg-chain_sum": (RG, {"task": "rg:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2"}, None),
    "rg-letter_counting": (RG, {"task": "rg:letter_counting:min_words=1,max_words=3"}, None),
    "rg-leg_counting": (RG, {"task": "rg:leg_counting:min_animals=1,max_animals=2"}, None),
    "rg-spell_backward": (RG, {"task": "rg:spell_backward:max_word_len=4"}, None),
    "rg-basic_arithmetic": (RG, {"task": "rg:basic_arithmetic:min_terms=2,max_terms=2,min_digits=1,max_digits=2"},
                            None),
    "rg-syllogism": (RG, {"task": "rg:syllogism:invalid_ratio=0.5"}, None),      # logic; half the answers "No"
    "json_extraction": ("recipes/json_extraction.yaml", {}, "json"),
    "code": ("recipes/code.yaml", {}, "code"),
    "trl-countdown": ("recipes/countdown.yaml", {}, None),
    "trl-rg-chain_sum": (RG, {"task": "rg:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2"}, None),
}


def machine() -> dict:
    import torch
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "uptime": uptime}


def json_test_rows(n: int, seed: int = 1) -> list[dict]:
    """Held-out JSON-extraction rows in the recipe's format: names, ages and cities that recipes/data never uses."""
    first = ["Maya", "Omar", "Lena", "Ravi", "Sofia", "Tomas", "Ines", "Kenji", "Amara", "Pavel", "Zoe", "Hugo"]
    last = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Castillo", "Novak", "Haddad", "Brennan", "Iyer", "Keller"]
    cities = ["Lisbon", "Nairobi", "Osaka", "Montreal", "Krakow", "Lima", "Dublin", "Hanoi", "Tunis", "Oslo"]
    forms = ["{name}, aged {age}, lives in {city}.", "{name} is {age} years old and lives in {city}.",
             "Living in {city}, {name} turned {age} this year.", "{name} ({age}) moved to {city} last spring."]
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    rng, rows = random.Random(seed), []
    for _ in range(n):
        a = {"name": f"{rng.choice(first)} {rng.choice(last)}", "age": rng.randint(18, 90), "city": rng.choice(cities)}
        text = rng.choice(forms).format(**a)
        rows.append({"prompt": "Extract the person as JSON with keys name, age (an integer) and city. Reply with the "
                               f"JSON object only.\nText: {text}", "schema": schema, "answer": a})
    return rows


def test_task(kind: str | None, cfg, work: Path, n: int):
    """The task whose test split every model of a row is scored on, and the rewards of that score ("task" decides)."""
    from rftkit.data import task_from_flags
    from rftkit.rewards import json_schema_valid, load_reward
    if kind is None:
        task, _ = task_from_flags(cfg.task, "arithmetic", None, None, None, [], 0.0, cfg.seed, need_answer=True)
        return task, {"task": task.default_reward}
    if kind == "json":
        path = work / "json_test.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in json_test_rows(n)))
        task, _ = task_from_flags("arithmetic", "arithmetic", cfg.data, None, str(path), [], 0.0, cfg.seed, True)
        return task, {"task": load_reward("recipes/rewards.py:fields_match"), "schema": json_schema_valid}
    if kind == "code":
        task, _ = task_from_flags("arithmetic", "arithmetic", cfg.data, None, "bench/data/code_test.jsonl", [], 0.0,
                                  cfg.seed, need_answer=False)
        return task, {"task": load_reward("code")}
    raise ValueError(f"unknown test split kind {kind!r}")


def score(adapter: str | None, task, rewards: dict, n: int, max_tokens: int) -> dict:
    """The one evaluation of a row: greedy through our engine, the first n test problems (seed 0)."""
    from rftkit.evaluate import evaluate
    from rftkit.loading import load
    from rftkit.lora import load_lora
    model, tok = load(None)
    if adapter is not None:
        load_lora(model, adapter)
    r = evaluate(model, tok, task, "test", min(n, task.size("test")), max_tokens=max_tokens, progress=False,
                 rewards=rewards)
    replies = [row["completions"][0] for row in r["rows"]]
    return {"accuracy": r["accuracy"], "n": r["n"], "rewards": r["rewards"], "completion_len": r["completion_len"],
            "truncated_frac": r["truncated_frac"], "distinct_replies": len(set(replies)), "examples": replies[:3]}


def constant_answer(task, n: int) -> float | None:
    """The accuracy of always giving the test split's most common reference answer (where answers are strings):
    the bar a policy that collapses to one answer clears without solving anything."""
    from collections import Counter
    answers = [p.get("answer") for p in task.samples("test", min(n, task.size("test")))]
    if not all(isinstance(a, (str, int)) for a in answers):
        return None
    return Counter(map(str, answers)).most_common(1)[0][1] / len(answers)


def train_ours(cfg, budget: float) -> dict:
    from dataclasses import replace
    from rftkit.grpo import train
    out = Path(cfg.output)
    resume = (out / "checkpoints").is_dir()
    cfg = replace(cfg, steps=0, time_budget=budget, eval_every=0, resume=resume, overwrite=not resume,
                  checkpoint_every=10)
    r = train(cfg, progress=False)
    if r.get("stopped"):                # SIGTERM: the checkpoint is kept; a rerun resumes this row
        raise SystemExit(f"stopped by SIGTERM after step {r['steps']}; rerun the same command to resume")
    return {"steps": r["steps"], "train_s": round(r["seconds"], 1), "adapter": r["adapter"]}


def train_trl(cfg, budget: float, task) -> dict:
    """TRL's GRPOTrainer with bench/rft_vs_trl.py's settings, on our train split's seeded stream."""
    import datasets
    import peft
    import torch
    import transformers
    import trl as trl_lib
    from rft_vs_trl import budget_callback
    from rftkit.loading.embedded import ensure_embedded
    from rftkit.rewards import load_reward
    folder = str(ensure_embedded())
    transformers.set_seed(cfg.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    stream = [task.sample("train", k, seed=cfg.seed) for k in range(min(task.size("train"), 20000))]
    ds = datasets.Dataset.from_list([{"prompt": s["messages"], "idx": k} for k, s in enumerate(stream)])
    parts = [(task.default_reward, 1.0)] + [(load_reward(spec), (cfg.reward_weights or [1.0] * len(cfg.reward))[i])
                                             for i, spec in enumerate(cfg.reward)]

    def reward(completions, idx, **kw):            # the samples themselves, not a JSON copy (rg entries hold tuples)
        return [sum(w * fn(c[0]["content"], stream[k]) for fn, w in parts) for c, k in zip(completions, idx)]

    clock = {"train_s": 0.0, "steps": 0}

    out = Path(cfg.output)
    args = trl_lib.GRPOConfig(output_dir=str(out / "trl"), max_steps=10**6, per_device_train_batch_size=16,
                              num_generations=8, max_completion_length=cfg.max_tokens, learning_rate=2e-4,
                              lr_scheduler_type="constant_with_warmup", warmup_steps=3, bf16=False, fp16=False,
                              gradient_checkpointing=False, shuffle_dataset=False, logging_steps=10,
                              report_to="none", save_strategy="no", seed=cfg.seed, disable_tqdm=True,
                              use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl_lib.GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds,
                                  processing_class=tok, peft_config=lora,
                                  callbacks=[budget_callback(budget, clock)])
    trainer.train()
    adapter = out / "adapter"
    trainer.model.save_pretrained(str(adapter))
    return {"steps": clock["steps"], "train_s": round(clock["train_s"], 1), "adapter": str(adapter)}


def table(results: Path) -> str:
    """The markdown table of docs/experiments.md, one line per row of --results (mean score: the task scorer's
    mean, partial credit included, where accuracy counts a score of 1; constant answer: see constant_answer)."""
    lines = ["| row | task | system | base | RFT | constant answer | distinct replies base -> RFT "
             "| mean score base -> RFT | test n | steps | train s | row wall s "
             "| machine, threads | load (1-min avg) before / after training | finished (UTC) |", "|---" * 15 + "|"]
    for r in map(json.loads, filter(str.strip, results.read_text().splitlines())):
        load = lambda up: up.split("load average:")[1].split(",")[0].strip()
        lines.append(f"| {r['row']} | `{r['task']}` | {r['system']} | {r['base']['accuracy']:.2f} | "
                     f"{r['rft']['accuracy']:.2f} | "
                     f"{'-' if r.get('constant_answer') is None else format(r['constant_answer'], '.2f')} | "
                     f"{r['base'].get('distinct_replies', '-')} -> {r['rft'].get('distinct_replies', '-')} | "
                     f"{r['base']['rewards']['task']:.3f} -> "
                     f"{r['rft']['rewards']['task']:.3f} | "
                     f"{r['rft']['n']} | {r['steps']} | {r['train_s']:.0f} | {r['wall_s']:.0f} | "
                     f"{r['cpu']}, {r['threads']} | "
                     f"{load(r['uptime_before'])} / {load(r['uptime_after_training'])} | {r['date'][:16]} |")
    return "\n".join(lines)


def plot(results: Path, path: Path) -> None:
    """Base vs RFT accuracy per row, as bars, with the constant-answer bar as a dashed line (docs/img/task_table.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in results.read_text().splitlines() if l.strip()]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 3.5))
    ax.bar([i - 0.2 for i in x], [r["base"]["accuracy"] for r in rows], 0.4, label="base")
    ax.bar([i + 0.2 for i in x], [r["rft"]["accuracy"] for r in rows], 0.4, label="after RFT")
    const = [(i, r["constant_answer"]) for i, r in zip(x, rows) if r.get("constant_answer") is not None]
    ax.hlines([c for _, c in const], [i - 0.45 for i, _ in const], [i + 0.45 for i, _ in const], colors="black",
              linestyles="dashed", label="always the most common answer")
    ax.set_xticks(list(x), [f"{r['row']}\n{r['steps']} steps" for r in rows], fontsize=8)
    ax.set_ylabel(f"held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def row_setup(rid: str, work: Path, n: int):
    """A row's recipe config (its run folder under `work`), its test task and the rewards it is scored by."""
    from rftkit.grpo import GRPOConfig
    from rftkit.recipe import read_recipe
    recipe, overrides, kind = ROWS[rid]
    cfg = GRPOConfig(**{**read_recipe(recipe, GRPOConfig), **overrides, "output": str(work / rid)})
    return (cfg, *test_task(kind, cfg, work, n))


def rescore(results: Path, ids: list[str], work: Path, n: int) -> None:
    """Evaluate again the rows of `ids` in --results, in place (the adapter each row recorded)."""
    rows = [json.loads(l) for l in results.read_text().splitlines() if l.strip()]
    for r in rows:
        if r["row"] not in ids:
            continue
        cfg, task, rewards = row_setup(r["row"], work, n)
        r["base"], r["rft"] = (score(a, task, rewards, n, cfg.max_tokens) for a in (None, r["adapter"]))
        r["constant_answer"] = constant_answer(task, n)
        print(f"[{r['row']}] base {r['base']['accuracy']:.3f} -> rft {r['rft']['accuracy']:.3f}; distinct replies "
              f"{r['base']['distinct_replies']} -> {r['rft']['distinct_replies']}", flush=True)
        results.write_text("".join(json.dumps(x) + "\n" for x in rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=900.0, help="training seconds per row")
    ap.add_argument("--eval-n", type=int, default=100, help="held-out test problems per evaluation")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"row ids, of {list(ROWS)}")
    ap.add_argument("--results", default="bench/results/task_table.jsonl")
    ap.add_argument("--work", default="runs/task_table", help="run folders (adapters, metrics)")
    ap.add_argument("--quick", action="store_true", help="smoke: 20 s budgets, 8 problems")
    ap.add_argument("--rescore", action="store_true",
                    help="evaluate the base model and the adapter of --rows already in --results again (no training), "
                         "filling in fields added since, e.g. distinct replies")
    ap.add_argument("--table", action="store_true", help="print --results as a markdown table and exit")
    ap.add_argument("--plot", help="draw --results as a bar chart into this PNG and exit")
    args = ap.parse_args()
    if args.table or args.plot:
        print(table(Path(args.results))) if args.table else plot(Path(args.results), Path(args.plot))
        return
    if args.quick:
        args.budget, args.eval_n = 20.0, 8
    results, work = Path(args.results), Path(args.work)
    ids = args.rows.split(",")
    unknown = [i for i in ids if i not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: use some of {list(ROWS)}")
    done = {json.loads(l)["row"] for l in results.read_text().splitlines() if l.strip()} if results.is_file() else set()
    if args.rescore:
        rescore(results, ids, work, args.eval_n)
        return
    print(f"{len(done)} rows already in {results}; budget {args.budget:.0f} s, {args.eval_n} test problems", flush=True)
    for rid in ids:
        if rid in done:
            continue
        recipe, overrides, _ = ROWS[rid]
        cfg, task, rewards = row_setup(rid, work, args.eval_n)
        before, t = machine(), time.perf_counter()
        print(f"[{rid}] {task.name}: base evaluation ({before['uptime']})", flush=True)
        base = score(None, task, rewards, args.eval_n, cfg.max_tokens)
        print(f"[{rid}] base {base['accuracy']:.3f}; training {args.budget:.0f} s", flush=True)
        run = train_trl(cfg, args.budget, task) if rid.startswith("trl-") else train_ours(cfg, args.budget)
        mid = machine()["uptime"]
        rft = score(run["adapter"], task, rewards, args.eval_n, cfg.max_tokens)
        row = {"row": rid, "system": "trl" if rid.startswith("trl-") else "ours", "task": task.name,
               "recipe": recipe, "overrides": overrides, "base": base, "rft": rft,
               "constant_answer": constant_answer(task, args.eval_n), "budget_s": args.budget, **run,
               "wall_s": round(time.perf_counter() - t, 1), "uptime_before": before["uptime"],
               "uptime_after_training": mid, "uptime_after": machine()["uptime"], "cpu": before["cpu"],
               "cores": before["cores"], "threads": before["threads"],
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{rid}] base {base['accuracy']:.3f} -> rft {rft['accuracy']:.3f} after {run['steps']} steps "
              f"({run['train_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
