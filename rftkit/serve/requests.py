"""The server's request checking and text generation, apart from HTTP: OpenAI and LoRAX bodies in, a checked
`Request` out; engine outputs in, text deltas (stop strings applied) out.

    req = parse_chat(body, max_n=16)        # APIError(400, "... names the field ...") on bad input
    async for d in deltas(stream, tok, req.n, req.stop, metrics):   # d.index, d.text, d.tokens, d.finish

Every field is checked at this boundary and a bad one is refused with its name and value: OpenAI fields we do
not implement (logit_bias, penalties, ...) are a 400 naming them, never ignored. Chat takes `tools`,
`tool_choice`, `parallel_tool_calls`, `response_format` (text, json_object, json_schema), `tool` messages and
assistant messages with `tool_calls` (rftkit.serve.structured turns them into a prompt, a grammar and answers).
A field may still be sent with its neutral value (`frequency_penalty: 0`, `logit_bias: {}`), as clients do.
Numbers must be finite and in range (a NaN temperature, a 4000-digit seed or a temperature of 1e-30 would reach
the sampler as garbage), strings valid Unicode (no lone surrogates), bodies at most MAX_DEPTH deep: each is a
400 here, never a 500 later.
Streamed and non-streamed answers come from the same `deltas`: joined, the stream is the answer.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field

from rftkit.sampling import SamplingParams
from rftkit.tokenizer import IncrementalDecoder, find_stop

MAX_STOPS = 4
MAX_STOP_CHARS = 1000                   # per stop string (each is searched for in every delta)
MAX_DEPTH = 32                          # JSON nesting of a body (OpenAI's bodies need 5)
INT64 = 1 << 63                         # seeds and other integers live in [-2**63, 2**63)
MIN_TEMPERATURE = 0.01                  # below it (but not 0), logits / T overflow float32 log-probs
MAX_TEMPERATURE = 1e4


def parse_json(raw: bytes):
    """Body bytes -> a JSON object; every way it can be malformed is a 400: syntax, bad UTF-8, NaN/Infinity
    (not JSON), integers of more digits than Python converts (4300), nesting deeper than MAX_DEPTH, strings
    with lone surrogates (\\ud800: not Unicode, no tokenizer takes them)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"malformed JSON body: nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:         # JSONDecodeError, int digit limit, NaN
        raise APIError(400, f"malformed JSON body: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
    _check_tree(body)
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _check_tree(body: dict) -> None:
    stack = [(body, 1, "")]
    while stack:
        v, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"malformed JSON body: nested more than {MAX_DEPTH} levels deep", where or None)
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            path = f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k)
            for text, what in ((k, "key"), (x, "value")):
                if isinstance(text, str) and not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise APIError(400, f"{path}: the {what} holds a lone surrogate (\\u{ord(text[e.start]):04x}) "
                                       f"at index {e.start}: not valid Unicode", path) from None
            if isinstance(x, (dict, list)):
                stack.append((x, depth + 1, path))


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers                  # e.g. Retry-After on a 503

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
                408: "timeout", 413: "request_too_large", 500: "server_error",
                503: "server_overloaded"}.get(self.status, "invalid_request_error")
        safe = lambda t: t if t is None else t.encode("utf-8", "backslashreplace").decode()  # noqa: E731
        return {"error": {"message": safe(self.message), "type": kind, "param": safe(self.param), "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection before its answer: not the server's error (counted as 499)."""


@dataclass
class Request:
    model: str                          # the `model` field as sent (base id, adapter name or base:adapter)
    prompts: list                       # completions: str or token-id lists; chat: [messages]
    max_tokens: int | None              # None = the rest of the context
    params: SamplingParams              # max_tokens filled per prompt by the server
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None         # None = off; k = top alternatives per token
    chat: bool = False
    echo: bool = False                  # LoRAX return_full_text
    details: bool = False               # LoRAX details
    tools: list[dict] | None = None     # OpenAI function entries, checked
    tool_choice: str = "auto"           # none | auto | required | function (tool_name)
    tool_name: str | None = None        # tool_choice {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool = True
    response_schema: dict | None = None  # response_format: {"type": "object"} for json_object, else its schema


# ----------------------------------------------------------------------------------------------------------
# field checks

def _show(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10 ** 60:
        return f"an integer of {len(str(abs(v)))} digits"
    try:
        s = json.dumps(v)
    except (ValueError, RecursionError):
        s = f"a {type(v).__name__}"
    return s if len(s) <= 60 else s[:57] + "..."


def _get(body: dict, name: str, kind: str, default=None, lo=None, hi=None, where: str = ""):
    v = body.get(name)
    if v is None:
        return default
    label = where + name
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": isinstance(v, bool), "str": isinstance(v, str), "dict": isinstance(v, dict)}[kind]
    if not ok:
        what = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
                "dict": "an object"}[kind]
        raise APIError(400, f"{label} must be {what}, got {_show(v)}", label)
    if kind == "number" and not math.isfinite(v) or kind in ("int", "number") and not -INT64 <= v < INT64:
        raise APIError(400, f"{label} must be a finite number within 64 bits, got {_show(v)}", label)
    if lo is not None and v < lo or hi is not None and v > hi:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(400, f"{label} must be {rng}, got {_show(v)}", label)
    return v


def _stops(v, label: str = "stop") -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"{label} must be a non-empty string or a list of them, got {_show(v)}", label)
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"{label} has {len(stops)} strings; at most {MAX_STOPS}", label)
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"{label}: a stop string has more than {MAX_STOP_CHARS} characters", label)
    return stops


def _unsupported(body: dict, known: set[str], neutral: dict) -> None:
    bad = [k for k, v in body.items()
           if k not in known and v is not None and v != neutral.get(k, None) and v not in ({}, [], False)]
    if bad:
        raise APIError(400, f"unsupported field{'s' if len(bad) > 1 else ''}: {', '.join(bad)} (rftkit serves "
                       f"plain text generation; see docs/serving.md)", bad[0], "unsupported_field")


# neutral values clients send by default; anything else in these fields is refused by name
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 1, "typical_p": 1,
           "response_format": {"type": "text"}, "tool_choice": "none", "best_of": 1, "adapter_source": "local",
           "suffix": ""}
IGNORED = {"user", "metadata", "store", "service_tier"}
SAMPLING = {"model", "temperature", "top_p", "top_k", "min_p", "n", "max_tokens", "stop", "seed", "stream",
            "stream_options", "ignore_eos"}


def _sampling(body: dict, max_n: int, where: str = "") -> SamplingParams:
    n = _get(body, "n", "int", 1, 1, where=where)
    if n > max_n:
        raise APIError(400, f"{where}n={n} exceeds the limit of {max_n} samples per request", where + "n")
    return SamplingParams(temperature=_temperature(_get(body, "temperature", "number", 1.0, 0, where=where), where),
                          top_p=float(_check_top_p(_get(body, "top_p", "number", 1.0, where=where), where)),
                          top_k=_get(body, "top_k", "int", 0, 0, where=where),
                          min_p=float(_get(body, "min_p", "number", 0.0, 0, 0.999, where=where)),
                          n=n, seed=_get(body, "seed", "int", None, where=where),
                          ignore_eos=_get(body, "ignore_eos", "bool", False, where=where))


def _temperature(v, where="") -> float:
    if v != 0 and not MIN_TEMPERATURE <= v <= MAX_TEMPERATURE:
        raise APIError(400, f"{where}temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}], "
                       f"got {_show(v)}", where + "temperature")
    return float(v)


def _check_top_p(v, where=""):
    if not 0 < v <= 1:
        raise APIError(400, f"{where}top_p must be in (0, 1], got {_show(v)}", where + "top_p")
    return v


def _ids(v) -> bool:
    """A non-empty list of token ids (integers; true/false are not token ids)."""
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _model(body: dict) -> str:
    m = body.get("model")
    if not isinstance(m, str):
        raise APIError(400, f"model must be a string (the base model id or an adapter name), got {_show(m)}",
                       "model")
    return m


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", "bool", False)
    opts = _get(body, "stream_options", "dict", {})
    _unsupported(opts, {"include_usage"}, {})
    return stream, _get(opts, "include_usage", "bool", False, where="stream_options.")


def parse_completion(body: dict, max_n: int, max_prompts: int = 64) -> Request:
    _unsupported(body, SAMPLING | IGNORED | {"prompt", "logprobs"}, NEUTRAL)      # echo / suffix: refused
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise APIError(400, f"prompt must be a string, a list of strings, or token ids, got {_show(prompt)}",
                       "prompt")
    if len(prompts) > max_prompts:
        raise APIError(400, f"prompt has {len(prompts)} prompts; at most {max_prompts} per request (--max-prompts)",
                       "prompt")
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise APIError(400, f"best_of={_show(body['best_of'])} is not supported (only best_of = n)", "best_of")
    stream, usage = _stream_flags(body)
    return Request(_model(body), prompts, _get(body, "max_tokens", "int", 16, 1), _sampling(body, max_n),
                   _stops(body.get("stop")), stream, usage, _get(body, "logprobs", "int", None, 0, 20))


def _text(content, where: str, optional: bool = False) -> str:
    if content is None and optional:
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.content[{j}]: only text parts are supported, got {_show(part)}",
                               f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string, got {_show(content)}", f"{where}.content")
    return content


def _past_calls(v, where: str) -> list[dict]:
    """An assistant message's `tool_calls`: [{"id", "type": "function", "function": {"name", "arguments": JSON}}]."""
    if not isinstance(v, list) or not v:
        raise APIError(400, f"{where} must be a non-empty list of calls, got {_show(v)}", where)
    out = []
    for j, c in enumerate(v):
        at = f"{where}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or c.get("type", "function") != "function":
            raise APIError(400, f'{at} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}, '
                           f"got {_show(c)}", at)
        args = fn.get("arguments", "{}")
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise APIError(400, f"{at}.function.arguments must be a JSON object (as a string), got {_show(args)}",
                           f"{at}.function.arguments")
        out.append({"id": _get(c, "id", "str", "", where=at + "."), "type": "function",
                    "function": {"name": fn["name"], "arguments": parsed}})
    return out


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise APIError(400, f"messages must be a non-empty list, got {_show(v)}", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object, got {_show(m)}", where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"{where}.role must be system, developer, user, assistant or tool, got {_show(role)}",
                           f"{where}.role")
        extra = {"tool_calls"} if role == "assistant" else {"tool_call_id"} if role == "tool" else set()
        _unsupported(m, {"role", "content", "name"} | extra, {})
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise APIError(400, f"{where}.name must be a string, got {_show(m['name'])}", f"{where}.name")
        calls = m.get("tool_calls") if role == "assistant" else None
        msg = {"role": "system" if role == "developer" else role,
               "content": _text(m.get("content"), where, optional=calls is not None)}
        if calls is not None:
            msg["tool_calls"] = _past_calls(calls, f"{where}.tool_calls")
        if role == "tool":
            msg["tool_call_id"] = _get(m, "tool_call_id", "str", "", where=where + ".")
        out.append(msg)
    return out


NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _tools(body: dict) -> tuple[list[dict] | None, str, str | None]:
    """(tools, tool_choice, the forced function's name) of a chat body; every entry checked."""
    import jsonschema
    v = body.get("tools")
    tools = None
    if v is not None and v != []:
        if not isinstance(v, list):
            raise APIError(400, f"tools must be a list of functions, got {_show(v)}", "tools")
        tools = []
        for i, t in enumerate(v):
            at = f"tools[{i}]"
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or t.get("type") != "function":
                raise APIError(400, f'{at} must be {{"type": "function", "function": {{...}}}}, got {_show(t)}', at)
            _unsupported(t, {"type", "function"}, {})
            _unsupported(fn, {"name", "description", "parameters", "strict"}, {})
            name = fn.get("name")
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise APIError(400, f"{at}.function.name must be 1-64 letters, digits, _ . or -, got {_show(name)}",
                               f"{at}.function.name")
            if any(x["function"]["name"] == name for x in tools):
                raise APIError(400, f"{at}.function.name {name!r} is given twice", f"{at}.function.name")
            _get(fn, "description", "str", where=f"{at}.function.")
            params = _get(fn, "parameters", "dict", {"type": "object", "properties": {}}, where=f"{at}.function.")
            try:
                jsonschema.validators.validator_for(params).check_schema(params)
            except jsonschema.SchemaError as e:
                raise APIError(400, f"{at}.function.parameters is not a valid JSON schema: {e.message[:200]}",
                               f"{at}.function.parameters") from None
            tools.append({"type": "function", "function": {k: fn[k] for k in ("name", "description") if k in fn}
                          | {"parameters": params}})
    choice = body.get("tool_choice")
    if choice is None:
        return tools, "auto", None
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise APIError(400, 'tool_choice "required" needs tools', "tool_choice")
        return tools, choice, None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise APIError(400, f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                       f'{{"name": ...}}}}, got {_show(choice)}', "tool_choice")
    if not any(t["function"]["name"] == name for t in tools or []):
        raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
    return tools, "function", name


def _response_schema(body: dict) -> dict | None:
    """response_format -> the JSON schema the answer must satisfy ({"type": "object"} for json_object)."""
    import jsonschema
    v = body.get("response_format")
    kind = v.get("type") if isinstance(v, dict) else None
    if v is None or kind == "text":
        return None
    if kind == "json_object":
        _unsupported(v, {"type"}, {})
        return {"type": "object"}
    if kind != "json_schema":
        raise APIError(400, f'response_format must be {{"type": "text" | "json_object" | "json_schema", ...}}, got '
                       f"{_show(v)}", "response_format")
    _unsupported(v, {"type", "json_schema"}, {})
    js = _get(v, "json_schema", "dict", None, where="response_format.")
    if js is None:
        raise APIError(400, 'response_format.json_schema is required with "type": "json_schema"',
                       "response_format.json_schema")
    _unsupported(js, {"name", "description", "schema", "strict"}, {})
    where = "response_format.json_schema."
    name = _get(js, "name", "str", None, where=where)
    if name is None or not NAME.fullmatch(name):
        raise APIError(400, f"{where}name must be 1-64 letters, digits, _ . or -, got {_show(name)}", where + "name")
    _get(js, "strict", "bool", None, where=where)
    schema = _get(js, "schema", "dict", {"type": "object"}, where=where)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise APIError(400, f"{where}schema is not a valid JSON schema: {e.message[:200]}", where + "schema") from None
    return schema


def parse_chat(body: dict, max_n: int) -> Request:
    _unsupported(body, SAMPLING | IGNORED | {"messages", "logprobs", "top_logprobs", "max_completion_tokens",
                                             "tools", "tool_choice", "parallel_tool_calls", "response_format"},
                 NEUTRAL)
    messages = _messages(body.get("messages"))
    tools, choice, name = _tools(body)
    schema = _response_schema(body)
    logprobs = _get(body, "logprobs", "bool", False)
    top = _get(body, "top_logprobs", "int", None, 0, 20)
    if top and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = _get(body, "max_completion_tokens", "int", None, 1)
    max_tokens = _get(body, "max_tokens", "int", max_tokens, 1)
    stream, usage = _stream_flags(body)
    return Request(_model(body), [messages], max_tokens, _sampling(body, max_n), _stops(body.get("stop")),
                   stream, usage, (top or 0) if logprobs else None, chat=True, tools=tools, tool_choice=choice,
                   tool_name=name, parallel_tool_calls=_get(body, "parallel_tool_calls", "bool", True),
                   response_schema=schema)


# decoder_input_details, watermark, truncate, adapter_source other than "local", ... are refused by name
LORAX = {"adapter_id", "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "stop",
         "seed", "details", "return_full_text", "ignore_eos_token", "api_token"}   # api_token: local adapters need none


def parse_lorax(body: dict, base_id: str) -> Request:
    """LoRAX / TGI `/generate` body: {"inputs": str, "parameters": {...}}; greedy unless sampling is asked."""
    _unsupported(body, {"inputs", "parameters", "stream"}, {})
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise APIError(400, f"inputs must be a non-empty string, got {_show(inputs)}", "inputs")
    p = _get(body, "parameters", "dict", {})
    _unsupported(p, LORAX | {"repetition_penalty", "frequency_penalty", "presence_penalty", "typical_p",
                             "best_of"}, NEUTRAL)
    where = "parameters."
    sample = _get(p, "do_sample", "bool", False, where=where) or any(
        p.get(k) is not None for k in ("temperature", "top_p", "top_k"))
    temperature = _get(p, "temperature", "number", 1.0, 0, where=where) if sample else 0.0
    params = SamplingParams(temperature=_temperature(temperature, where),
                            top_p=float(_check_top_p(_get(p, "top_p", "number", 1.0, where=where), where)),
                            top_k=_get(p, "top_k", "int", 0, 0, where=where),
                            seed=_get(p, "seed", "int", None, where=where),
                            ignore_eos=_get(p, "ignore_eos_token", "bool", False, where=where))
    adapter = _get(p, "adapter_id", "str", None, where=where)
    return Request(adapter or base_id, [inputs], _get(p, "max_new_tokens", "int", 20, 1, where=where), params,
                   _stops(p.get("stop"), where + "stop"), echo=_get(p, "return_full_text", "bool", False, where=where),
                   details=_get(p, "details", "bool", False, where=where))


# ----------------------------------------------------------------------------------------------------------
# engine outputs -> text deltas

@dataclass
class Delta:
    index: int                          # choice index: prompt i, sample j -> i * n + j
    text: str
    tokens: list                        # (token id, logprob, top alternatives [(id, logprob)] or None)
    finish: str | None = None           # "eos" | "stop_sequence" | "length" once the choice is done


class _Seq:
    def __init__(self, tok):
        self.decoder = IncrementalDecoder(tok)
        self.pending = ""               # text held back: it may be the start of a stop string
        self.tokens: list = []          # not yet handed out with a delta
        self.count = 0
        self.done = False


LOGPROB_FLOOR = -9999.0                 # OpenAI's value for "effectively impossible": JSON has no -Infinity


class NonFiniteError(ValueError):
    """The model produced a NaN (or +inf) log-prob: its weights, or its adapter's, overflow."""


def _logprob(lp: float) -> float:
    if lp != lp or lp == math.inf:
        raise NonFiniteError(f"the model produced a non-finite log-prob ({lp}); its weights (or its adapter's) "
                             f"overflow float32")
    return lp if lp > LOGPROB_FLOOR else LOGPROB_FLOOR


def _tops(top):
    return None if top is None else tuple((t, _logprob(lp)) for t, lp in top)     # tuples: see serve._chat_logprobs


async def accept(stream) -> None:
    """Wait until the engine thread took every request of `stream`; raise what it refused with."""
    for _ in stream.rids:
        _, item = await stream.queue.get()
        if isinstance(item, BaseException):
            raise item


async def deltas(stream, tok, n: int, stops: list[str], metrics, counts: dict):
    """Text deltas of every choice of an accepted `stream`, stop strings applied, until all are done.
    `counts` receives the generated tokens per choice index and the requests the engine has not finished
    (`counts["unfinished"]`: to abort)."""
    seqs = {(rid, j): _Seq(tok) for rid in stream.rids for j in range(n)}
    first = {rid: i for i, rid in enumerate(stream.rids)}
    left = len(seqs)
    engine_left = {rid: n for rid in stream.rids}
    counts["unfinished"] = set(stream.rids)
    first_token = True
    while left:
        rid, out = await stream.queue.get()
        if isinstance(out, BaseException):
            raise out
        if first_token:
            metrics.observe("time_to_first_token_seconds", time.perf_counter() - stream.t_submit)
            first_token = False
        if out.finished:
            engine_left[rid] -= 1
            if not engine_left[rid]:
                counts["unfinished"].discard(rid)
        s = seqs[(rid, out.index)]
        if s.done:
            continue
        ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids   # the EOS is not text
        s.count += len(out.token_ids)
        tops = out.top_logprobs or [None] * len(out.token_ids)
        s.tokens += [(t, _logprob(lp), _tops(top)) for t, lp, top in zip(out.token_ids, out.logprobs, tops)]
        s.pending += s.decoder.add(ids) + (s.decoder.flush() if out.finished else "")
        finish = None
        hit, hold = find_stop(s.pending, stops) if stops else (None, 0)
        if hit is not None:
            text, finish = s.pending[:hit], "stop_sequence"
            s.pending = ""
        else:
            cut = len(s.pending) if out.finished else len(s.pending) - hold
            text, s.pending = s.pending[:cut], s.pending[cut:]
            if out.finished:
                finish = "length" if out.finish_reason == "length" else "eos"
        index = first[rid] * n + out.index
        if finish:
            s.done = True
            left -= 1
            counts[index] = s.count
        if text or finish:
            yield Delta(index, text, s.tokens, finish)
            s.tokens = []
