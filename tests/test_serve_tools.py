"""Tools and structured output in `rft serve`, over real HTTP with the official `openai` client: a tool-call
round trip (forced call, streamed and not, the result sent back) on the base model and on an adapter;
response_format json_schema valid for 100 samples at temperature 1 on a random model; json_object; bad tools
and response_format are 400s naming the field, and the server keeps serving."""
import json

import jsonschema
import openai
import pytest

from tests.serve_helpers import KEY, Running, _peft_adapter, server_root

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["a", "b"],
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                   "b": {"type": "integer", "minimum": 0, "maximum": 999}}}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 5},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
ASK = [{"role": "user", "content": "What is 12 + 30? Use the tool."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from rftkit.serve.app import ServeConfig, Server, build_app
    root, base = server_root(tmp_path_factory, "serve_tools")
    _peft_adapter(base, root / "adapters" / "agent", seed=3)
    cfg = ServeConfig(model=str(base), adapters=str(root / "adapters"), api_key=KEY, max_seq_len=1024, max_n=16,
                      device="cpu")
    server = Server(cfg)
    running = Running(build_app(server), server)
    yield running
    running.stop()


def _streamed_calls(chunks):
    """What the openai client's consumers do: tool_calls deltas accumulated by index, content joined."""
    calls, content, finish = {}, [], None
    for c in chunks:
        for ch in c.choices:
            content.append(ch.delta.content or "")
            for tc in ch.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return [calls[i] for i in sorted(calls)], "".join(content), finish


@pytest.mark.parametrize("model", ["base", "agent"])
def test_tool_call_round_trip(served, model):
    client = served.client()
    common = dict(model=model, messages=ASK, tools=[ADD, NOW], tool_choice="required", temperature=1.0, seed=5,
                  max_tokens=200, parallel_tool_calls=False)
    first = client.chat.completions.create(**common)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("add", "now")
    args = json.loads(call.function.arguments)
    if call.function.name == "add":
        jsonschema.validate(args, ADD["function"]["parameters"])

    calls, content, finish = _streamed_calls(client.chat.completions.create(stream=True, **common))
    assert finish == "tool_calls" and content == ""                 # same seed: the same call, streamed
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(call.function.name, args)]

    result = "42"
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": result}]
    second = client.chat.completions.create(model=model, messages=history, tools=[ADD, NOW], temperature=0,
                                            max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and its result are in the prompt: the Hermes text of both, at least
    assert second.usage.prompt_tokens >= first.usage.prompt_tokens + len(call.function.arguments) + len(result)
    named = client.chat.completions.create(**{**common, "tool_choice": {"type": "function",
                                                                        "function": {"name": "now"}}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["now"]


def test_tool_choice_none_and_auto_answer_text(served):
    """"none" parses nothing; "auto" on a model that writes no call is a plain answer (finish "stop"/"length")."""
    client = served.client()
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model="base", messages=ASK, tools=[ADD], tool_choice=choice,
                                           temperature=0, max_tokens=10)
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")


def test_response_format_json_schema_is_valid_for_100_samples(served):
    client = served.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    texts = []
    for i in range(10):
        r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": f"person {i}"}],
                                           response_format=fmt, temperature=1.0, n=10, seed=100 * i, max_tokens=120)
        assert all(c.finish_reason == "stop" for c in r.choices)
        texts += [c.message.content for c in r.choices]
    assert len(texts) == 100
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)
    assert len(set(texts)) > 50                              # sampled, not one answer repeated
    streamed = client.chat.completions.create(model="base", messages=ASK, response_format=fmt, temperature=1.0,
                                              seed=1, max_tokens=120, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)),
                        PERSON)


def test_response_format_json_object(served):
    client = served.client()
    r = client.chat.completions.create(model="base", messages=ASK, response_format={"type": "json_object"},
                                       temperature=1.0, n=8, seed=2, max_tokens=60)
    done = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert done and all(c.message.content.startswith("{") for c in r.choices)
    assert all(isinstance(json.loads(t), dict) for t in done)


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                                        "format": "ipv9"}}}},
     "response_format"),
    ({"tools": {"add": 1}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [ADD, ADD]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
     "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"type": "function", "id": "c",
                                                               "function": {"name": "add", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tools_and_response_format_are_400_naming_the_field(served, extra, param):
    body = {"model": "base", "messages": ASK, "max_tokens": 4, **extra}
    r = served.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    ok = served.client().chat.completions.create(model="base", messages=ASK, max_tokens=2, temperature=0)
    assert ok.choices[0].message.content is not None


def test_completions_endpoint_still_refuses_response_format(served):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        served.client().completions.create(model="base", prompt="x", max_tokens=2,
                                           extra_body={"response_format": {"type": "json_object"}})


@pytest.mark.parametrize("text, content, calls", [
    ('Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n'
     '{"name": "now", "arguments": {}}\n</tool_call>\nDone.', "Sure.Done.", [("add", {"a": 1, "b": 2}), ("now", {})]),
    ("no call here, only < and <tool and trailing spaces   ", "no call here, only < and <tool and trailing spaces   ",
     []),
    ("<tool_call>{broken</tool_call> after", "<tool_call>{broken</tool_call> after", []),
    ('x <tool_call>\n{"name": "add", "arguments": {"a": 1}}', "x", [("add", {"a": 1})]),   # cut at max_tokens
])
def test_tool_split_streams_to_the_whole_answer(text, content, calls):
    """The server's splitter: fed in random pieces, the content and calls equal those of the whole text."""
    import random

    from rftkit.serve.structured import ToolSplit
    whole, whole_calls = ToolSplit().add(text, True)
    assert whole == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole_calls] == calls
    for seed in range(30):
        r, split, parts, got, k = random.Random(seed), ToolSplit(), [], [], 0
        while k < len(text):
            n = r.randint(1, 6)
            piece, k = text[k:k + n], k + n
            c, new = split.add(piece, k >= len(text))
            parts.append(c)
            got += new
        assert "".join(parts) == content
        assert [c["function"]["name"] for c in got] == [name for name, _ in calls]
        assert [c["index"] for c in got] == list(range(len(calls)))
