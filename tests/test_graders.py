"""OpenAI grader objects, from the examples of OpenAI's graders guide and API reference (string_check,
text_similarity, python, multi with calculate_output), their templating, their validation, and a Bedrock-format
dataset (messages + reference_answer) scored by a python grader: through rft grade, and as the reward of an
rft train step."""
import json
import math

import pytest

import rftkit.graders  # noqa: F401  registers the grader specs
from rftkit.graders import load_grader
from rftkit.graders.multi import Formula
from rftkit.graders.schema import GraderError, validate
from rftkit.graders.template import TemplateError, render, sample_namespace
from tests.conftest import grpo_config, grpo_setup, tiny_model

# The guide's python grader example: rapidfuzz's WRatio of the output against item.reference_answer
PY_FUZZY = {"type": "python", "name": "python_fuzzy",
            "source": "from rapidfuzz import fuzz, utils\n\ndef grade(sample, item) -> float:\n"
                      "    output_text = sample[\"output_text\"]\n    reference_answer = item[\"reference_answer\"]\n"
                      "    return fuzz.WRatio(output_text, reference_answer, processor=utils.default_process) / 100.0\n",
            "image_tag": "2025-05-08"}
# The guide's multigrader example: a function call's name and arguments, each checked, averaged
MULTI_TOOL = {"type": "multi", "graders": {
    "function_name": {"name": "function_name", "type": "string_check", "input": "get_acceptors",
                      "reference": "get_acceptors", "operation": "eq"},
    "arguments": {"name": "arguments", "type": "string_check", "input": "{\"smiles\": \"CCCCOC(=O)CC\"}",
                  "reference": "{\"smiles\": \"CCCCOC(=O)CC\"}", "operation": "eq"}},
    "calculate_output": "0.5 * function_name + 0.5 * arguments"}


def string_check(op, reference="{{ item.reference_answer }}"):
    return {"type": "string_check", "name": f"check_{op}", "operation": op, "input": "{{ sample.output_text }}",
            "reference": reference}


def test_string_check_operations_as_documented():
    item = {"reference_answer": "Paris"}
    cases = {"eq": {"Paris": 1, "paris": 0, "The capital is Paris": 0},
             "ne": {"Paris": 0, "paris": 1, "The capital is Paris": 1},
             "like": {"Paris": 1, "paris": 0, "The capital is Paris.": 1},
             "ilike": {"Paris": 1, "The capital is PARIS.": 1, "London": 0}}
    for op, expected in cases.items():
        g = load_grader(string_check(op))
        got = {text: g(text, item) for text in expected}
        assert got == {t: float(v) for t, v in expected.items()}, op


def test_text_similarity_metrics_against_hand_computed_values():
    def ts(metric):
        return load_grader({"type": "text_similarity", "name": "sim", "input": "{{ sample.output_text }}",
                            "reference": "{{ item.reference_answer }}", "evaluation_metric": metric,
                            "pass_threshold": 0.5})
    item = {"reference_answer": "the cat sat down"}
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_l"):
        assert ts(metric)("the cat sat down", item) == pytest.approx(1.0), metric     # identical text
        assert ts(metric)("qqqzzz", item) == pytest.approx(0.0, abs=1e-9), metric
    # ROUGE-1 of "the cat sat" against "the cat sat down": P = 3/3, R = 3/4, F = 2PR / (P + R) = 6/7
    assert ts("rouge_1")("the cat sat", item) == pytest.approx(6 / 7)
    # ROUGE-2: bigrams 2 of 2 and 2 of 3: F = 2 * 1 * (2/3) / (5/3) = 4/5
    assert ts("rouge_2")("the cat sat", item) == pytest.approx(4 / 5)
    # fuzzy_match lowercases and drops punctuation before comparing (rapidfuzz's default_process)
    assert ts("fuzzy_match")("The CAT sat down!", item) == pytest.approx(1.0)
    # GLEU: min(precision, recall) of 1-4-grams: 6 of 6 hypothesis n-grams match, 6 of 10 reference ones
    assert ts("gleu")("the cat sat", item) == pytest.approx(6 / 10)


def test_python_grader_example_runs_in_the_sandbox():
    g = load_grader(PY_FUZZY)
    item = {"reference_answer": "fuzzy wuzzy was a bear"}
    scores = g.batch(["fuzzy wuzzy was a bear", "Fuzzy Wuzzy was a BEAR!", "a completely different text"],
                     [item] * 3)
    assert scores[:2] == [1.0, 1.0]
    assert 0 <= scores[2] < 0.5
    # an independent reference: the same call in this process
    from rapidfuzz import fuzz, utils
    assert scores[2] == pytest.approx(fuzz.WRatio("a completely different text", item["reference_answer"],
                                                  processor=utils.default_process) / 100)


def test_python_grader_failures_are_per_completion_and_named():
    src = ("def grade(sample, item):\n    t = sample['output_text']\n    if t == 'boom':\n        raise KeyError('x')\n"
           "    if t == 'text':\n        return 'high'\n    if t == 'loop':\n        while True: pass\n"
           "    return float(len(t))\n")
    g = load_grader({"type": "python", "name": "p", "source": src})
    from rftkit.graders.python_grader import run_python_grader
    out = run_python_grader(src, [({"output_text": t}, {}) for t in ("ab", "boom", "text", "loop", "abcd")],
                            timeout_s=5)
    assert out[0] == 2.0 and out[4] == 4.0
    assert "grade raised KeyError" in str(out[1])
    assert "grade returned 'high'" in str(out[2])
    assert "timeout" in str(out[3])                           # the batch hit the limit: rerun one by one
    assert g("abc", {}) == 3.0
    # the sandbox: no network, no writes outside its folder
    net = ("import socket\ndef grade(sample, item):\n    try:\n        socket.create_connection(('1.1.1.1', 53), 1)\n"
           "        return 1.0\n    except OSError:\n        return 0.0\n")
    assert load_grader({"type": "python", "source": net})("x", {}) == 0.0


def test_multi_grader_documented_example_and_its_formula():
    assert load_grader(MULTI_TOOL)("anything", {}) == 1.0
    # the same grader reading a tool call the model wrote as JSON: output_json, nested paths
    templated = json.loads(json.dumps(MULTI_TOOL))
    templated["graders"]["function_name"].update(input="{{ sample.output_json.name }}", reference="{{ item.name }}")
    templated["graders"]["arguments"].update(input="{{ sample.output_json.arguments }}",
                                             reference="{{ item.arguments }}")
    templated["graders"]["arguments"].update(type="text_similarity", evaluation_metric="fuzzy_match")
    del templated["graders"]["arguments"]["operation"]
    g = load_grader(templated)
    item = {"name": "get_acceptors", "arguments": {"smiles": "CCCCOC(=O)CC"}}
    right = json.dumps({"name": "get_acceptors", "arguments": {"smiles": "CCCCOC(=O)CC"}})
    wrong_name = json.dumps({"name": "get_donors", "arguments": {"smiles": "CCCCOC(=O)CC"}})
    assert g.batch([right, wrong_name], [item, item]) == [1.0, 0.5]
    assert g.last_sub_scores == {"function_name": [1.0, 0.0], "arguments": [1.0, 1.0]}
    # a completion that is not JSON has no output_json: an error on that completion, naming the sub-grader
    bad = g.batch(["not json"], [item])[0]
    assert isinstance(bad, ValueError) and "'function_name'" in str(bad) and "output_json" in str(bad)


def test_calculate_output_is_arithmetic_only():
    f = Formula("(a + b) / 2 + 0.1 * max(a, b) ^ 2 - abs(-1) + floor(1.5) + ceil(0.2) - sqrt(4) + exp(0) "
                "- log(1) + min(a, 1)", {"a", "b"})
    a, b = 0.6, 0.2
    assert f({"a": a, "b": b}) == pytest.approx((a + b) / 2 + 0.1 * max(a, b) ** 2 - 1 + 1 + 1 - 2 + 1 - 0 + a)
    assert Formula("-a^2", {"a"})({"a": 3}) == -9.0            # ^ binds tighter than unary minus, as in maths
    for bad, why in [("a + c", "'c' is not one of its graders"), ("__import__('os').system('x')", "is not one of"),
                     ("a.real", "Attribute"), ("a if b else 1", "IfExp"), ("a // b", "FloorDiv"),
                     ("[a][0]", "Subscript"), ("lambda: 1", "Lambda"), ("'x'", "is not a number"), ("", "non-empty")]:
        with pytest.raises(ValueError, match="calculate_output") as e:
            Formula(bad, {"a", "b"})
        assert why in str(e.value), (bad, str(e.value))
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        Formula("a / b", {"a", "b"})({"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match="OverflowError|gave"):
        Formula("10 ^ 10 ^ 10", set())({})


def test_templating_as_openai_defines_it():
    item = {"reference_answer": "42", "meta": {"tags": ["a", {"k": "v"}]}, "n": 3}
    ns = sample_namespace('{"answer": 42}')
    assert ns["output_json"] == {"answer": 42} and ns["output_text"] == '{"answer": 42}'
    assert "output_json" not in sample_namespace("plain text")
    assert render("{{item.reference_answer}}|{{ item.meta.tags[1].k }}|{{ item.n }}|{{ sample.output_json.answer }}|"
                  "{{ sample.choices[0].message.content }}", item, ns) == '42|v|3|42|{"answer": 42}'
    assert render("{{ item.meta.tags }}", item, ns) == '["a", {"k": "v"}]'      # non-strings as JSON
    with pytest.raises(TemplateError, match=r"item has no 'missing' \(it has \['meta', 'n', 'reference_answer'\]\)"):
        render("{{ item.missing }}", item, ns)
    with pytest.raises(TemplateError, match="must start with item. or sample."):
        render("{{ row.x }}", item, ns)


@pytest.mark.parametrize("spec, where, why", [
    ({"type": "string_chek", "input": "a", "reference": "b", "operation": "eq"}, "grader.type", "must be one of"),
    ({"type": "string_check", "input": "a", "refrence": "b", "operation": "eq"}, "grader.reference", "missing"),
    ({"type": "string_check", "input": "a", "reference": "b", "operation": "eq", "extra": 1}, "grader.extra",
     "not a field"),
    ({"type": "string_check", "input": "a", "reference": "b", "operation": "neq"}, "grader.operation",
     "must be one of"),
    ({"type": "string_check", "input": "{{ output_text }}", "reference": "b", "operation": "eq"}, "grader.input",
     "must start with item. or sample."),
    ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "bleurt"},
     "grader.evaluation_metric", "must be one of"),
    ({"type": "python", "source": "def score(sample, item):\n    return 1.0\n"}, "grader.source",
     "defines no top-level function `grade(sample, item)` (it defines ['score'])"),
    ({"type": "python", "source": "def grade(sample, item) return 1"}, "grader.source", "not valid Python"),
    ({"type": "score_model", "model": "m", "input": [{"role": "judge", "content": "x"}]}, "grader.input[0]",
     "a message is"),
    ({"type": "score_model", "model": "m", "input": [{"role": "user", "content": "x"}], "range": [1, 0]},
     "grader.range", "low < high"),
    ({"type": "score_model", "model": "m", "input": [{"role": "user", "content": "x"}],
      "sampling_params": {"temprature": 0}}, "grader.sampling_params.temprature", "not a sampling parameter"),
    ({**MULTI_TOOL, "calculate_output": "0.5 * function_name + 0.5 * args"}, "grader.calculate_output",
     "'args' is not one of its graders"),
    ({**MULTI_TOOL, "graders": {**MULTI_TOOL["graders"], "arguments": {"type": "text_similarity", "input": "a",
                                                                       "reference": "b"}}},
     "grader.graders.arguments.evaluation_metric", "missing"),
    ({"type": "label_model", "input": [], "labels": [], "model": "m", "passing_labels": []}, "grader.type",
     "label_model is an evals grader"),
])
def test_bad_graders_are_refused_naming_the_field(spec, where, why):
    with pytest.raises(GraderError) as e:
        validate(spec)
    assert str(e.value).startswith(where + ":"), str(e.value)
    assert why in str(e.value)


BEDROCK_ROWS = [   # Amazon Bedrock RFT rows: messages (system + user) and a structured reference_answer
    {"messages": [{"role": "system", "content": "Solve the problem. End with 'Answer: N'."},
                  {"role": "user", "content": "What is 17 + 25?"}],
     "reference_answer": {"final_answer": "42"}, "completion": "17 + 25 = 42.\nAnswer: 42"},
    {"messages": [{"role": "system", "content": "Solve the problem. End with 'Answer: N'."},
                  {"role": "user", "content": "What is 6 * 7?"}],
     "reference_answer": {"final_answer": "42"}, "completion": "6 * 7 = 48\nAnswer: 48"},
    {"messages": [{"role": "system", "content": "Solve the problem. End with 'Answer: N'."},
                  {"role": "user", "content": "What is 9 - 4?"}],
     "reference_answer": {"final_answer": "5"}, "completion": "It is five, i.e. 5"},
]
# A Bedrock-style rule-based reward as a python grader: 1 for the right tagged answer, 0.2 for the right number
# without the tag, 0 otherwise
PY_BEDROCK = {"type": "python", "name": "answer_check", "source": (
    "import re\n\ndef grade(sample, item):\n    text = sample['output_text']\n"
    "    want = item['reference_answer']['final_answer']\n    m = re.search(r'Answer:\\s*(-?\\d+)', text)\n"
    "    if m:\n        return 1.0 if m.group(1) == want else 0.0\n"
    "    nums = re.findall(r'-?\\d+', text)\n    return 0.2 if nums and nums[-1] == want else 0.0\n")}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bedrock_dataset_scored_by_a_python_grader_through_rft_grade(tmp_path):
    from rftkit.graders.grade import GradeConfig, grade
    (tmp_path / "g.json").write_text(json.dumps(PY_BEDROCK))
    data = _write(tmp_path / "rows.jsonl", BEDROCK_ROWS)
    out = grade(GradeConfig(grader=str(tmp_path / "g.json"), data=data, use_completions=True, n=0,
                            output=str(tmp_path / "scored.jsonl")))
    assert out["scores"] == [1.0, 0.0, 0.2]
    assert "mean 0.400" in out["report"] and "[ 0.80,  1.00]     1" in out["report"]
    scored = [json.loads(l) for l in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["score"] for r in scored] == [1.0, 0.0, 0.2]


def test_rft_grade_samples_a_local_model_and_shows_buckets(tmp_path, tok_dir):
    from rftkit.graders.grade import GradeConfig, grade
    from rftkit.tokenizer import Tokenizer
    grader = {"type": "text_similarity", "name": "sim", "input": "{{ sample.output_text }}",
              "reference": "{{ item.reference_answer.final_answer }}", "evaluation_metric": "fuzzy_match"}
    (tmp_path / "g.json").write_text(json.dumps(grader))
    data = _write(tmp_path / "rows.jsonl", [{k: v for k, v in r.items() if k != "completion"} for r in BEDROCK_ROWS])
    model, tok = tiny_model(vocab_size=258, max_seq_len=512), Tokenizer.from_dir(tok_dir)
    out = grade(GradeConfig(grader=str(tmp_path / "g.json"), data=data, samples=2, temperature=1.0,
                            max_tokens=8), model, tok)
    assert len(out["scores"]) == 6 and [len(t) for t in out["texts"]] == [2, 2, 2]
    from rapidfuzz import fuzz, utils        # each score is the metric of its own completion
    for (row, text), s in zip([(r, t) for r, ts in zip(out["rows"], out["texts"]) for t in ts], out["scores"]):
        want = row["reference_answer"]["final_answer"]
        assert s == pytest.approx(fuzz.WRatio(text, want, processor=utils.default_process) / 100)
    assert "on 6 completions of 3 rows" in out["report"]


def test_rft_train_takes_a_grader_as_the_task_reward(tmp_path, tok_dir):
    from rftkit.grpo import GRPOConfig, train
    from rftkit.tasks import jsonl
    model, tok, _ = grpo_setup(tok_dir)
    rows = [{"messages": [{"role": "user", "content": f"Say {i}"}], "reference_answer": {"final_answer": str(i)}}
            for i in range(60)]
    task = jsonl(_write(tmp_path / "rows.jsonl", rows))
    grader = {"type": "multi", "calculate_output": "0.5 * digits + 0.5 * similar", "graders": {
        "digits": {"type": "python", "source": "def grade(sample, item):\n    t = sample['output_text']\n"
                                                  "    return sum(c.isdigit() for c in t) / max(1, len(t))\n"},
        "similar": {"type": "text_similarity", "input": "{{ sample.output_text }}", "evaluation_metric": "rouge_l",
                    "reference": "{{ item.reference_answer.final_answer }}"}}}
    (tmp_path / "g.json").write_text(json.dumps(grader))
    with pytest.raises(ValueError, match="both replace the task's reward"):
        grpo_config(tmp_path / "x", steps=1, grader=str(tmp_path / "g.json"), task_reward="exact")
    seen = []
    train(grpo_config(tmp_path / "run", steps=1, grader=str(tmp_path / "g.json")), model, tok, task,
          progress=False, on_step=lambda step, row: seen.append(row))
    assert len(seen) == 1 and 0 <= seen[0]["reward/task"] <= 1 and math.isfinite(seen[0]["reward"])
