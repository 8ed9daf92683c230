"""Environments for multi-turn tasks: what the model is told, and what answers each of its turns.

    class Guess(Environment):                          # in env.py; rft train --env env.py:Guess
        def reset(self, sample):  return [{"role": "user", "content": "Guess my number (1-100)."}]
        def step(self, text):     return [{"role": "user", "content": "Higher."}], False, None

One environment object plays one conversation: `reset(sample)` gives the first messages (and starts its
state); `step(text)` gets the model's whole turn as text and answers `(new messages, done, reward or None)`;
when the conversation ends (done, or a turn or token limit of rftkit.multiturn), `reward(messages)` may score
the whole conversation. A conversation's reward is the sum of the step rewards, `reward(messages)`, and the
run's rewards `(completion, sample) -> float` applied to the model's last turn. `tools` (OpenAI schemas) are
shown to the model through its chat template (rftkit.tool_calls).

`ToolEnvironment` is the environment that tools make: the model's calls run (rftkit.tools) and their results
come back as tool messages; a turn without a call ends the conversation. `TRLEnvironment` wraps a class
written for TRL's `GRPOTrainer(environment_factory=...)`: its `reset(**row)` text is appended to the last user
message, its public methods are the tools, and its `reward` attribute (when it has one) is the final reward.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

from rftkit.tool_calls import parse_tool_calls
from rftkit.rewards import load_module
from rftkit.tools import Toolbox


class Environment:
    """The interface. Subclasses implement reset and step; reward and tools are optional."""
    tools: list[dict] | None = None

    def reset(self, sample: dict) -> list[dict]:
        raise NotImplementedError

    def step(self, text: str) -> tuple[list[dict], bool, float | None]:
        raise NotImplementedError

    def reward(self, messages: list[dict]) -> float:
        return 0.0


class ToolEnvironment(Environment):
    """The sample's own messages; each turn's tool calls are run and answered; a turn without one ends it."""

    def __init__(self, toolbox: Toolbox):
        self.toolbox = toolbox
        self.tools = toolbox.schemas

    def reset(self, sample: dict) -> list[dict]:
        return [dict(m) for m in sample["messages"]]

    def step(self, text: str) -> tuple[list[dict], bool, float | None]:
        parsed = parse_tool_calls(text)
        if not parsed.calls and not parsed.errors:
            return [], True, None
        answers = [self.toolbox.run(c) for c in parsed.calls] + [f"error: {e}" for e in parsed.errors]
        return [{"role": "tool", "content": a} for a in answers], False, None


class TRLEnvironment(Environment):
    """A TRL `environment_factory` class as an Environment (see the module docstring for what it covers)."""

    def __init__(self, factory: Callable, timeout_s: float = 10.0):
        self.env = factory()
        methods = [getattr(self.env, k) for k, v in inspect.getmembers(type(self.env), inspect.isfunction)
                   if not k.startswith("_") and k != "reset" and v.__doc__]
        self.toolbox = Toolbox(methods, timeout_s)
        self.tools = self.toolbox.schemas

    def reset(self, sample: dict) -> list[dict]:
        fields = {k: v for k, v in sample.items() if k != "messages"}
        observation = self.env.reset(**fields)
        messages = [dict(m) for m in sample["messages"]]
        if observation:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{observation}"
        return messages

    def step(self, text: str) -> tuple[list[dict], bool, float | None]:
        return ToolEnvironment.step(self, text)

    def reward(self, messages: list[dict]) -> float:
        return float(vars(self.env).get("reward", 0.0))


def environment_factory(env: str = "", tools: list[str] | None = None, tool_timeout: float = 10.0,
                        trl: bool = False) -> Callable[[], Environment]:
    """What `--env FILE.py:Class` (or `--env-trl`: a TRL class) and `--tools` make: a function returning a
    fresh environment per conversation. The class is imported once, here, so a bad file fails before training."""
    from rftkit.tools import load_tools
    if env:
        file, sep, name = env.rpartition(":")
        if not sep or not file.endswith(".py"):
            raise ValueError(f"--env must be FILE.py:ClassName, got {env!r}")
        module = load_module(file, "environment")
        cls = getattr(module, name, None)
        if not inspect.isclass(cls):
            classes = sorted(k for k, v in vars(module).items() if inspect.isclass(v) and not k.startswith("_"))
            raise ValueError(f"environment file {file} has no class {name!r}; it defines {classes}")
        if tools:
            raise ValueError(f"--tools {tools} with --env {env!r}: an environment brings its own tools")
        if trl:
            return lambda: TRLEnvironment(cls, tool_timeout)
        if not issubclass(cls, Environment):
            raise ValueError(f"{env}: {name} must subclass rftkit.environments.Environment (or pass --env-trl for "
                             f"a TRL environment_factory class)")
        return cls
    if not tools:
        raise ValueError("an environment needs --env FILE.py:Class or --tools")
    toolbox = Toolbox(load_tools(tools), tool_timeout)
    return lambda: ToolEnvironment(toolbox)
