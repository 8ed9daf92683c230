"""OpenAI's grader templating: `{{ item.reference_answer }}`, `{{ sample.output_text }}`,
`{{ sample.output_tools[0].function.name }}`.

    render("Ref: {{ item.answer }}, got {{sample.output_text}}", item=row, sample=sample_namespace(text))

As OpenAI defines it: a `{{ }}` holds `namespace.path`; the only namespaces are `item` (the dataset row) and
`sample` (the model's output: output_text, output_json when the text is JSON, output_tools, choices); the path
is JSON-path-like (dots and [index]). A string value is inserted as is, anything else as JSON. A variable the
row does not have is an error naming it and the keys that are there (OpenAI's invalid_variable_error), never
an empty string. Not jinja: `{% %}`, filters and expressions are not part of the format.
"""
from __future__ import annotations

import json
import re

NAMESPACES = ("item", "sample")
_VAR = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_STEP = re.compile(r"\.?([A-Za-z_][\w-]*)|\[(\d+)\]|\[[\"']([^\"']+)[\"']\]")


class TemplateError(ValueError):
    pass


def parse_path(expr: str) -> tuple[str, list]:
    """"sample.output_tools[0].function.name" -> ("sample", ["output_tools", 0, "function", "name"])."""
    m = re.match(r"([A-Za-z_]\w*)(.*)", expr)
    if not m or m.group(1) not in NAMESPACES:
        raise TemplateError(f"template variable {{{{ {expr} }}}} must start with item. or sample. "
                            f"(the only namespaces OpenAI's graders define)")
    ns, rest = m.group(1), m.group(2)
    steps, pos = [], 0
    while pos < len(rest):
        s = _STEP.match(rest, pos)
        if not s or s.end() == pos:
            raise TemplateError(f"template variable {{{{ {expr} }}}}: cannot read {rest[pos:]!r} (use a.b, a[0], "
                                f"a['key'])")
        steps.append(s.group(1) if s.group(1) is not None else (int(s.group(2)) if s.group(2) else s.group(3)))
        pos = s.end()
    if not steps:
        raise TemplateError(f"template variable {{{{ {expr} }}}} names a namespace, not a variable in it")
    return ns, steps


def variables(text: str) -> list[str]:
    """The variables a template uses, checked (a TemplateError names a bad one)."""
    found = _VAR.findall(text)
    for expr in found:
        parse_path(expr)
    return found


def sample_namespace(completion: str) -> dict:
    """The `sample` namespace of one completion, as OpenAI fills it for a chat sample."""
    ns = {"output_text": completion, "output_tools": [],
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": completion}}]}
    try:
        value = json.loads(completion)
        if isinstance(value, (dict, list)):
            ns["output_json"] = value
    except (json.JSONDecodeError, ValueError):
        pass
    return ns


def lookup(expr: str, item: dict, sample: dict):
    ns, steps = parse_path(expr)
    value = item if ns == "item" else sample
    walked = ns
    for step in steps:
        ok = (isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value)) or \
             (isinstance(step, str) and isinstance(value, dict) and step in value)
        if not ok:
            have = sorted(value) if isinstance(value, dict) else (f"a list of {len(value)}" if isinstance(value, list)
                                                                  else type(value).__name__)
            raise TemplateError(f"template variable {{{{ {expr} }}}}: {walked} has no "
                                f"{'[%d]' % step if isinstance(step, int) else repr(step)} (it has {have})")
        value = value[step]
        walked += f"[{step}]" if isinstance(step, int) else f".{step}"
    return value


def render(text: str, item: dict, sample: dict) -> str:
    def one(m):
        value = lookup(m.group(1), item, sample)
        return value if isinstance(value, str) else json.dumps(value)
    return _VAR.sub(one, text)
