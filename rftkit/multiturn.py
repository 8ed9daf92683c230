"""Multi-turn rollouts: conversations with an environment, kept as the exact token ids the model saw.

    convs = [Conversation.start(make_env(), sample, codec) for sample in samples]
    run_conversations(engine, codec, convs, Limits(max_turns=4, max_tokens=32, max_total_tokens=256), params)
    convs[0].tokens, convs[0].mask        # everything after the prompt; mask 1 = a token the model sampled

Token-exact. A conversation is one growing list of token ids: the prompt, then each model turn's tokens exactly
as the engine sampled them (never decoded and re-encoded: BPE does not round-trip, and a re-tokenized turn is
not what the policy produced, so its log-probs would be wrong), then the environment's turn encoded once and
appended. The environment's turn is what the chat template puts between the model's turn and the next
assistant header: rendered with a placeholder for the model's content, taking the text after it, without the
end-of-turn text the model already sampled (its stop token). The next turn continues from the whole list, so
the engine's prefix cache serves the blocks it already holds for the conversation's start.

Batched. Each round sends the next turn of every live conversation to the engine at once (they decode in one
batch); conversations that finish drop out. The loss mask covers only the model's tokens, so the GRPO family's
losses and normalisers (rftkit.grpo_loss) count model tokens only: a multi-turn step is the single-turn maths
on the masked token list (tested against a per-conversation reference).

Limits: `max_turns` model turns, `max_tokens` per model turn, `max_total_tokens` after the prompt (model and
environment tokens). A conversation stopped by a limit records `truncated` ("turns" or "tokens"); it is still
scored (and `--mask-truncated` drops it from the loss, as for single turns).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rftkit.environments import Environment
from rftkit.sampling import SamplingParams
from rftkit.tool_calls import chat_messages, takes_tools

PLACEHOLDER = "\x00MODEL-TURN\x00"


@dataclass
class Limits:
    max_turns: int = 4                  # model turns per conversation
    max_tokens: int = 32                # tokens per model turn
    max_total_tokens: int = 256         # tokens after the prompt, model and environment together

    def __post_init__(self):
        for name in ("max_turns", "max_tokens", "max_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class TurnCodec:
    """Messages to token ids through the tokenizer's chat template, tools shown as rftkit.tool_calls shows them."""

    def __init__(self, tok):
        self.tok = tok
        self.takes_tools = takes_tools(tok.chat_template)

    def _render(self, messages: list[dict], tools, generation_prompt: bool) -> str:
        msgs, tmpl_tools = chat_messages(messages, tools, self.takes_tools)
        return self.tok.apply_chat_template(msgs, generation_prompt, tools=tmpl_tools)

    def prompt(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        return self.tok.encode(self._render(messages, tools, True))

    def turn(self, history: list[dict], new: list[dict], tools: list[dict] | None, stop_token: int | None
             ) -> list[int]:
        """The environment's turn after the model's: `history` ends with the model's message; `stop_token` is
        the token that ended the model's turn (None when a length limit cut it)."""
        placeheld = history[:-1] + [{"role": "assistant", "content": PLACEHOLDER}]
        before = self._render(placeheld, tools, False)
        after = self._render(placeheld + new, tools, True)
        if not after.startswith(before):
            raise ValueError("the chat template renders a conversation's start differently once it grows; "
                             "multi-turn rollouts need a template that only appends")
        close = before[before.rindex(PLACEHOLDER) + len(PLACEHOLDER):]     # e.g. "<|im_end|>\n"
        if stop_token is not None:
            said = self.tok.decode([stop_token], skip_special_tokens=False)
            if close.startswith(said):
                close = close[len(said):]
        return self.tok.encode(close + after[len(before):])


@dataclass
class Conversation:
    env: Environment
    sample: dict
    messages: list[dict]                # the conversation as text, what the environment and rewards read
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)      # after the prompt: model and environment tokens
    mask: list[int] = field(default_factory=list)        # 1 = sampled by the model
    logprobs: list[float] = field(default_factory=list)  # the engine's log-probs (0.0 on environment tokens)
    turns: int = 0
    done: bool = False
    truncated: str = ""                 # "", "turns" or "tokens"
    step_reward: float = 0.0            # sum of the rewards step() returned
    last_text: str = ""                 # the model's last turn

    @classmethod
    def start(cls, env: Environment, sample: dict, codec: TurnCodec) -> "Conversation":
        messages = env.reset(sample)
        return cls(env, sample, messages, codec.prompt(messages, env.tools))

    @property
    def finished(self) -> bool:
        return self.done or bool(self.truncated)

    def reward(self) -> float:
        """The environment's share of the conversation's reward: its step rewards and its final reward."""
        return self.step_reward + float(self.env.reward(self.messages))


def run_conversations(engine, codec: TurnCodec, convs: list[Conversation], limits: Limits,
                      params: Callable[[int, int, int], SamplingParams]) -> None:
    """Play every conversation to its end, a turn of all live ones per engine batch. `params(i, turn,
    max_tokens)` gives conversation i's sampling parameters for a turn (seed, temperature, stop ids)."""
    live = [i for i, c in enumerate(convs) if not c.finished]
    while live:
        budget = [min(limits.max_tokens, limits.max_total_tokens - len(convs[i].tokens)) for i in live]
        plist = [params(i, convs[i].turns, b) for i, b in zip(live, budget)]
        stops = {i: set(p.stop_token_ids) for i, p in zip(live, plist)}
        outs = engine.generate([convs[i].prompt + convs[i].tokens for i in live], plist)
        for i, out in zip(live, outs):
            c, comp = convs[i], out[0]
            c.tokens += comp.token_ids
            c.mask += [1] * len(comp.token_ids)
            c.logprobs += comp.logprobs
            c.turns += 1
            c.last_text = codec.tok.decode(comp.token_ids)
            c.messages.append({"role": "assistant", "content": c.last_text})
            new, done, reward = c.env.step(c.last_text)
            if reward is not None:
                c.step_reward += float(reward)
            if done:
                c.done = True
                continue
            if c.turns >= limits.max_turns:
                c.truncated = "turns"
                continue
            ended = comp.token_ids[-1] if comp.token_ids and comp.token_ids[-1] in stops[i] else None
            reply = codec.turn(c.messages, new, c.env.tools, ended)
            if len(c.tokens) + len(reply) >= limits.max_total_tokens:    # no room for the model to answer
                c.truncated = "tokens"
                continue
            c.tokens += reply
            c.mask += [0] * len(reply)
            c.logprobs += [0.0] * len(reply)
            c.messages += new
        live = [i for i in live if not convs[i].finished]


def longest_prompt(make_env: Callable[[], Environment], codec: TurnCodec, samples: list[dict]) -> int:
    return max(len(Conversation.start(make_env(), s, codec).prompt) for s in samples)
