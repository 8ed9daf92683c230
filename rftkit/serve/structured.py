"""Tools and structured output in the server: a chat request's prompt (tools shown through the template), its
grammar (response_format, a forced tool call), and the model's text split into content and OpenAI `tool_calls`.

    messages, kw = prompt(req, messages, tok)       # tok.encode_chat(messages, **kw)
    params.grammar = grammar(req, grammars)         # None: free text
    split = ToolSplit()                             # per choice, when req parses calls (parses_calls(req))
    content, calls = split.add(text, final)         # calls: [{"id", "type": "function", "function": {...}}]

The prompt format and the parser are rftkit.tool_calls' (Hermes `<tool_call>` JSON), the same as the training
rollouts', so an adapter trained to call tools is served with the prompt it was trained on. tool_choice
"required" or a named function is enforced by a grammar that admits only such calls (rftkit.constrained);
"auto" parses whatever calls the model writes; "none" shows the tools and parses nothing. A streamed choice
streams its content until a `<tool_call>` begins (a possible start of the tag is held back), and sends each
call whole, as one `tool_calls` delta, once its `</tool_call>` arrives: what the `openai` client accumulates.
Non-streamed answers come from the same splitter, so a joined stream equals the answer. A call whose JSON is
broken stays in the content as the model wrote it.
"""
from __future__ import annotations

import json
import uuid

from rftkit.tool_calls import CLOSE, OPEN, chat_messages, parse_tool_calls, takes_tools


def prompt(req, messages: list[dict], tok) -> tuple[list[dict], dict]:
    """The messages and template keywords of one chat prompt, tools shown the way the template takes them."""
    tools = req.tools if req.tools else None
    if tools is None and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages, {}
    msgs, tools = chat_messages(messages, tools, takes_tools(tok.chat_template))
    return msgs, ({"tools": tools} if tools else {})


def grammar(req, grammars):
    """The request's constraint, or None (free text). `grammars`: a callable giving rftkit.constrained.Grammars."""
    forced = req.tools and req.tool_choice in ("required", "function")
    if forced:
        return grammars().tool_calls(req.tools, name=req.tool_name, parallel=req.parallel_tool_calls,
                                     what="tools")
    if req.response_schema is None:
        return None
    if req.tools and req.tool_choice == "auto":      # the JSON answer, or calls
        return grammars().tool_calls(req.tools, parallel=req.parallel_tool_calls,
                                     content_schema=req.response_schema, what="response_format")
    return grammars().json_schema(req.response_schema, what="response_format")


def parses_calls(req) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def _hold(text: str) -> int:
    """Characters at the end of `text` that may begin a `<tool_call>` tag."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0


class ToolSplit:
    """One choice's text, split as it arrives into content and whole tool calls. Whitespace next to a call is
    not content; trailing whitespace waits for the next text (a call may follow), so a stream and the whole
    text split the same way."""

    def __init__(self):
        self.buf = ""
        self.calls = 0                  # calls handed out so far
        self.after_call = False         # the next content's leading whitespace follows a call

    def add(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """(content to send now, calls completed now); `final`: the choice ended, let nothing wait."""
        self.buf += text
        content, calls = [], []
        while True:
            i = self.buf.find(OPEN)
            j = self.buf.find(CLOSE, i) if i >= 0 else -1
            if i < 0 or j < 0 and not final:
                stop = len(self.buf) if i < 0 else i
                cut = stop if final else len(self.buf[:stop - (_hold(self.buf) if i < 0 else 0)].rstrip())
                content.append(self._content(self.buf[:cut]))
                self.buf = self.buf[cut:]
                break
            end = len(self.buf) if j < 0 else j + len(CLOSE)
            parsed = parse_tool_calls(self.buf[i:end])
            if not parsed.calls:        # broken JSON: the model's text, as it wrote it
                content.append(self._content(self.buf[:end]))
                self.buf = self.buf[end:]
                continue
            content.append(self._content(self.buf[:i].rstrip()))
            for c in parsed.calls:
                calls.append({"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                              "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}})
                self.calls += 1
            self.after_call = True
            self.buf = self.buf[end:]
        return "".join(content), calls

    def _content(self, text: str) -> str:
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        return text
