"""Rewards and tasks: built-ins on hand-made cases, loud failures, disjoint splits, reasoning-gym."""
import json
import math

import pytest

from rftkit.rewards import (RewardError, exact_match, format_regex, last_integer, load_reward, math_equivalence,
                            numeric_match, score_batch, soft_overlong, weighted)
from rftkit.tasks import SPLITS, arithmetic, countdown_reward, get_task, jsonl


def test_builtin_rewards():
    s = {"answer": 46}
    assert last_integer("12 + 34 = 46", s) == 1.0
    assert last_integer("46 is wrong, it is 47", s) == 0.0
    assert last_integer("no number", s) == 0.0
    assert numeric_match("about 3.14159", {"answer": "3.14159"}) == 1.0
    assert exact_match("  Paris \n", {"answer": "Paris"}) == 1.0 and exact_match("paris", {"answer": "Paris"}) == 0
    assert math_equivalence("The answer is $\\frac{1}{2}$", {"answer": "0.5"}) == 1.0
    assert format_regex(r"<answer>\d+</answer>")("<answer>12</answer>", {}) == 1.0
    long = soft_overlong(100, 20)
    assert long("x" * 80, {}) == 0.0 and long("x" * 90, {}) == -0.5 and long("x" * 500, {}) == -1.0
    both = weighted({"a": (last_integer, 2.0), "b": (lambda c, s: 1.0, 0.5)})
    assert both("46", s) == 2.5
    assert countdown_reward("(3 + 5) * 2", {"numbers": [2, 3, 5], "target": 16}) == 1.0
    assert countdown_reward("3 * 5 + 5", {"numbers": [2, 3, 5], "target": 20}) == 0.0      # 5 used twice
    assert countdown_reward("__import__('os')", {"numbers": [1], "target": 1}) == 0.0      # never evaluated


def test_score_batch_checks_values_and_errors_loudly(tmp_path):
    samples = [{"answer": 1}, {"answer": 2}]
    assert score_batch({"li": last_integer}, ["1", "3"], samples) == {"li": [1.0, 0.0]}
    with pytest.raises(RewardError, match=r"reward 'bad' returned None .* sample \{'answer': 1\}"):
        score_batch({"bad": lambda c, s: None}, ["1", "2"], samples)
    with pytest.raises(RewardError, match="returned nan"):
        score_batch({"nan": lambda c, s: math.nan}, ["1", "2"], samples)
    with pytest.raises(RewardError, match=r"reward 'boom' raised KeyError: 'missing' on sample"):
        score_batch({"boom": lambda c, s: s["missing"]}, ["1", "2"], samples)
    errors = {}
    out = score_batch({"boom": lambda c, s: s["missing"]}, ["1", "2"], samples, on_error="count", errors=errors)
    assert out == {"boom": [0.0, 0.0]} and errors["boom"]["count"] == 2 and "KeyError" in errors["boom"]["first"]


def test_load_reward_from_file_and_errors(tmp_path):
    (tmp_path / "good.py").write_text("def short(completion, sample):\n    return float(len(completion) < 5)\n")
    assert load_reward(f"{tmp_path / 'good.py'}:short")("abc", {}) == 1.0
    with pytest.raises(ValueError, match=r"has no function 'long'; it defines \['short'\]"):
        load_reward(f"{tmp_path / 'good.py'}:long")
    (tmp_path / "broken.py").write_text("import not_a_module_xyz\n")
    with pytest.raises(ValueError, match="broken.py failed to import: ModuleNotFoundError"):
        load_reward(f"{tmp_path / 'broken.py'}:f")
    with pytest.raises(ValueError, match="unknown reward 'lastint'"):
        load_reward("lastint")


def test_arithmetic_demo_task_and_disjoint_splits():
    task = arithmetic()
    ids = {s: {p["id"] for p in task.problems[s]} for s in SPLITS}
    assert sum(map(len, ids.values())) == 90 * 90
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"]) \
        and not (ids["validation"] & ids["test"])
    assert task.size("test") >= 1000
    s = task.sample("test", 0, seed=0)
    a, b = map(int, s["id"].split("+"))
    assert 10 <= a <= 99 and 10 <= b <= 99 and s["answer"] == a + b
    assert s["messages"] == [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}]
    assert task.sample("train", 5, seed=1) == task.sample("train", 5, seed=1)


def test_unknown_task_and_bad_jsonl_line(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'arith'"):
        get_task("arith")
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hi", "answer": "x"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        jsonl(str(f))


# generators whose `answer` is None: three publish a reference solution in the entry's metadata instead, two
# publish none at all (only a checker: a solution would need a solver of our own)
REFERENCE_IN_METADATA = {
    "graph_color": lambda m: json.dumps({str(k): v for k, v in m["possible_answer"].items()}),
    "propositional_logic": lambda m: m["example_answer"],
    "rubiks_cube": lambda m: m["example_correct_answer"],
}
NO_REFERENCE = {"boxnet", "rush_hour"}


def test_reasoning_gym_answers_score_one_through_our_wrapper():
    from reasoning_gym.composite import DatasetSpec
    from reasoning_gym.factory import DATASETS
    failed, no_reference, checked = [], set(), set()
    for name in sorted(DATASETS):
        kw = {}
        if name == "composite":          # a mixture: needs its sub-datasets named
            kw = {"datasets": [DatasetSpec("basic_arithmetic", 1.0, {}), DatasetSpec("leg_counting", 1.0, {})]}
        task = get_task(f"rg:{name}", size=4, seed=1, **kw)
        for split in SPLITS:
            for p in task.problems[split][:1]:
                answer = p["answer"]
                if answer is None and name in REFERENCE_IN_METADATA:
                    answer = REFERENCE_IN_METADATA[name](p["entry"]["metadata"])
                if answer is None:
                    no_reference.add(name)
                    assert task.default_reward("no idea", p) < 1.0      # the checker is wired, and it checks
                    continue
                checked.add(name)
                if task.default_reward(str(answer), p) != 1.0:
                    failed.append(name)
    assert failed == []
    assert no_reference == NO_REFERENCE
    assert checked | no_reference == set(DATASETS) and len(checked) == len(DATASETS) - 2


def test_reasoning_gym_tasks_ask_for_answer_tags_and_score_the_tagged_answer():
    from rftkit.rewards import answer_tags
    task = get_task("rg:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2", size=40, seed=0)
    assert task.name == "rg:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2"
    p = task.samples("test", 1)[0]
    text, answer, score = p["messages"][-1]["content"], p["answer"], task.default_reward
    assert text.endswith("Give only the final answer, between <answer> and </answer>.")
    terms = text.split(":")[1].split("=")[0].split()        # "a + b" or "a - b", each of 1-2 digits
    assert len(terms) == 3 and all(1 <= len(t) <= 2 for t in terms[::2])
    assert score(f"So {terms[0]} {terms[1]} {terms[2]} gives\n<answer> {answer} </answer>", p) == 1.0
    assert score(f"<answer>{int(answer) + 1}</answer>", p) == 0.0
    assert score(f"<answer>{int(answer) + 1}</answer> <answer>{answer}</answer>", p) == 1.0   # the last tag counts
    assert score(f"The answer is {answer}.", p) == 0.0      # untagged: the whole reply is the answer, as before,
    assert score(f" {answer}\n", p) == 1.0                  # so a bare answer still scores; no partial credit
    partial = get_task("rg:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2", size=40, seed=0,
                       partial_credit=True)
    assert 0.0 < partial.default_reward(f"The answer is {answer}.", p) < 1.0    # reasoning-gym's own fraction
    assert [answer_tags(c, p) for c in ("<answer>5</answer>", "x <answer> 5 </answer>\n", "x <answer> 5 </answer> y",
                                        "The answer is between <answer> and </answer>.", "<answer> </answer>", "5",
                                        "<answer>5</answer><answer>6</answer>", "<answer>5")] \
        == [1, 1, 0, 0, 0, 0, 0, 0]
    assert load_reward("answer_tags") is answer_tags
    shot, question = p["messages"][:2], p["messages"][4]     # two worked examples before the question
    assert [m["role"] for m in p["messages"]] == ["user", "assistant"] * 2 + ["user"] and question["content"] == text
    assert shot[0]["content"].endswith("</answer>.") and shot[0]["content"] not in {
        q["messages"][-1]["content"] for split in SPLITS for q in task.problems[split]}
    assert score(shot[1]["content"], {"entry": {**p["entry"], "answer": shot[1]["content"][8:-9]}}) == 1.0
    named = get_task("rg:chain_sum:shots=0,partial_credit=true,max_terms=2", size=40, seed=0)   # from the name too
    assert named.name == "rg:chain_sum:max_terms=2" and len(named.samples("train", 1)[0]["messages"]) == 1
    assert 0.0 < named.default_reward("The answer is 5 or 6.", {**p, "entry": {**p["entry"], "answer": "5"}}) < 1.0
    bare = get_task("rg:chain_sum", size=10, answer_format="", shots=0)
    assert [m["role"] for m in bare.samples("train", 1)[0]["messages"]] == ["user"]
    assert "<answer>" not in bare.samples("train", 1)[0]["messages"][-1]["content"]


def test_reasoning_gym_config_from_the_task_name_is_checked():
    assert get_task("rg:leg_counting:min_animals=1,max_animals=1", size=5).name.endswith("max_animals=1")
    with pytest.raises(ValueError, match=r"config item 'max_animals' is not KEY=VALUE"):
        get_task("rg:leg_counting:max_animals", size=5)
    with pytest.raises(ValueError, match=r"'leg_counting' rejects its config \{'legs': 3\}"):
        get_task("rg:leg_counting:legs=3", size=5)


def test_math_reward_scores_through_score_batch_and_off_the_main_thread():
    # score_batch runs per-sample rewards in worker threads, where math-verify's signal-based timeouts refuse
    # to run: `rft train --reward math` failed on its first step
    samples = [{"answer": "0.5"}, {"answer": "8"}, {"answer": "-596"}]
    completions = ["The answer is $\\frac{1}{2}$", "7", "so -6229 - -5633 = -596"]
    assert score_batch({"math": math_equivalence}, completions, samples) == {"math": [1.0, 0.0, 1.0]}
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(score_batch, {"math": math_equivalence}, completions, samples).result() == \
            {"math": [1.0, 0.0, 1.0]}
