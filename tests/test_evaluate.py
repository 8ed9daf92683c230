"""Evaluation: pass@k against its combinatorial definition; greedy completions and accuracy against an
independent full-forward argmax decode; rewards checked as in training. GRPO's task_reward replaces the task's own."""
import itertools
import json

import pytest
import torch

from rftkit.evaluate import _score, collapse_warning, evaluate, pass_at_k
from rftkit.rewards import RewardError
from rftkit.tasks import Task, arithmetic
from rftkit.tokenizer import Tokenizer
from tests.conftest import tiny_model


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (6, 1, 3), (4, 0, 2), (4, 3, 2), (3, 3, 3)])
def test_pass_at_k_is_the_chance_that_k_of_n_samples_include_a_correct_one(n, c, k):
    subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def _greedy(model, prompt, max_tokens, eos):
    ids = list(prompt)
    for _ in range(max_tokens):
        logits, _ = model(torch.tensor([ids]))
        nxt = int(logits[0, -1].argmax())
        if nxt in eos:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def test_greedy_accuracy_equals_an_independent_decode(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    model = tiny_model(vocab_size=258, max_seq_len=512)
    base = arithmetic()
    has_digit = lambda completion, sample: float(any(ch.isdigit() for ch in completion))
    task = Task("tiny", {k: v[:12] for k, v in base.problems.items()}, has_digit)
    result = evaluate(model, tok, task, "test", n=12, max_tokens=8, progress=False)
    problems = task.samples("test", 12)
    texts = [tok.decode(_greedy(model, tok.encode_chat(p["messages"]), 8, set(tok.eos_token_ids))) for p in problems]
    assert [r["completions"] for r in result["rows"]] == [[t] for t in texts]
    expected = sum(has_digit(t, None) for t in texts) / 12
    assert result["accuracy"] == pytest.approx(expected) and result["pass@1"] == pytest.approx(expected)

    task.default_reward = lambda completion, sample: None
    with pytest.raises(RewardError, match="returned None"):
        evaluate(model, tok, task, "test", n=2, max_tokens=4, progress=False)


def test_train_task_reward_replaces_the_tasks_own_reward(tmp_path, tok_dir):
    from rftkit.grpo import GRPOConfig, train
    from tests.conftest import grpo_setup
    model, tok, task = grpo_setup(tok_dir)
    (tmp_path / "r.py").write_text("def quarter(completion, sample):\n    return 0.25\n")
    cfg = GRPOConfig(output=str(tmp_path / "run"), steps=1, prompts_per_step=2, group_size=2, max_tokens=4,
                     task_reward=f"{tmp_path / 'r.py'}:quarter")
    train(cfg, model, tok, task, progress=False)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward/task"] == 0.25 and row["reward"] == 0.25 and row["accuracy"] == 0.0


def test_one_reply_to_most_problems_is_flagged_as_a_collapse():
    task = Task("t", {"train": [], "validation": [], "test": []}, lambda c, s: float(c.strip() == s["answer"]))
    problems = [{"messages": [], "answer": "1" if i < 15 else str(i)} for i in range(20)]
    collapsed = _score(task, problems, [[" 1 "]] * 20, 1, 0.0)
    assert collapsed["accuracy"] == 0.75 and collapsed["top_reply"] == {"text": "1", "share": 1.0}
    assert "100% of the 20 problems got the same reply '1'" in collapse_warning(collapsed)
    varied = _score(task, problems, [["1"]] * 15 + [[str(i)] for i in range(15, 20)], 1, 0.0)
    assert varied["accuracy"] == 1.0 and varied["top_reply"]["share"] == 0.75 and collapse_warning(varied) is None
    assert collapse_warning(_score(task, problems[:10], [["1"]] * 10, 1, 0.0)) is None     # too few to tell
