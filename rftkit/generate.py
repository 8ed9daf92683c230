"""`rft generate` and `rft chat`: text in, text out, on top of the engine.

    rft generate --prompt "What is 12 + 34? Answer with just the number."

The prompt goes through the model's chat template (its default system prompt, then the generation prompt);
`--raw` sends the text as it is. Only the completion is printed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class GenerateConfig:
    prompt: str = ""                    # the user message (chat template applied unless --raw)
    model: str | None = None            # model folder, .gguf file, or None for the embedded smollm2-135m-instruct
    adapter: str | None = None          # LoRA adapter folder (PEFT format)
    max_tokens: int = 128               # new tokens at most
    temperature: float = 0.0            # 0 = greedy
    top_p: float = 1.0                  # nucleus sampling mass
    top_k: int = 0                      # 0 = no top-k truncation
    seed: int | None = None             # sampling seed
    system: str | None = None           # system prompt (None = the template's default)
    raw: bool = False                   # send the prompt without the chat template

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class ChatConfig:
    model: str | None = None            # model folder, .gguf file, or None for the embedded model
    adapter: str | None = None          # LoRA adapter folder (PEFT format)
    max_tokens: int = 256               # new tokens per reply at most
    temperature: float = 0.7            # 0 = greedy
    top_p: float = 0.9                  # nucleus sampling mass
    seed: int | None = None             # sampling seed
    system: str | None = None           # system prompt (None = the template's default)


def _messages(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


class Session:
    """A loaded model + tokenizer + engine; the adapter, if any, applied as LoRA (unmerged)."""

    def __init__(self, model_spec: str | None, adapter: str | None):
        from rftkit.engine import Engine
        from rftkit.loading import load
        self.model, self.tok = load(model_spec)
        if adapter is not None:
            from rftkit.lora import load_lora
            load_lora(self.model, adapter)
        self.engine = Engine(self.model, max_seq_len=min(2048, self.model.cfg.max_seq_len), max_batch=1)

    def stream(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None):
        """Yield text deltas of one completion."""
        from rftkit.sampling import SamplingParams
        from rftkit.tokenizer import IncrementalDecoder
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_tokens=max_tokens, stop_token_ids=list(self.tok.eos_token_ids))
        rid = self.engine.add_request(prompt_ids, params)
        decoder = IncrementalDecoder(self.tok)
        done = False
        while not done:
            for out in self.engine.step():
                if out.request_id != rid:
                    continue
                ids = [t for t in out.token_ids if t not in self.tok.eos_token_ids]
                delta = decoder.add(ids)
                if delta:
                    yield delta
                done = done or out.finished
        tail = decoder.flush()
        if tail:
            yield tail


def run_generate(cfg: GenerateConfig) -> int:
    if not cfg.prompt:
        raise ValueError("--prompt is required (got an empty prompt)")
    s = Session(cfg.model, cfg.adapter)
    ids = s.tok.encode(cfg.prompt) if cfg.raw else s.tok.encode_chat(
        _messages(cfg.system, [{"role": "user", "content": cfg.prompt}]))
    for delta in s.stream(ids, cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_chat(cfg: ChatConfig) -> int:
    s = Session(cfg.model, cfg.adapter)
    turns: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("rft chat: type a message; /exit or Ctrl-D to leave.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        turns.append({"role": "user", "content": line.rstrip("\n")})
        ids = s.tok.encode_chat(_messages(cfg.system, turns))
        reply = []
        for delta in s.stream(ids, cfg.max_tokens, cfg.temperature, cfg.top_p, seed=cfg.seed):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        turns.append({"role": "assistant", "content": "".join(reply)})
