"""Tool calls in the text a model writes, and tools shown to a model through its chat template.

One format, Hermes' (Qwen2.5, Hermes, SmolLM3 and most open templates that take `tools=`): each call is a JSON
object `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`. Training rollouts and the
server both parse with `parse_tool_calls` and both build prompts with `chat_messages`, so an adapter trained
to call tools is served with the same prompt it was trained on. A template that does not read `tools` (the
embedded SmolLM2's) gets the tools as a system message in the same format, and the assistant's past calls and
the tool results as text.

    messages, tools = chat_messages(messages, tools, takes_tools(tok.chat_template))
    ids = tok.encode_chat(messages, tools=tools)
    parsed = parse_tool_calls(completion_text)     # parsed.content, parsed.calls, parsed.errors
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""


@dataclass
class ParsedCalls:
    content: str                                    # the text with the calls taken out, stripped
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line per call that could not be read


def parse_tool_calls(text: str) -> ParsedCalls:
    """Calls in `text`, in order. A call whose JSON is broken, or that has no string `name`, or whose
    `arguments` is not an object, is reported in `errors` (for the model to read back) and not run. An
    unclosed `<tool_call>` at the end (a truncated completion) counts as a call if its JSON is whole."""
    calls, errors = [], []
    for i, m in enumerate(_CALL.finditer(text)):
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            errors.append(f"tool call {i + 1} is not valid JSON ({e.msg} at char {e.pos}): {body[:200]!r}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append(f'tool call {i + 1} must be an object with a string "name", got {body[:200]!r}')
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):                   # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            errors.append(f'tool call {i + 1} ({obj["name"]}): "arguments" must be an object, got {args!r}'[:300])
            continue
        calls.append(ToolCall(obj["name"], args, id=f"call_{i}"))
    return ParsedCalls(_CALL.sub("", text).strip(), calls, errors)


def format_tool_call(name: str, arguments: dict) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def takes_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (it reads the variable)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def tools_prompt(tools: list[dict]) -> str:
    """The system text that shows `tools` (OpenAI `{"type": "function", "function": {...}}` entries) to a model
    whose template cannot, in the Hermes wording."""
    lines = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to help with the user's request. The functions are:\n"
            f"<tools>\n{lines}\n</tools>\n"
            f'To call a function, write {OPEN}{{"name": <function-name>, "arguments": <arguments-object>}}{CLOSE}; '
            "its result comes back to you in a message from the tool.")


def _arguments(call: dict) -> dict:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    return json.loads(args) if isinstance(args, str) else args


def chat_messages(messages: list[dict], tools: list[dict] | None, template_takes_tools: bool
                  ) -> tuple[list[dict], list[dict] | None]:
    """OpenAI-style messages (assistant `tool_calls`, `tool` results) and tools, ready for the template:
    passed through where the template takes tools; otherwise the tools become (part of) the system message,
    past calls become Hermes text in the assistant's content and tool results are wrapped in
    `<tool_response>` tags, so every template renders them. Returns (messages, tools for the template)."""
    if template_takes_tools:
        out = []
        for m in messages:
            if m.get("role") == "assistant" and m.get("tool_calls"):
                m = {**m, "tool_calls": [{"type": "function", "id": c.get("id"), "function": {
                    "name": c.get("function", c)["name"], "arguments": _arguments(c)}} for c in m["tool_calls"]]}
            out.append(m)
        return out, tools or None
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "\n".join(format_tool_call(c.get("function", c)["name"], _arguments(c)) for c in m["tool_calls"])
            text = "\n".join(x for x in (m.get("content") or "", calls) if x)
            m = {"role": "assistant", "content": text}
        elif m.get("role") == "tool":
            m = {"role": "tool", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if tools:
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{tools_prompt(tools)}".strip()}
        else:
            out.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return out, None
