"""`rft demo`: reinforcement fine-tuning of the embedded SmolLM2-135M-Instruct on 2-digit additions.

    rft demo                     # evaluate, train for the time budget, evaluate again, save the adapter

Pinned so that its number means something: operands 10–99; the prompt "What is {a} + {b}? Answer with just
the number." through the model's chat template (its default system prompt, then the generation prompt);
evaluation greedy, at most 32 new tokens, on held-out problems (the task's test split, which training never
sees); an answer counts when the last integer in the completion equals a + b. The only training signal is
that reward, through GRPO: no answer is ever shown to the model.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rftkit.grpo import GRPOConfig


@dataclass
class DemoConfig:
    output: str = "rft-demo"             # folder for the adapter, metrics, curve and report
    time_budget: float = 960.0           # seconds of training (the evaluations come on top)
    eval_n: int = 200                    # held-out problems evaluated before and after
    prompts_per_step: int = 8            # P prompts per step
    group_size: int = 8                  # G completions per prompt
    train_max_tokens: int = 32           # rollout length during training (evaluation uses 32)
    lr: float = 2e-4                     # adapter learning rate (chosen on the validation split)
    lora_r: int = 16                     # LoRA rank
    seed: int = 0                        # rollouts and LoRA init
    model: str | None = None             # None = the embedded smollm2-135m-instruct
    resume: bool = False                 # continue the run in output from its last checkpoint
    overwrite: bool = False              # replace the run already in output


def run_demo(cfg: DemoConfig) -> int:
    from rftkit.evaluate import evaluate
    from rftkit.grpo import train
    from rftkit.loading import load
    from rftkit.run_folder import prepare_output
    from rftkit.tasks import arithmetic
    from rftkit.metrics import MetricsLog, plot_curves
    from rftkit.preemption import StopRequest
    out = prepare_output(Path(cfg.output), cfg.resume, cfg.overwrite, "rft demo")
    t_start = time.perf_counter()
    model, tok = load(cfg.model)
    task = arithmetic(digits=2, ops="+")
    print(f"rft demo: {cfg.model or 'SmolLM2-135M-Instruct'} on 2-digit additions; {task.size('test')} held-out "
          f"problems, evaluating {cfg.eval_n} before and after {cfg.time_budget:.0f} s of GRPO")
    before = evaluate(model, tok, task, "test", cfg.eval_n, max_tokens=32)
    print(f"before: accuracy {before['accuracy']:.1%} ({before['seconds']:.0f} s)")
    gcfg = GRPOConfig(model=cfg.model, task="arithmetic", output=str(out), steps=0, time_budget=cfg.time_budget,
                      prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                      max_tokens=cfg.train_max_tokens, lr=cfg.lr, lora_r=cfg.lora_r, lora_alpha=2.0 * cfg.lora_r,
                      seed=cfg.seed, checkpoint_every=10**9, resume=cfg.resume)
    result = train(gcfg, model, tok, task)
    if result.get("stopped"):       # SIGTERM: the checkpoint is saved; `rft demo --resume` continues
        return StopRequest.EXIT_STATUS
    after = evaluate(model, tok, task, "test", cfg.eval_n, max_tokens=32)
    total = time.perf_counter() - t_start
    # results first (the adapter is already saved by train): the plot below only draws what is written here
    report = {"before": before["accuracy"], "after": after["accuracy"], "eval_n": cfg.eval_n,
              "train_steps": result["steps"], "train_seconds": result["seconds"], "total_seconds": total,
              "config": vars(cfg)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    for name, res in (("before", before), ("after", after)):
        with open(out / f"eval_{name}.jsonl", "w") as f:
            for row in res["rows"]:
                f.write(json.dumps(row) + "\n")
    print()
    print(f"| {'':8} | accuracy on {cfg.eval_n} held-out problems |")
    print(f"|----------|{'-' * 36}|")
    print(f"| base     | {before['accuracy']:>35.1%} |")
    print(f"| RFT      | {after['accuracy']:>35.1%} |")
    print(f"\n{result['steps']} GRPO steps in {result['seconds']:.0f} s; whole demo {total / 60:.1f} min. "
          f"Adapter: {out / 'adapter'} (PEFT format); report: {out / 'report.json'}")
    curve = plot_curves(MetricsLog(out / "metrics.jsonl").read(), "time", ["reward"], out / "reward.png",
                        title="rft demo: mean training reward (sampled, T=1) vs training seconds",
                        hlines={f"held-out greedy accuracy before ({before['accuracy']:.1%})": before["accuracy"],
                                f"held-out greedy accuracy after ({after['accuracy']:.1%})": after["accuracy"]})
    if curve is not None:
        print(f"curve: {curve}")
    return 0
