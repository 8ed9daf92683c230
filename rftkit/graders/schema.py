"""OpenAI grader objects, checked before anything runs: every field, every template variable, the formula of
a `multi` grader and the `grade` function of a `python` grader, with errors that name the field.

    spec = read_grader("grader.json")      # GraderError: "grader.graders.args.evaluation_metric: must be one of ..."

The fields are OpenAI's (fine-tuning's reinforcement method and its graders API): string_check {input,
reference, operation}, text_similarity {input, reference, evaluation_metric}, python {source, image_tag},
score_model {input, model, range, sampling_params}, multi {graders, calculate_output}; all take `type`,
`name` and `pass_threshold`. A field that is not one of these is an error too (a typo such as "refrence"
would otherwise grade against nothing). label_model is an evals grader that reinforcement fine-tuning does not
take; it is refused with that reason.
"""
from __future__ import annotations

import json
from pathlib import Path

from rftkit.graders.multi import Formula
from rftkit.graders.python_grader import check_source
from rftkit.graders.template import variables
from rftkit.graders.text_similarity import METRICS, OPERATIONS, check_metric

COMMON = {"type", "name", "pass_threshold"}
FIELDS = {  # type -> (required, optional)
    "string_check": ({"input", "reference", "operation"}, set()),
    "text_similarity": ({"input", "reference", "evaluation_metric"}, set()),
    "python": ({"source"}, {"image_tag"}),
    "score_model": ({"input", "model"}, {"range", "sampling_params"}),
    "multi": ({"graders", "calculate_output"}, set()),
}
SAMPLING = {"temperature", "top_p", "seed", "max_completions_tokens", "max_completion_tokens", "max_tokens",
            "reasoning_effort"}
ROLES = ("system", "developer", "user", "assistant")


class GraderError(ValueError):
    """A grader object that cannot run; the message starts with the field's path (grader.graders.x.input)."""


def _fail(where: str, what: str):
    raise GraderError(f"{where}: {what}")


def _template(where: str, text) -> None:
    if not isinstance(text, str):
        _fail(where, f"must be a string (template), got {text!r}")
    try:
        variables(text)
    except ValueError as e:
        _fail(where, str(e))


def _number(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, f"must be a number, got {value!r}")
    return float(value)


def message_text(where: str, content) -> str:
    """A score_model message's content as one template string (text parts joined)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text") \
                and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            _fail(f"{where}[{i}]", f"only text content is supported (a string or an input_text part), got {part!r}")
    return "\n".join(texts)


def validate(spec, where: str = "grader") -> dict:
    """Check one grader object (recursively for multi); return it unchanged."""
    if not isinstance(spec, dict):
        _fail(where, f"a grader is a JSON object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind == "label_model":
        _fail(f"{where}.type", "label_model is an evals grader; reinforcement fine-tuning (and rftkit) takes "
                               "string_check, text_similarity, python, score_model or multi")
    if kind not in FIELDS:
        _fail(f"{where}.type", f"must be one of {sorted(FIELDS)}, got {kind!r}")
    required, optional = FIELDS[kind]
    missing = sorted(required - set(spec))
    if missing:
        _fail(f"{where}.{missing[0]}", f"missing (a {kind} grader needs {sorted(required)})")
    unknown = sorted(set(spec) - required - optional - COMMON)
    if unknown:
        _fail(f"{where}.{unknown[0]}", f"not a field of a {kind} grader (its fields: "
                                       f"{sorted(required | optional | COMMON)})")
    if "name" in spec and not isinstance(spec["name"], str):
        _fail(f"{where}.name", f"must be a string, got {spec['name']!r}")
    if "pass_threshold" in spec:
        _number(f"{where}.pass_threshold", spec["pass_threshold"])
    if kind in ("string_check", "text_similarity"):
        _template(f"{where}.input", spec["input"])
        _template(f"{where}.reference", spec["reference"])
    if kind == "string_check" and spec["operation"] not in OPERATIONS:
        _fail(f"{where}.operation", f"must be one of {OPERATIONS}, got {spec['operation']!r}")
    if kind == "text_similarity":
        if spec["evaluation_metric"] not in METRICS:
            _fail(f"{where}.evaluation_metric", f"must be one of {METRICS}, got {spec['evaluation_metric']!r}")
        try:
            check_metric(spec["evaluation_metric"])
        except ValueError as e:
            _fail(f"{where}.evaluation_metric", str(e))
    if kind == "python":
        try:
            check_source(spec["source"])
        except ValueError as e:
            _fail(f"{where}.source", str(e))
    if kind == "score_model":
        _score_model(where, spec)
    if kind == "multi":
        graders = spec["graders"]
        if not isinstance(graders, dict) or not graders:
            _fail(f"{where}.graders", f"must be an object of named graders, got {graders!r}")
        for name, sub in graders.items():
            if not name.isidentifier():
                _fail(f"{where}.graders.{name}", "a grader's key must be a name a formula can use (letters, "
                                                 "digits, _)")
            validate(sub, f"{where}.graders.{name}")
        try:
            Formula(spec["calculate_output"], set(graders))
        except ValueError as e:
            _fail(f"{where}.calculate_output", str(e))
    return spec


def _score_model(where: str, spec: dict) -> None:
    if not isinstance(spec["model"], str) or not spec["model"]:
        _fail(f"{where}.model", f"must be the judge model's name, got {spec['model']!r}")
    msgs = spec["input"]
    if not isinstance(msgs, list) or not msgs:
        _fail(f"{where}.input", f"must be a non-empty list of messages, got {msgs!r}")
    for i, m in enumerate(msgs):
        w = f"{where}.input[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
            _fail(w, f"a message is {{'role': one of {ROLES}, 'content': ...}}, got {m!r}")
        extra = sorted(set(m) - {"role", "content", "type"})
        if extra:
            _fail(f"{w}.{extra[0]}", "not a field of a message (role, content, type)")
        _template(f"{w}.content", message_text(f"{w}.content", m["content"]))
    rng = spec.get("range", [0, 1])
    if not (isinstance(rng, list) and len(rng) == 2) or _number(f"{where}.range", rng[0]) >= _number(f"{where}.range",
                                                                                                      rng[1]):
        _fail(f"{where}.range", f"must be [low, high] with low < high, got {rng!r}")
    params = spec.get("sampling_params", {})
    if not isinstance(params, dict):
        _fail(f"{where}.sampling_params", f"must be an object, got {params!r}")
    unknown = sorted(set(params) - SAMPLING)
    if unknown:
        _fail(f"{where}.sampling_params.{unknown[0]}", f"not a sampling parameter ({sorted(SAMPLING)})")


def read_grader(path_or_spec) -> dict:
    """A grader object from a JSON file (or a dict), validated."""
    if isinstance(path_or_spec, dict):
        return validate(path_or_spec)
    file = Path(path_or_spec)
    if not file.is_file():
        raise FileNotFoundError(f"grader file {file} does not exist")
    try:
        spec = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise GraderError(f"{file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return validate(spec)
