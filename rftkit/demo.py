"""`rft demo`: reinforcement fine-tuning of the embedded SmolLM2-135M-Instruct on 2-digit additions.

    rft demo                     # evaluate, train for the time budget, evaluate again, save the adapter

Pinned so that its number means something: operands 10–99; the prompt "What is {a} + {b}? Answer with just
the number." through the model's chat template (its default system prompt, then the generation prompt);
evaluation greedy, at most 32 new tokens, on held-out problems (the task's test split, which training never
sees); an answer counts when the last integer in the completion equals a + b. The only training signal is
that reward, through GRPO: no answer is ever shown to the model.

During training the adapter is evaluated greedily on validation problems every `eval_every` steps (never on
the test split), and the best one is kept as `adapter-best/`: the demo evaluates that one on the test split
after training, ships it and says which step it came from (`adapter/` is the last step's). The run ends with
summary.png and report.md.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
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
    eval_every: int = 20                 # steps between greedy evaluations on validation problems during training;
                                         # the best adapter is the one shipped (0 = ship the last step's)
    val_n: int = 100                     # validation problems per evaluation during training
    report_to: list[str] = field(default_factory=list)   # also log to tensorboard, trackio, wandb, mlflow
    model: str | None = None             # None = the embedded smollm2-135m-instruct
    resume: bool = False                 # continue the run in output from its last checkpoint
    overwrite: bool = False              # replace the run already in output


def run_demo(cfg: DemoConfig) -> int:
    from rftkit.evaluate import evaluate
    from rftkit.grpo import train
    from rftkit.loading import load
    from rftkit.run_folder import prepare_output
    from rftkit.tasks import arithmetic
    from rftkit.lora import load_lora
    from rftkit.metrics import MetricsLog, plot_curves
    from rftkit.preemption import StopRequest
    from rftkit.run_summary import write_summary
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
                      seed=cfg.seed, checkpoint_every=10**9, resume=cfg.resume, eval_every=cfg.eval_every,
                      eval_n=cfg.val_n, report_to=cfg.report_to)
    result = train(gcfg, model, tok, task, summary=False)
    if result.get("stopped"):       # SIGTERM: the checkpoint is saved; `rft demo --resume` continues
        return StopRequest.EXIT_STATUS
    best = result["best"]
    shipped = out / ("adapter-best" if best else "adapter")
    if best:                        # the adapter to ship is the best on validation: evaluate that one
        load_lora(model, shipped)
    after = evaluate(model, tok, task, "test", cfg.eval_n, max_tokens=32)
    total = time.perf_counter() - t_start
    # results first (the adapter is already saved by train): the plot below only draws what is written here
    report = {"before": before["accuracy"], "after": after["accuracy"], "eval_n": cfg.eval_n,
              "train_steps": result["steps"], "train_seconds": result["seconds"], "total_seconds": total,
              "adapter": str(shipped), "adapter_step": best["step"] if best else result["steps"],
              "adapter_validation_accuracy": best["value"] if best else None, "config": vars(cfg)}
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
    chosen = (f"the best on {cfg.val_n} validation problems, from step {best['step']} of {result['steps']} "
              f"(validation accuracy {best['value']:.1%})" if best else f"the last step's ({result['steps']})")
    print(f"\n{result['steps']} GRPO steps in {result['seconds']:.0f} s; whole demo {total / 60:.1f} min. "
          f"Adapter: {shipped} (PEFT format), {chosen}; report: {out / 'report.md'}")
    rows = MetricsLog(out / "metrics.jsonl").read()
    table = [f"Held-out test split ({cfg.eval_n} problems, greedy), the shipped adapter `{shipped.name}/`, {chosen}:",
             "", "| model | test accuracy |", "|---|---|", f"| base | {before['accuracy']:.1%} |",
             f"| RFT | {after['accuracy']:.1%} |", "", f"Whole demo: {total / 60:.1f} min."]
    write_summary(out, "rft demo: GRPO on 2-digit additions", rows, best, extra=table)
    curve = plot_curves(rows, "time", ["reward"], out / "reward.png",
                        title="rft demo: mean training reward (sampled, T=1) vs training seconds",
                        hlines={f"held-out greedy accuracy before ({before['accuracy']:.1%})": before["accuracy"],
                                f"held-out greedy accuracy after ({after['accuracy']:.1%})": after["accuracy"]})
    if curve is not None:
        print(f"curve: {curve}")
    return 0
