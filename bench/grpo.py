"""One GRPO step: ours (`rftkit.grpo`) vs TRL's `GRPOTrainer`, on the embedded SmolLM2-135M-Instruct, in one run.

    python bench/grpo.py                     # 5 steps each, median of steps 2-5 (several minutes: TRL ~40 s/step)
    python bench/grpo.py --quick             # a smoke run: 2 steps of 16-token completions, median of step 2

Both sides: the same prompts in the same order (2-digit additions from the arithmetic task's train split, 2
per step through the model's chat template), G = 8 completions each = 16 per step, every completion forced to
exactly --tokens tokens (ours: ignore_eos; TRL: min_new_tokens = max_completion_length), sampling at T = 1,
PEFT LoRA r=16 alpha=32 all-linear (ours: rftkit.lora, same targets), fp32 (bf16=False), gradient
checkpointing off, beta = 0 (no reference model), num_iterations = 1, loss "dapo", clip 0.2 / 0.28, the same
last-integer reward, AdamW lr 2e-4. Ours keeps every group (dynamic sampling off), as TRL computes the loss
on all of them. A step = generate + score + forward + backward + optimizer step, timed by the trainers'
own step boundaries (ours: the `step_s` it logs; TRL: on_step_begin/on_step_end callbacks, which enclose its
generation). Our step's split comes from the timers our trainer logs every step (gen_s, reward_s,
forward_s, backward_s, optim_s); "other" is the rest (batch assembly, logging).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu  # noqa: E402

P, G = 2, 8                      # prompts per step x completions per prompt = 16 completions


def prompts(n_steps: int) -> list[dict]:
    """The samples our trainer draws for steps 0..n-1 (task.sample("train", step * P + i, seed=0))."""
    from rftkit.tasks import arithmetic
    task = arithmetic()
    return [task.sample("train", k, seed=0) for k in range(n_steps * P)]


def ours(args, out: Path) -> list[dict]:
    from rftkit.grpo import GRPOConfig, train
    rows: list[dict] = []
    cfg = GRPOConfig(task="arithmetic", output=str(out), steps=args.steps, prompts_per_step=P, group_size=G,
                     max_tokens=args.tokens, ignore_eos=True, temperature=1.0, lr=2e-4, warmup_steps=1,
                     lora_r=16, lora_alpha=32.0, loss_type="dapo", eps_low=0.2, eps_high=0.28, beta=0.0,
                     iterations=1, dynamic_sampling=False, mask_truncated=False, micro_batch_groups=P,
                     checkpoint_every=10**6, seed=0, log_samples=0)
    train(cfg, progress=False, on_step=lambda step, row: rows.append(row))
    bad = [r["completion_len"] for r in rows if r["completion_len"] != args.tokens]
    if bad:
        raise RuntimeError(f"ours: completions were not all {args.tokens} tokens: mean lengths {bad}")
    return rows


def trl(args, out: Path) -> list[dict]:
    import datasets
    import peft
    import transformers
    import trl as trl_lib
    from rftkit.loading.embedded import ensure_embedded
    from rftkit.rewards import last_integer
    folder = str(ensure_embedded())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    data = [{"prompt": s["messages"], "answer": s["answer"]} for s in prompts(args.steps)]
    ds = datasets.Dataset.from_list(data)

    def reward(completions, answer, **kw):
        return [last_integer(c[0]["content"], {"answer": a}) for c, a in zip(completions, answer)]

    marks: dict[str, list] = {"begin": [], "end": [], "logs": []}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            marks["begin"].append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            marks["end"].append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs:
                marks["logs"].append(dict(logs))

    cfg = trl_lib.GRPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=P * G,
                             gradient_accumulation_steps=1, num_generations=G, max_completion_length=args.tokens,
                             generation_kwargs={"min_new_tokens": args.tokens}, temperature=1.0, learning_rate=2e-4,
                             warmup_steps=1, beta=0.0, num_iterations=1, loss_type="dapo", epsilon=0.2,
                             epsilon_high=0.28, scale_rewards="group", mask_truncated_completions=False,
                             bf16=False, fp16=False, gradient_checkpointing=False, shuffle_dataset=False,
                             logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl_lib.GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=ds,
                                  processing_class=tok, peft_config=lora, callbacks=[Timer()])
    trainer.train()
    steps = [e - b for b, e in zip(marks["begin"], marks["end"])]
    lengths = [l["completions/mean_length"] for l in marks["logs"] if "completions/mean_length" in l]
    if len(steps) != args.steps or any(abs(x - args.tokens) > 1e-6 for x in lengths):
        raise RuntimeError(f"TRL: {len(steps)} steps timed (want {args.steps}); completion lengths {lengths}")
    return [{"step": i + 1, "step_s": s} for i, s in enumerate(steps)]


def summarise(args, results: dict) -> None:
    timed = slice(1, args.steps)                                           # steps 2..N
    med = {name: statistics.median(r["step_s"] for r in rows[timed]) for name, rows in results.items()}
    load = os.getloadavg()
    for name, rows in results.items():
        print(f"{name:5s}: step times {[round(r['step_s'], 2) for r in rows]} s; median of steps 2-{args.steps}: "
              f"{med[name]:.2f} s")
    if "ours" in results:
        rows = results["ours"][timed]
        parts = {k: statistics.median(r[k] for r in rows) for k in ("gen_s", "reward_s", "forward_s", "backward_s",
                                                                       "optim_s")}
        total = statistics.median(r["step_s"] for r in rows)
        parts["other"] = max(0.0, total - sum(parts.values()))
        names = {"gen_s": "generation", "reward_s": "rewards", "forward_s": "forward", "backward_s": "backward",
                 "optim_s": "optimizer", "other": "other"}
        print("ours, share of the median step: " + ", ".join(f"{names[k]} {v / total:.0%} ({v:.2f} s)"
                                                           for k, v in parts.items()))
        print("ours, per step (generation / forward / backward s): " + "; ".join(
            f"{r['gen_s']:.2f} / {r['forward_s']:.2f} / {r['backward_s']:.2f}" for r in results["ours"]))
        tok_s = statistics.median(P * G * args.tokens / r["gen_s"] for r in rows)
        print(f"ours, rollout throughput: {tok_s:.0f} generated tokens/s")
    if len(med) == 2:
        ratio = med["trl"] / med["ours"]
        print(f"speed-up ours vs TRL: {ratio:.2f}x ({'meets' if ratio >= 3.0 else 'misses'} the 3x target of issue 30) "
              f"(load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5, help="steps per side; the first is not timed")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per completion (forced)")
    ap.add_argument("--only", choices=["ours", "trl"], default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps of 16-token completions")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.tokens = 2, 16
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (step 1 is not timed), got {args.steps}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu()
    print(f"machine: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"setting: SmolLM2-135M-Instruct fp32, LoRA r16 all-linear, {P} prompts x G={G} = {P * G} completions "
          f"of exactly {args.tokens} tokens, beta 0, 1 iteration, loss dapo, {args.steps} steps per side")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("ours", ours), ("trl", trl)):
            if args.only in (None, name):
                torch.manual_seed(0)
                t = time.perf_counter()
                results[name] = fn(args, Path(tmp) / name)
                print(f"{name}: {args.steps} steps in {time.perf_counter() - t:.0f} s (load {os.getloadavg()[0]:.2f})",
                      flush=True)
    summarise(args, results)


if __name__ == "__main__":
    main()
