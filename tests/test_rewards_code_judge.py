"""The code-execution reward (real sandboxed subprocesses) and the LLM judge (a real engine on a tiny model
whose reply is forced by construction, so the prompt it builds and the parse are checked exactly)."""
import time

import pytest
import torch

from rftkit.rewards import (JudgeError, LLMJudge, RewardError, code_execution, extract_code, json_schema_valid,
                            score_batch)
from rftkit.sandbox import run_python
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


ASSERTS = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}


def test_printing_the_end_marker_and_exiting_0_passes_nothing():
    """The old harness passed a test when stdout ended with a marker the program could read from its own file."""
    hack = ("import re, sys\nfound = re.findall(r\"print\\('([0-9a-f]{16})'\\)\", open(__file__).read())\n"
            "print(found[-1] if found else 'no marker')\nsys.exit(0)\n")
    assert code_execution(timeout_s=5)(hack, ASSERTS) == 0.0


def test_objects_with_custom_dunders_pass_nothing():
    reward = code_execution(timeout_s=5)
    always_equal = "class Any:\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return Any()\n"
    assert reward(always_equal, ASSERTS) == 0.0
    int_subclass = ("class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
                    "def add(a, b):\n    return Int(0)\n")
    assert reward(int_subclass, ASSERTS) == 0.0
    # the same trick on an assert whose expected side is not a literal, on subtraction and on truth
    tricky = ("class Zero:\n    def __sub__(self, o):\n        return 0.0\n    def __bool__(self):\n        return True\n"
              "    def __eq__(self, o):\n        return True\n\ndef add(a, b):\n    return Zero()\n")
    other_forms = {"tests": ["assert add(2, 3) == add(3, 2) == 2 + 3", "assert abs(add(0.1, 0.2) - 0.3) < 1e-9",
                             "assert add(1, 1)", "assert not add(0, 0) is None and add(1, 1)"]}
    assert reward(tricky, other_forms) == 0.0
    honest = "def add(a, b):\n    return a + b\n"
    assert reward(honest, other_forms) == 1.0 and reward(honest, ASSERTS) == 1.0


def test_forged_verdict_records_pass_nothing():
    """A program that knows the protocol writes records to every fd it has: without the expected value, which
    never entered its process, it cannot forge a passing one."""
    forge = ("import os, sys\ncmd = open('/proc/self/cmdline', 'rb').read()\n"
             "for fd in range(3, 64):\n    try:\n        os.write(fd, b'[0, [\"i\", \"7\"]]\\n[1, true]\\n\"end\"\\n')\n"
             "    except OSError:\n        pass\nprint(b'== 5' in cmd, b'5' in cmd.split(b'_rftkit_check(0')[-1])\n"
             "sys.exit(0)\n")
    r = run_python(forge, check="assert add(2, 3) == 5")
    assert r.passed is False and r.stdout == "False False\n"
    assert r.check_detail.startswith("malformed check record") or "failed" in r.check_detail
    only_end = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\"end\"\\n')\n    except OSError:\n        pass\n"
    assert run_python(only_end + "import sys\nsys.exit(0)\n", check="assert add(2, 3) == 5").passed is False


def test_assert_forms_an_honest_program_passes_and_what_a_failure_says():
    program = ("def add(a, b):\n    return a + b\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n"
               "    def push(self, x):\n        self.items.append(x)\n        return self\n"
               "    def pop(self):\n        return self.items.pop() if self.items else None\n\n"
               "def pairs(n):\n    return {i: (i, float(i) / 2, str(i), {i}) for i in range(n)}\n")
    tests = ["assert add(2, 3) == 5", "assert add(2, 3) != 6, 'message'", "assert add(0.1, 0.2) > 0.3",
             "assert add(2, 3) in (4, 5)", "assert Stack().pop() is None", "s = Stack().push(3)\nassert s.pop() == 3",
             "for i in range(5):\n    assert add(i, i) == 2 * i", "assert pairs(2) == {0: (0, 0.0, '0', {0}), 1: (1, 0.5, '1', {1})}",
             "assert add('a', 'b') == 'ab' and add([1], [2]) == [1, 2]", "assert abs(add(0.1, 0.2) - 0.3) < 1e-9",
             "def helper(x):\n    return add(x, 1)\nassert helper(1) == 2", "assert add(b'a', b'b') == b'ab'"]
    assert code_execution(timeout_s=10)(program, {"tests": tests}) == 1.0
    r = run_python(program, check="assert add(1, 1) == 2\nassert add(2, 2) == 5")
    assert r.passed is False and r.check_detail == "assert #2 failed: got 4"
    r = run_python(program, check="if False:\n    assert add(1, 1) == 3")
    assert r.passed is False and r.check_detail == "assert #1 never ran"
    r = run_python("import sys\nsys.exit(0)\n", check="assert add(1, 1) == 2")
    assert r.passed is False and r.check_detail == "assert #1 never ran"


def test_bad_test_specs_are_errors_that_name_the_field():
    reward = code_execution()
    with pytest.raises(RewardError, match=r"needs sample\['tests'\], a non-empty list, got None"):
        score_batch({"code": reward}, ["print(1)"], [{"answer": 1}])
    with pytest.raises(RewardError, match=r"assert string or .* got \{'input': '1'\}"):
        score_batch({"code": reward}, ["print(1)"], [{"tests": [{"input": "1"}]}])
    with pytest.raises(RewardError, match=r"assert test 'assert add\(1, 2\) ==' is not valid Python"):
        score_batch({"code": reward}, ["print(1)"], [{"tests": ["assert add(1, 2) =="]}])
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
