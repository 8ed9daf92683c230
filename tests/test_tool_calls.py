"""Tool calls: parsing the model's text, and prompts for templates with and without tool support."""
import json

from rftkit.tool_calls import chat_messages, format_tool_call, parse_tool_calls, takes_tools
from rftkit.tokenizer import compile_template

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}


def test_calls_are_parsed_in_order_and_broken_ones_reported_not_run():
    text = ('Let me compute. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
            '<tool_call>{"name": "mul", "arguments": "{\\"a\\": 3}"}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": </tool_call>'
            '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "x", "arguments": [1]}</tool_call>')
    p = parse_tool_calls(text)
    assert p.content == "Let me compute."
    assert [(c.name, c.arguments) for c in p.calls] == [("add", {"a": 1, "b": 2}), ("mul", {"a": 3})]
    assert len(p.errors) == 3 and "not valid JSON" in p.errors[0] and '"name"' in p.errors[1]
    assert '"arguments" must be an object' in p.errors[2]


def test_a_truncated_call_counts_only_if_its_json_is_whole():
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}').calls[0].name == "f"
    assert parse_tool_calls('<tool_call>{"name": "f", "argu').errors
    assert parse_tool_calls("no calls here").calls == []


def test_format_round_trips_through_parse():
    p = parse_tool_calls("ok " + format_tool_call("add", {"a": 12, "b": "x"}))
    assert p.content == "ok" and (p.calls[0].name, p.calls[0].arguments) == ("add", {"a": 12, "b": "x"})


PLAIN = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WITH_TOOLS = ("{% if tools %}TOOLS:{{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n"
              "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
              "{% for c in m.get('tool_calls', []) %}[{{ c.function.name }}({{ c.function.arguments | tojson }})]"
              "{% endfor %}\n{% endfor %}")


def test_a_template_without_tools_sees_them_as_system_text_and_calls_as_hermes_text():
    assert not takes_tools(PLAIN) and takes_tools(WITH_TOOLS)
    history = [{"role": "user", "content": "1+2?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
               {"role": "tool", "tool_call_id": "c0", "content": "3"}]
    msgs, tools = chat_messages(history, [ADD], takes_tools(PLAIN))
    assert tools is None and msgs[0]["role"] == "system" and json.dumps(ADD["function"]) in msgs[0]["content"]
    text = compile_template(PLAIN).render(messages=msgs, add_generation_prompt=True)
    assert format_tool_call("add", {"a": 1}) in text and "<tool_response>\n3\n</tool_response>" in text
    assert parse_tool_calls(msgs[2]["content"]).calls[0].arguments == {"a": 1}


def test_a_template_with_tools_gets_them_and_calls_with_object_arguments():
    history = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]}]
    msgs, tools = chat_messages(history, [ADD], True)
    assert tools == [ADD] and msgs[0] == history[0]
    text = compile_template(WITH_TOOLS).render(messages=msgs, tools=tools)
    assert text.startswith("TOOLS:add\n") and '[add({"a": 1})]' in text
