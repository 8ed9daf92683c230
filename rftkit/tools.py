"""Tools as plain Python functions: their schemas shown to the model, their calls run with a timeout.

    toolbox = Toolbox(load_tools(["calculator", "my_tools.py"]), timeout_s=10)
    toolbox.schemas                       # OpenAI tool entries, from type hints and docstrings
    toolbox.run(call)                     # -> the result as text, or the error as text

A tool is any function with type hints and a Google-style docstring (`Args:` lines describe the arguments):
`transformers.utils.get_json_schema` turns it into the `{"type": "function", "function": {...}}` entry that chat
templates and the OpenAI API use. A tools file is user code the user chose to run, like a reward file: it is
imported, not sandboxed; a tool that executes code it is given (model-written code) must run that code in the
sandbox, as the built-in `python` tool does (rftkit.sandbox).

The model's calls are the Hermes text parsed by rftkit.tool_calls. Whatever goes wrong in a call (an unknown
tool, arguments that do not bind, an exception, a timeout) is returned as text for the model to read, never
raised: a rollout must survive a model that calls tools badly, and learning not to is the point of training.
"""
from __future__ import annotations

import ast
import inspect
import json
import operator
import threading
from collections.abc import Callable
from pathlib import Path

from rftkit.rewards import load_module
from rftkit.tool_calls import ToolCall


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (integers and decimals; + - * / // % ** and parentheses).

    Args:
        expression: the expression, e.g. "123 * 456"
    """
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.USub: operator.neg, ast.UAdd: operator.pos}

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError(f"exponent {right} is too large (at most 64)")
            return ops[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")
    result = value(ast.parse(expression.strip(), mode="eval").body)
    return str(int(result) if isinstance(result, float) and result.is_integer() else result)


def python(code: str) -> str:
    """Run a Python program in a sandbox (no network, 5 s, 256 MB) and return what it printed.

    Args:
        code: the program; print what you want to see
    """
    from rftkit.sandbox import run_python
    res = run_python(code, timeout_s=5.0, memory_mb=256)
    out = res.stdout[-2000:]
    if not res.ok:
        out += f"\n[exit {res.returncode}{', ' + res.killed_reason if res.killed_reason else ''}]\n{res.stderr[-1000:]}"
    return out.strip()


BUILTIN_TOOLS: dict[str, Callable] = {"calculator": calculator, "python": python}


def load_tools(specs: list[str]) -> list[Callable]:
    """Each spec: a built-in tool name (calculator, python), `file.py` (every public function defined in it) or
    `file.py:name1+name2`."""
    tools: list[Callable] = []
    for spec in specs:
        if spec in BUILTIN_TOOLS:
            tools.append(BUILTIN_TOOLS[spec])
            continue
        file, names = (spec.split(".py:", 1)[0] + ".py", spec.split(".py:", 1)[1]) if ".py:" in spec else (spec, "")
        if not file.endswith(".py"):
            raise ValueError(f"tool {spec!r} is neither a built-in ({sorted(BUILTIN_TOOLS)}) nor a .py file")
        module = load_module(file, "tools")
        defined = {k: v for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_")
                   and v.__module__ == module.__name__}
        chosen = names.split("+") if names else sorted(defined)
        for name in chosen:
            if name not in defined:
                raise ValueError(f"tools file {file} has no function {name!r}; it defines {sorted(defined)}")
            tools.append(defined[name])
        if not chosen:
            raise ValueError(f"tools file {file} defines no public function")
    return tools


def tool_schema(fn: Callable) -> dict:
    """The OpenAI tool entry of a function, from its type hints and docstring; a function that lacks them fails
    here, naming it, not when the model first calls it."""
    from transformers.utils import get_json_schema
    try:
        schema = get_json_schema(fn)
    except Exception as e:
        raise ValueError(f"tool {fn.__name__!r} needs type hints on every argument and a docstring with an "
                         f"Args: section: {e}") from e
    # only the fields an OpenAI client sends (transformers adds "return"): an adapter trained on these schemas
    # is served the same prompt when a client passes the same tools to rft serve
    fn_schema = schema["function"]
    return {"type": "function", "function": {k: fn_schema[k] for k in ("name", "description", "parameters")
                                             if k in fn_schema}}


class Toolbox:
    """Named tools, their schemas, and `run(call) -> str` with a timeout per call."""

    def __init__(self, tools: list[Callable], timeout_s: float = 10.0):
        if timeout_s <= 0:
            raise ValueError(f"tool timeout must be > 0 seconds, got {timeout_s}")
        self.tools = {fn.__name__: fn for fn in tools}
        if len(self.tools) != len(tools):
            raise ValueError(f"two tools share a name: {[fn.__name__ for fn in tools]}")
        self.schemas = [tool_schema(fn) for fn in tools]
        self.timeout_s = timeout_s

    def run(self, call: ToolCall) -> str:
        fn = self.tools.get(call.name)
        if fn is None:
            return f"error: unknown tool {call.name!r}; the tools are {sorted(self.tools)}"
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return f"error: bad arguments for {call.name}: {e}"
        box: dict = {}

        def target():
            try:
                box["value"] = fn(**call.arguments)
            except Exception as e:                         # the model reads it; the run goes on
                box["error"] = f"error: {call.name} raised {type(e).__name__}: {e}"
        # a daemon thread: a tool that hangs is abandoned at the timeout (it cannot be killed; a tool that may
        # hang for good should run its work in the sandbox, which kills it)
        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            return f"error: {call.name} timed out after {self.timeout_s:g} s"
        if "error" in box:
            return box["error"]
        value = box.get("value")
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
