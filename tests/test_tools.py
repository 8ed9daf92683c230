"""Tools from plain functions: schemas, calls run with a timeout, every failure returned as text; environments
from files, and the TRL environment_factory wrapper."""
import time

import pytest

from rftkit.environments import TRLEnvironment, environment_factory
from rftkit.tool_calls import ToolCall
from rftkit.tools import Toolbox, calculator, load_tools

TOOLS_FILE = '''
import time

def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b

def boom(x: str) -> str:
    """Always fails.

    Args:
        x: anything
    """
    raise RuntimeError("broken " + x)

def slow(s: float) -> str:
    """Sleeps.

    Args:
        s: seconds
    """
    time.sleep(s)
    return "woke"

def _helper():
    return 1
'''


def test_tool_schemas_and_calls_with_every_failure_as_text(tmp_path):
    f = tmp_path / "tools.py"
    f.write_text(TOOLS_FILE)
    box = Toolbox(load_tools([str(f), "calculator"]), timeout_s=0.5)
    assert sorted(box.tools) == ["add", "boom", "calculator", "slow"]          # _helper is private
    add = next(s for s in box.schemas if s["function"]["name"] == "add")["function"]
    assert add["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first"}
    assert set(add) == {"name", "description", "parameters"}     # what an OpenAI client sends rft serve
    assert box.run(ToolCall("add", {"a": 2, "b": 40})) == "42"
    assert box.run(ToolCall("calculator", {"expression": "123 * 456"})) == "56088"
    assert "unknown tool 'mul'" in box.run(ToolCall("mul", {}))
    assert "bad arguments for add" in box.run(ToolCall("add", {"a": 1}))
    assert box.run(ToolCall("boom", {"x": "y"})) == "error: boom raised RuntimeError: broken y"
    t0 = time.perf_counter()
    assert box.run(ToolCall("slow", {"s": 3})) == "error: slow timed out after 0.5 s"
    assert time.perf_counter() - t0 < 2
    assert load_tools([f"{f}:add"])[0](a=1, b=2) == 3
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_tools([f"{f}:nope"])
    with pytest.raises(ValueError, match="neither a built-in"):
        load_tools(["calc"])


def test_calculator_is_exact_and_refuses_what_is_not_arithmetic():
    assert calculator("(12 + 3) * 4 - 6 / 3") == "58"
    assert calculator("7 / 2") == "3.5"
    with pytest.raises(ValueError, match="not arithmetic"):
        calculator("__import__('os').getcwd()")


def test_tool_environment_answers_calls_and_bad_json(tmp_path):
    make = environment_factory(tools=["calculator"])
    env = make()
    msgs = env.reset({"messages": [{"role": "user", "content": "hi"}]})
    assert msgs == [{"role": "user", "content": "hi"}]
    new, done, r = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>')
    assert new == [{"role": "tool", "content": "4"}] and not done and r is None
    new, done, _ = env.step("<tool_call>{not json</tool_call>")
    assert not done and new[0]["content"].startswith("error: tool call 1 is not valid JSON")
    assert env.step("4") == ([], True, None)


ENV_FILE = '''
from rftkit.environments import Environment

class Guess(Environment):
    def reset(self, sample):
        self.target = int(sample["answer"])
        return [{"role": "user", "content": "guess"}]
    def step(self, text):
        return [], int(text) == self.target, None

class Plain:
    pass

class TrlCounter:
    def __init__(self):
        self.reward = 0.0
    def reset(self, **kwargs):
        self.n = int(kwargs["start"])
        return f"counter at {self.n}"
    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: how much
        """
        self.n += by
        self.reward = float(self.n == 10)
        return self.n
'''


def test_environment_files_and_the_trl_wrapper(tmp_path):
    f = tmp_path / "env.py"
    f.write_text(ENV_FILE)
    env = environment_factory(f"{f}:Guess")()
    env.reset({"answer": "7"})
    assert env.step("7") == ([], True, None)
    with pytest.raises(ValueError, match="has no class 'Nope'"):
        environment_factory(f"{f}:Nope")
    with pytest.raises(ValueError, match="must subclass rftkit.environments.Environment"):
        environment_factory(f"{f}:Plain")
    with pytest.raises(ValueError, match="FILE.py:ClassName"):
        environment_factory("env.py")
    trl = environment_factory(f"{f}:TrlCounter", trl=True)()
    assert isinstance(trl, TRLEnvironment) and [t["function"]["name"] for t in trl.tools] == ["increment"]
    msgs = trl.reset({"messages": [{"role": "user", "content": "Reach 10."}], "start": "7"})
    assert msgs[-1]["content"] == "Reach 10.\n\ncounter at 7"
    new, done, _ = trl.step('<tool_call>{"name": "increment", "arguments": {"by": 3}}</tool_call>')
    assert new == [{"role": "tool", "content": "10"}] and not done
    assert trl.reward(msgs) == 1.0
