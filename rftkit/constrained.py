"""Constrained decoding: which tokens a grammar (a JSON schema, a forced tool call) allows next, per sequence.

    grammars = Grammars(tok, vocab_size=model.cfg.vocab_size)           # once per tokenizer (llguidance's)
    params = SamplingParams(..., grammar=grammars.json_schema(schema))   # the engine gives each sample a matcher

The matching is llguidance's (an Earley parser over the tokenizer's byte strings: a mask for a 49k vocabulary
in tens of microseconds). A `Grammar` is compiled and checked once per request; `Grammar.matcher()` is one
sample's state, advanced by the engine with every token it samples; `allowed` turns the matchers of a step's
constrained rows into one boolean mask [b, V]. Rows without a grammar never reach this module, so a batch that mixes
constrained and free rows costs the free rows nothing but the constrained rows' mask time.

JSON is generated compact (no free whitespace): a model cannot pad an object with blanks until max_tokens.
"""
from __future__ import annotations

import json

import torch

COMPACT = {"whitespace_flexible": False}


class Grammar:
    """A checked llguidance grammar over one tokenizer; `matcher()` starts a sample's state."""

    def __init__(self, grammars: "Grammars", text: str, what: str):
        import llguidance
        error = llguidance.LLMatcher.validate_grammar(text, grammars.lltok)
        if error:
            raise ValueError(f"{what}: {error[:300]}")
        self.grammars, self.text, self.what = grammars, text, what

    def matcher(self):
        import llguidance
        m = llguidance.LLMatcher(self.grammars.lltok, self.text, log_level=0)
        if m.is_error():
            raise ValueError(f"{self.what}: {m.get_error()[:300]}")
        return m


class Grammars:
    """Grammars over one tokenizer (`rftkit.tokenizer.Tokenizer`): JSON schemas, any JSON object, Lark text,
    Hermes tool calls. Building the llguidance tokenizer reads the whole vocabulary: do it once and keep it."""

    def __init__(self, tok, vocab_size: int):
        import llguidance
        if vocab_size < tok.vocab_size:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens")
        self.vocab_size = vocab_size
        self.lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab_size,
                                            eos_token=list(tok.eos_token_ids) or None)
        self.executor = llguidance.LLExecutor(num_threads=1)    # beside the forward (PendingMasks): one thread

    def json_schema(self, schema: dict | None, what: str = "json_schema") -> Grammar:
        """Text that is one JSON value valid under `schema` (None: any JSON object)."""
        import llguidance
        if schema is None:
            schema = {"type": "object"}
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        return Grammar(self, text, what)

    def lark(self, source: str, what: str = "grammar") -> Grammar:
        import llguidance
        return Grammar(self, llguidance.LLMatcher.grammar_from_lark(source), what)

    def tool_calls(self, tools: list[dict], name: str | None = None, parallel: bool = True,
                   content_schema: dict | None = None, what: str = "tools") -> Grammar:
        """One or more Hermes calls (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`) of `tools`
        (OpenAI function entries; only `name` if given), arguments valid under each tool's `parameters`;
        with `content_schema`, a JSON value under it is the other choice (tool_choice "auto" + response_format).
        The call's JSON is what rftkit.tool_calls.parse_tool_calls reads."""
        from rftkit.tool_calls import CLOSE, OPEN
        calls = []
        for t in tools:
            fn = t.get("function", t)
            if name is None or fn["name"] == name:
                calls.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                              "properties": {"name": {"const": fn["name"]},
                                             "arguments": fn.get("parameters") or {"type": "object"}}})
        if not calls:
            raise ValueError(f"{what}: no function named {name!r}")
        call = {"anyOf": calls} if len(calls) > 1 else calls[0]
        rules = [f"call: {json.dumps(OPEN + chr(10))} %json {json.dumps({**call, 'x-guidance': COMPACT})} "
                 f"{json.dumps(chr(10) + CLOSE)}",
                 "calls: call" + ' ("\\n" call)*' * parallel]
        start = "start: calls"
        if content_schema is not None:
            rules.append(f"content: %json {json.dumps({**content_schema, 'x-guidance': COMPACT})}")
            start += " | content"
        return self.lark("\n".join([start] + rules), what)


def response_grammar(spec: str, tok, vocab_size: int) -> Grammar:
    """`--response-format`: "json_object" (any JSON object) or a JSON schema file (a .json file, either the schema
    itself or OpenAI's {"name", "schema"} json_schema entry) -> the grammar every rollout completion follows."""
    from pathlib import Path
    if spec == "json_object":
        return Grammars(tok, vocab_size).json_schema(None, what="response_format")
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f'response_format {spec!r}: give "json_object" or a JSON schema file (.json)')
    try:
        schema = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"response_format {spec}: not JSON ({e})") from None
    if isinstance(schema, dict) and isinstance(schema.get("schema"), dict) and "name" in schema:
        schema = schema["schema"]
    return Grammars(tok, vocab_size).json_schema(schema, what=f"response_format {spec}")


def allowed(grammars: list[Grammar], matchers: list, vocab_size: int) -> torch.Tensor:
    """Boolean masks [b, V] of the tokens each row's matcher (of the row's grammar) allows next: its EOS alone
    once it is done, or when it failed (a broken matcher ends its row rather than sampling from nothing)."""
    import numpy as np
    words = (vocab_size + 31) // 32
    bits = np.zeros((len(matchers), words), dtype=np.int32)                       # [b, ceil(V / 32)]
    grammars[0].grammars.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                                          bits.ctypes.data, words * 4, len(matchers))
    flat = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]   # bit v = token v
    mask = torch.from_numpy(flat).bool()
    for i in (~mask.any(1)).nonzero().flatten().tolist():
        mask[i, grammars[i].grammars.lltok.eos_token] = True
    return mask


class PendingMasks:
    """`allowed` computed on a helper thread while the caller runs the forward (llguidance releases the GIL), so
    the masks of a batch's constrained rows cost its free rows little or nothing."""

    _pool = None

    def __init__(self, grammars: list[Grammar], matchers: list, vocab_size: int):
        from concurrent.futures import ThreadPoolExecutor
        if PendingMasks._pool is None:
            PendingMasks._pool = ThreadPoolExecutor(1, thread_name_prefix="rftkit-masks")
        self.future = PendingMasks._pool.submit(allowed, grammars, matchers, vocab_size)

    def result(self) -> torch.Tensor:
        return self.future.result()
