"""Judges and remote rewards as rewards (`--reward` specs), through rftkit.graders.judge_client:

    judge-api:MODEL     LLM judge through an OpenAI-compatible endpoint: LLMJudge's template ({prompt},
                        {completion}, the sample's fields) and its "Score: N" parsing, 0-10 mapped to [0, 1]
    judge-group:MODEL   a group judge (RULER-style): the G completions of one prompt in one request, scored
                        against each other, a JSON list of G scores 0-10 mapped to [0, 1]
    http://HOST/PATH    a reward that lives in another service: POST {"sample": ..., "completion": ...},
                        get {"score": <float>} (the contract of Bedrock's Lambda graders and OpenRLHF's
                        --remote_rm_url, as JSON)

The endpoint, limits and cache come from JudgeOptions (RFTKIT_JUDGE_* in the environment by default). Each
is a BatchReward: score_batch hands it the batch, it sends the requests concurrently, and a completion whose
request failed (after the retries) or whose reply cannot be read is an error on that completion, raised with
its sample or counted by --on-reward-error.
"""
from __future__ import annotations

import json
import re

from rftkit.graders.judge_client import EndpointReward, JudgeOptions
from rftkit.rewards import JUDGE_TEMPLATE, JudgeError, LLMJudge

GROUP_TEMPLATE = (
    "You compare {n} answers to the same task and score each from 0 (useless) to 10 (perfect), relative to the "
    "others: a better answer gets a higher score.\n\nTask:\n{prompt}\n\n{answers}\n\n"
    "Reply with only a JSON object {{\"scores\": [s1, ..., s{n}]}}, one score per answer, in order.")


def _question(sample: dict) -> str:
    if "messages" in sample:
        users = [m["content"] for m in sample["messages"] if m.get("role") == "user"]
        return users[-1] if users else ""
    return str(sample.get("prompt", ""))


class ApiJudge(EndpointReward):
    """LLMJudge's prompt and parsing, with the judge model behind an endpoint instead of our engine."""

    def __init__(self, model: str, template: str = JUDGE_TEMPLATE, pattern: str = r"[Ss]core\s*[:=]?\s*(-?\d+(?:\.\d+)?)",
                 lo: float = 0.0, hi: float = 10.0, max_tokens: int = 16, temperature: float = 0.0,
                 judge: JudgeOptions | None = None):
        super().__init__(judge)
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.rules = LLMJudge(None, None, template, pattern, lo, hi)      # template filling and reply parsing

    def batch(self, completions: list[str], samples: list[dict]) -> list:
        reqs = [{"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                 "messages": [{"role": "user", "content": self.rules.prompt_text(c, s)}]}
                for c, s in zip(completions, samples)]
        out = []
        for reply in self.client.chat_many(reqs, template=self.rules.template):
            try:
                out.append(reply if isinstance(reply, Exception) else self.rules.parse(reply))
            except JudgeError as e:
                out.append(e)
        return out


class GroupJudge(EndpointReward):
    """One request per group: consecutive completions of the same sample (how rollouts and `rft grade` lay
    out the G completions of a prompt) are judged together."""

    def __init__(self, model: str, template: str = GROUP_TEMPLATE, max_tokens: int = 256,
                 temperature: float = 0.0, judge: JudgeOptions | None = None):
        super().__init__(judge)
        self.model, self.template, self.max_tokens, self.temperature = model, template, max_tokens, temperature

    def batch(self, completions: list[str], samples: list[dict]) -> list:
        groups: list[list[int]] = []
        for i, s in enumerate(samples):
            if groups and (s is samples[groups[-1][0]] or s == samples[groups[-1][0]]):
                groups[-1].append(i)
            else:
                groups.append([i])
        reqs = []
        for g in groups:
            answers = "\n\n".join(f"Answer {k + 1}:\n{completions[i]}" for k, i in enumerate(g))
            reqs.append({"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                         "messages": [{"role": "user", "content": self.template.format(
                             n=len(g), prompt=_question(samples[g[0]]), answers=answers)}]})
        out: list = [None] * len(completions)
        for g, reply in zip(groups, self.client.chat_many(reqs, template=self.template)):
            try:
                scores = reply if isinstance(reply, Exception) else self.parse(reply, len(g))
            except JudgeError as e:
                scores = e
            for k, i in enumerate(g):
                out[i] = scores if isinstance(scores, Exception) else scores[k]
        return out

    @staticmethod
    def parse(reply: str, n: int) -> list[float]:
        m = re.search(r"\{.*\}", reply, re.DOTALL)
        try:
            scores = json.loads(m.group(0))["scores"] if m else None
        except (json.JSONDecodeError, KeyError, TypeError):
            scores = None
        if not isinstance(scores, list) or len(scores) != n or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 10 for x in scores):
            raise JudgeError(f"group judge reply is not {{\"scores\": [{n} numbers in 0..10]}}: {reply!r}")
        return [x / 10 for x in scores]


class HttpReward(EndpointReward):
    """POST {"sample": sample, "completion": completion} to `url`; the reply is {"score": float}."""

    def __init__(self, url: str, judge: JudgeOptions | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"an HTTP reward's URL starts with http:// or https://, got {url!r}")
        super().__init__(judge)
        self.url = url

    def batch(self, completions: list[str], samples: list[dict]) -> list:
        bodies = [json.loads(json.dumps({"sample": s, "completion": c}, default=str))
                  for c, s in zip(completions, samples)]
        out = []
        for reply in self.client.post_many(self.url, bodies):
            if isinstance(reply, Exception):
                out.append(reply)
            elif isinstance(reply, dict) and "score" in reply:
                out.append(reply["score"])         # score_batch checks it is a finite number
            else:
                out.append(ValueError(f"reward service {self.url} replied {reply!r}, not {{\"score\": <float>}}"))
        return out
