"""The code-execution reward (real sandboxed subprocesses) and the LLM judge (a real engine on a tiny model
whose reply is forced by construction, so the prompt it builds and the parse are checked exactly)."""
import time

import pytest
import torch

from rftkit.rewards import (JudgeError, LLMJudge, RewardError, code_execution, extract_code, json_schema_valid,
                            score_batch)
from rftkit.tokenizer import Tokenizer
from tests.conftest import tiny_model

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


def test_extract_code_rules():
    assert extract_code("Here:\n```python\nx = 1\n```\nand\n```py\nx = 2\n```") == "x = 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"            # an untagged block when no python one
    assert extract_code("print(4)") == "print(4)"                   # no block: the whole completion
    assert extract_code("print(4)", "block") is None
    assert extract_code("```python\nx\n```", "whole") == "```python\nx\n```"
    with pytest.raises(ValueError, match="'fenced'"):
        extract_code("x", "fenced")


def test_io_and_assert_tests_score_the_fraction_passed():
    reward = code_execution(timeout_s=5)
    io = {"tests": [{"stdin": "3 4\n", "stdout": "7\n"}, {"stdin": "10 -2", "stdout": "8"},
                    {"stdin": "1 1", "stdout": "3"}]}
    assert reward(ADD, io) == pytest.approx(2 / 3)
    asserts = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]}
    assert reward("def add(a, b):\n    return a + b\n", asserts) == pytest.approx(2 / 3)
    # leaving early with status 0 skips the test: it does not pass it
    assert reward("import sys\nsys.exit(0)\n", asserts) == 0.0
    # a program that does not even parse fails every test
    assert reward("def add(a, b) return", asserts) == 0.0
    helper = {"tests": ["assert twice(4) == 8"], "files": {"helpers.py": "def twice(x):\n    return 2 * x\n"}}
    assert reward("from helpers import twice", helper) == 1.0
    assert code_execution(extract="block")("print(7)", {"tests": [{"stdout": "7"}]}) == 0.0   # no block: no code


def test_hostile_programs_get_bounded_scores():
    reward = code_execution(timeout_s=1.0, memory_mb=256, max_procs=8)
    punish = code_execution(timeout_s=1.0, memory_mb=256, max_procs=8, limit_score=-1.0)
    tests = {"tests": [{"stdout": "done"}]}
    for program in ("while True:\n    pass\n", "x = bytearray(10 * 1024 ** 3)\nprint('done')\n",
                    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"):
        t = time.perf_counter()
        assert reward(program, tests) == 0.0
        assert punish(program, tests) == -1.0
        assert time.perf_counter() - t < 2 * (1.0 + 8.0)          # both runs stopped at their limits
    assert punish("print('done')", tests) == 1.0                    # no limit hit: the plain fraction


def test_bad_test_specs_are_errors_that_name_the_field():
    reward = code_execution()
    with pytest.raises(RewardError, match=r"needs sample\['tests'\], a non-empty list, got None"):
        score_batch({"code": reward}, ["print(1)"], [{"answer": 1}])
    with pytest.raises(RewardError, match=r"assert string or .* got \{'input': '1'\}"):
        score_batch({"code": reward}, ["print(1)"], [{"tests": [{"input": "1"}]}])
    with pytest.raises(ValueError, match="limit_score must be finite"):
        code_execution(limit_score=float("nan"))


def test_json_schema_reward():
    s = {"schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}
    assert json_schema_valid('{"n": 3}', s) == 1.0
    assert json_schema_valid('Sure:\n```json\n{"n": 3}\n```', s) == 1.0
    assert json_schema_valid('{"n": "3"}', s) == 0.0 and json_schema_valid("n = 3", s) == 0.0


# ------------------------------------------------------------------------------------------- the judge
def forced_judge_model(tok: Tokenizer, reply: str):
    """A tiny real Transformer that, greedy, answers every prompt with `reply` then EOS: attention and MLP
    outputs are zeroed, so the last hidden state is the normalised embedding of the current token; each
    token on the reply's path gets its own basis-vector embedding and lm_head maps it to the next token."""
    model = tiny_model(vocab_size=258, max_seq_len=512, tie_embeddings=False)
    path = [tok.encode("\n")[-1]] + tok.encode(reply)               # generation prompt ends with "\n"
    nxt = tok.encode(reply) + [tok.eos_token_ids[0]]
    if len(set(path)) != len(path):
        raise ValueError(f"forced reply {reply!r} repeats a token: a bigram model cannot say it")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (src, dst) in enumerate(zip(path, nxt)):
            model.model.embed_tokens.weight[src] = torch.nn.functional.one_hot(torch.tensor(i), 32).float()
            model.lm_head.weight[dst, i] = 1.0
    return model


def test_judge_builds_the_prompt_and_parses_a_forced_reply(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    judge = LLMJudge(forced_judge_model(tok, "Score: 7"), tok,
                     template="Q: {prompt}\nA: {completion}\nRef: {answer}\nScore?", max_tokens=12)
    sample = {"messages": [{"role": "user", "content": "What is 2+2?"}], "answer": 4}
    assert judge.prompt_text("four", sample) == "Q: What is 2+2?\nA: four\nRef: 4\nScore?"
    out = score_batch({"judge": judge}, ["four", "5", "IV"], [sample] * 3)
    assert out == {"judge": [0.7, 0.7, 0.7]}
    assert judge.last_replies == ["Score: 7"] * 3                   # one reply per completion, via the engine
    assert judge.engine.stats["finished"] == 3
    with pytest.raises(ValueError, match=r"judge template field 'rubric' is not in the sample"):
        LLMJudge(judge.model, tok, template="{rubric} {completion}").prompt_text("x", sample)


def test_judge_reply_without_a_score_is_an_error_showing_the_reply(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    judge = LLMJudge(forced_judge_model(tok, "Great!"), tok, max_tokens=12)
    sample = {"messages": [{"role": "user", "content": "Say hi"}]}
    with pytest.raises(RewardError, match=r"reward 'judge' raised JudgeError: judge reply has no score .*'Great!'"):
        score_batch({"judge": judge}, ["hi"], [sample])
    errors = {}
    out = score_batch({"judge": judge}, ["hi", "hello"], [sample] * 2, on_error="count", errors=errors)
    assert out == {"judge": [0.0, 0.0]} and errors["judge"]["count"] == 2 and "'Great!'" in errors["judge"]["first"]
    high = LLMJudge(forced_judge_model(tok, "Score: 12"), tok, max_tokens=12)
    with pytest.raises(JudgeError, match=r"judge score 12.0 is outside \[0.0, 10.0\]"):
        high("hi", sample)
    with pytest.raises(ValueError, match="needs a capture group"):
        LLMJudge(None, tok, pattern=r"\d+")


def test_builtin_specs_for_code_and_judge(tmp_path):
    from rftkit.rewards import load_reward
    assert load_reward("code")("print(3)", {"tests": [{"stdout": "3"}]}) == 1.0
    with pytest.raises((ValueError, FileNotFoundError), match="no_such_judge"):
        load_reward(f"judge:{tmp_path / 'no_such_judge'}")
