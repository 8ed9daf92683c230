"""Text at the edge: a `tokenizers` tokenizer, the model's chat template, incremental detokenization.

    tok = Tokenizer.from_dir(folder)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])          # template + generation prompt

`transformers` is not imported at run time (it costs seconds); the chat template is rendered with jinja2's
sandbox the way `transformers` renders it (same environment options and globals), which a test checks.
"""
from __future__ import annotations

import json
from pathlib import Path


def _raise(message: str):
    raise ValueError(message)


class Tokenizer:
    def __init__(self, backend, chat_template: str | None, special: dict):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        eos = [self.eos_token] if isinstance(self.eos_token, str) else list(self.eos_token or [])
        self.eos_token_ids = [i for i in (backend.token_to_id(t) for t in eos) if i is not None]
        self._template = None

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
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        return cls(backend, template, special)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; pass raw text instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        return value.get("content")
    return value


class IncrementalDecoder:
    """Feed token ids, get text deltas. Holds back text that ends in an incomplete UTF-8 sequence, so the
    deltas never contain a replacement character that the full decode would not, and they join to
    `tok.decode(all_ids)`."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0            # characters of the full decode already returned

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""                # wait for the rest of the character
        delta, self.emitted = text[self.emitted:], len(text)
        return delta

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        delta, self.emitted = text[self.emitted:], len(text)
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
