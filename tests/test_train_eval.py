"""Evaluation during training: `rft train --eval-every N` logs validation rows and keeps as adapter-best/ the
adapter of the step with the highest logged validation accuracy (checked against a snapshot of the LoRA
tensors taken at every step); the evaluation is the same as `evaluate` on the live adapter; the run ends with
summary.png and report.md."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rftkit.evaluate import evaluate
from rftkit.grpo import GRPOConfig, train
from rftkit.lora import lora_state
from rftkit.train_eval import BestAdapter
from tests.conftest import grpo_config, grpo_setup


def even_bytes(completion: str, sample: dict) -> float:
    """1 for completions whose bytes sum to an even number: an accuracy that moves on a random model."""
    return float(sum(completion.encode()) % 2 == 0)


def _snapshot(model) -> dict:
    return {m: (A.detach().clone(), B.detach().clone()) for m, (A, B) in lora_state(model).items()}


def test_eval_every_logs_rows_and_keeps_the_best_validation_adapter(tmp_path, tok_dir):
    model, tok, task = grpo_setup(tok_dir)
    task.default_reward = even_bytes
    snaps = {}
    result = train(grpo_config(tmp_path, steps=12, eval_every=2, eval_n=24, lr=0.1), model, tok, task,
                   progress=False, on_step=lambda step, row: snaps.__setitem__(step, _snapshot(model)))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12]
    for r in evals:
        assert r["eval/n"] == 24 and r["eval/split"] == "validation"
        for key in ("eval/reward/task", "eval/completion_len", "eval/truncated_frac", "eval/seconds", "time"):
            assert key in r, key
        assert 0 < r["eval/completion_len"] <= 6 and 0 <= r["eval/truncated_frac"] <= 1
    accs = [r["eval/accuracy"] for r in evals]
    assert len(set(accs)) > 1, accs                  # the choice is not a tie between equal scores
    best_step = evals[accs.index(max(accs))]["step"]  # the first of the highest
    info = json.loads((tmp_path / "adapter-best" / "best.json").read_text())
    assert info == {"step": best_step, "metric": "eval/accuracy", "value": max(accs)} == result["best"]
    saved = load_file(str(tmp_path / "adapter-best" / "adapter_model.safetensors"))
    snap = snaps[best_step]
    assert len(saved) == 2 * len(snap)
    for m, (A, B) in snap.items():
        assert torch.equal(saved[f"base_model.model.{m}.lora_A.weight"], A), m
        assert torch.equal(saved[f"base_model.model.{m}.lora_B.weight"], B), m
    if best_step != 12:                              # the final adapter is another one
        final = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert any(not torch.equal(final[k], saved[k]) for k in saved)
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    report = (tmp_path / "report.md").read_text()
    assert f"Chosen adapter: `adapter-best/` from step {best_step}" in report
    assert report.count("| validation |") == 0 and "| 12 |" in report


def test_the_logged_accuracy_is_evaluate_on_the_live_adapter(tmp_path, tok_dir):
    model, tok, task = grpo_setup(tok_dir)
    task.default_reward = even_bytes
    train(grpo_config(tmp_path, steps=3, eval_every=3, eval_n=16, lr=0.1), model, tok, task, progress=False)
    row = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    ref = evaluate(model, tok, task, "validation", 16, max_tokens=6, progress=False)
    assert row["eval/accuracy"] == ref["accuracy"] and row["eval/completion_len"] == ref["completion_len"]
    assert row["eval/reward/task"] == pytest.approx(ref["rewards"]["task"])


def test_best_adapter_swap_keeps_one_whole_folder_and_ties_keep_the_earlier(tmp_path, tok_dir):
    model, _, _ = grpo_setup(tok_dir)
    from rftkit.lora import LoRAConfig, apply_lora
    apply_lora(model, LoRAConfig(r=2))
    best = BestAdapter(tmp_path / "adapter-best", "tiny")
    assert best.offer(model, 1, 0.5) and not best.offer(model, 2, 0.5) and not best.offer(model, 3, 0.4)
    assert json.loads((tmp_path / "adapter-best" / "best.json").read_text())["step"] == 1
    (tmp_path / ".adapter-best.old-99").mkdir()       # a swap killed after moving the old one aside ...
    (tmp_path / "adapter-best").rename(tmp_path / ".adapter-best.old-99x")
    (tmp_path / ".adapter-best.old-99").rmdir()
    (tmp_path / ".adapter-best.tmp-7").mkdir()       # ... before its new folder arrived
    again = BestAdapter(tmp_path / "adapter-best", "tiny")
    assert (again.step, again.value) == (1, 0.5) and not (tmp_path / ".adapter-best.tmp-7").exists()
    loss = BestAdapter(tmp_path / "loss-best", "tiny", metric="eval_loss", higher=False)
    assert loss.offer(model, 1, 2.0) and loss.offer(model, 2, 1.5) and not loss.offer(model, 3, 1.7)


def test_bad_eval_settings_are_refused():
    with pytest.raises(ValueError, match="eval_every must be >= 0, got -1"):
        GRPOConfig(eval_every=-1)
    with pytest.raises(ValueError, match="eval_n must be >= 1, got 0"):
        GRPOConfig(eval_n=0)


def test_sft_keeps_the_best_by_eval_loss_or_task_accuracy_and_writes_the_summary(tmp_path, tiny_folder):
    from rftkit.sft import SFTConfig
    from rftkit.sft import train as sft_train
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {a}?", "completion": str(2 * a)}) + "\n"
                            for a in range(10, 30)))
    kw = dict(data=str(data), model=str(tiny_folder), eval_fraction=0.2, eval_every=2, steps=6, batch_size=4,
              micro_batch=4, lr=1e-2, lora_r=4, checkpoint_every=100, device="cpu")
    result = sft_train(SFTConfig(output=str(tmp_path / "loss"), **kw), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "loss" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(losses) == [2, 4, 6]
    step = min(losses, key=lambda s: (losses[s], s))
    assert result["best"] == {"step": step, "metric": "eval_loss", "value": losses[step]}
    for name in ("summary.png", "report.md", "adapter-best/adapter_model.safetensors", "adapter-best/best.json"):
        assert (tmp_path / "loss" / name).is_file(), name
    assert f"from step {step} (eval_loss" in (tmp_path / "loss" / "report.md").read_text()

    result = sft_train(SFTConfig(output=str(tmp_path / "acc"), eval_task="arithmetic", eval_n=6, eval_max_tokens=4,
                                 **kw), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and all(r["eval/n"] == 6 for r in evals)
    assert result["best"]["metric"] == "eval/accuracy"
    assert result["best"]["value"] == max(r["eval/accuracy"] for r in evals)


def test_demo_evaluates_on_validation_ships_the_best_adapter_and_reports_its_step(tmp_path, tiny_folder, capsys):
    from rftkit.demo import DemoConfig, run_demo
    from rftkit.loading import load
    from rftkit.lora import load_lora
    from rftkit.tasks import arithmetic
    out = tmp_path / "demo"
    assert run_demo(DemoConfig(model=str(tiny_folder), output=str(out), time_budget=3, eval_n=8, val_n=8,
                               eval_every=1, prompts_per_step=2, group_size=2, train_max_tokens=4)) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals and all(r["eval/split"] == "validation" for r in evals)
    best = json.loads((out / "adapter-best" / "best.json").read_text())
    assert best["value"] == max(r["eval/accuracy"] for r in evals)
    report = json.loads((out / "report.json").read_text())
    assert report["adapter_step"] == best["step"] and report["adapter"].endswith("adapter-best")
    model, tok = load(str(tiny_folder))                  # the table's RFT row is the shipped adapter on test
    load_lora(model, out / "adapter-best")
    assert evaluate(model, tok, arithmetic(), "test", 8, max_tokens=32, progress=False)["accuracy"] == report["after"]
    assert f"from step {best['step']} of" in capsys.readouterr().out
    assert (out / "summary.png").is_file() and "| RFT |" in (out / "report.md").read_text()


def test_rft_train_eval_every_from_the_command_line_logs_rows_and_writes_adapter_best(tmp_path, tiny_folder, capsys):
    from rftkit.cli import main
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_folder), "--output", str(out), "--steps", "4", "--eval-every", "2",
                 "--eval-n", "6", "--prompts-per-step", "2", "--group-size", "2", "--max-tokens", "4",
                 "--lora-r", "2"]) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [2, 4]
    best = json.loads((out / "adapter-best" / "best.json").read_text())
    assert best["value"] == max(r["eval/accuracy"] for r in rows if "eval/accuracy" in r)
    assert f"best on validation: step {best['step']}" in capsys.readouterr().out
    assert (out / "summary.png").is_file() and (out / "report.md").is_file()
