"""Text at the edge: a `tokenizers` tokenizer, the model's chat template, incremental detokenization.

    tok = Tokenizer.from_dir(folder)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])          # template + generation prompt

`transformers` is not imported at run time (it costs seconds); the chat template is rendered with jinja2's
sandbox the way `transformers` renders it: the same environment options, filters and globals
(`raise_exception`, `strftime_now`, `namespace`, `tojson`, the `{% generation %}` tag), the named special
tokens as variables, None-valued message keys dropped. Tests compare the output with `transformers`'.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")    # aliases transformers fills in


class Tokenizer:
    def __init__(self, backend, chat_template: str | None, special: dict[str, str], extra_eos_ids=()):
        self.backend = backend
        self.chat_template = chat_template
        self.special = {k: v for k, v in special.items() if v is not None}     # named special tokens
        self.bos_token = self.special.get("bos_token")
        self.eos_token = self.special.get("eos_token")
        ids = [backend.token_to_id(self.eos_token)] if self.eos_token else []
        # generation_config / config eos ids too (Llama 3 instruct stops on <|eot_id|> and <|eom_id|>)
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in [*ids, *extra_eos_ids] if i is not None))
        self._template = None
        # SentencePiece byte fallback (<0x41> -> "A"): a run of byte tokens decodes as a whole, so the
        # incremental decoder waits for the end of a run
        byte_ids = [backend.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        active = byte_ids[0x41] is not None and backend.decode([byte_ids[0x41]]) == "A"
        self.byte_fallback_ids = frozenset(i for i in byte_ids if i is not None) if active else frozenset()

    @classmethod
    def from_dir(cls, folder: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json in the model folder")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the tokenizers error names no file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():      # transformers 5 saves the template on its own
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):                       # named templates: [{"name", "template"}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        special = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS}
        extra = []
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(folder / name).get("eos_token_id")
            extra += [eos] if isinstance(eos, int) else list(eos or [])
        return cls(backend, template, special, extra)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        """The prompt text, as `transformers`' `apply_chat_template(..., tokenize=False)` renders it. Extra
        keyword arguments reach the template as variables (e.g. `enable_thinking=False` for Qwen3)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; pass raw text instead")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"message {i} must be a dict with a 'role', got {m!r}")
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(m)
        if self._template is None:
            self._template = compile_template(self.chat_template)
        variables = {**self.special, **kwargs}
        return self._template.render(messages=chat, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        return value.get("content")
    return value


# ----------------------------------------------------------------------------------------------------------
# the jinja environment of transformers' chat templates (transformers/utils/chat_template_utils.py)

def compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; renders as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):   # jinja's signature trick, so `namespace(self=...)` works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=Dict(), namespace=Namespace)
    return env.from_string(source)


# ----------------------------------------------------------------------------------------------------------
# streaming text

class IncrementalDecoder:
    """Feed token ids, get text deltas that join to `tok.decode(all_ids)`.

    Each step decodes only a short window (the tokens since the last emitted boundary, plus the token before
    it so that decoders which strip a leading space see the same context), so a long completion costs O(T),
    not O(T^2). Text ending in an incomplete UTF-8 sequence (U+FFFD at the end), or a run of SentencePiece
    byte-fallback tokens (decoded as a whole, all U+FFFD when invalid), is held back until the next token
    completes it; `flush()` returns whatever is left."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0          # window start: the text of ids[prefix:read] was already returned
        self.read = 0
        self.emitted = 0         # characters returned so far

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        done = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        if not text.startswith(done):   # a decoder whose output depends on far context: decode everything
            done, text = None, self.tok.decode(self.ids, self.skip)
        start = self.emitted if done is None else len(done)
        if not final and (text.endswith("\ufffd") or (self.ids and self.ids[-1] in self.tok.byte_fallback_ids)):
            return ""
        if len(text) <= start:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        delta = text[start:]
        self.emitted += len(delta)
        return delta


def find_stop(text: str, stops: list[str]) -> tuple[int | None, int]:
    """Earliest stop string in `text`: (index where it starts or None, how many trailing characters to hold
    back because they could be the start of a stop string that the next delta completes)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if hits:
        return min(hits), 0
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return None, hold
