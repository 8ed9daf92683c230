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
