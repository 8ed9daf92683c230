"""`score_model` graders: a judge model, through any OpenAI-compatible endpoint, scores each completion.

    node = ScoreModel(spec, client)         # spec: OpenAI's {"type": "score_model", "input": [...], "model": ...}
    node.scores(completions, samples)       # [float in spec["range"] or Exception]

The grader's messages are rendered with OpenAI's templating (rftkit.graders.template) for each completion and
sent through rftkit.graders.judge_client (limits, retries, cache). OpenAI asks its judges for a structured
reply `{"result": <score>, "steps": [...]}`; endpoints that cannot force a JSON schema (vLLM without guided
decoding, `rft serve`) get the same messages and their reply is read as: a JSON object's "result" (or
"score") if the reply holds one, else the first number in it. A reply with neither, or a score outside
`range`, is an error on that completion that shows the reply. sampling_params map onto the chat request
(max_completions_tokens -> max_tokens).
"""
from __future__ import annotations

import json
import re

from rftkit.graders.schema import message_text
from rftkit.graders.template import render, sample_namespace

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


class ScoreParseError(ValueError):
    pass


def parse_score(reply: str, lo: float, hi: float) -> float:
    value = None
    m = _OBJECT.search(reply)
    if m:
        try:
            obj = json.loads(m.group(0))
            if isinstance(obj, dict):
                value = next((obj[k] for k in ("result", "score") if k in obj), None)
        except json.JSONDecodeError:
            pass
    if value is None:
        n = _NUMBER.search(reply)
        if n is None:
            raise ScoreParseError(f"judge reply has no score: {reply!r}")
        value = n.group(0)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ScoreParseError(f"judge reply's result {value!r} is not a number: {reply!r}") from None
    if not lo <= value <= hi:
        raise ScoreParseError(f"judge score {value} is outside the range [{lo}, {hi}] in reply {reply!r}")
    return value


class ScoreModel:
    def __init__(self, spec: dict, client):
        self.spec, self.client = spec, client
        self.lo, self.hi = (float(x) for x in spec.get("range", [0, 1]))
        self.templates = [(m["role"], message_text("input", m["content"])) for m in spec["input"]]
        params = dict(spec.get("sampling_params", {}))
        for name in ("max_completions_tokens", "max_completion_tokens"):
            if name in params:
                params["max_tokens"] = params.pop(name)
        self.params = params

    def request(self, completion: str, sample: dict) -> dict:
        ns = sample_namespace(completion)
        return {"model": self.spec["model"], **self.params,
                "messages": [{"role": role, "content": render(t, sample, ns)} for role, t in self.templates]}

    def scores(self, completions: list[str], samples: list[dict]) -> list:
        out: list = [None] * len(completions)
        reqs, where = [], []
        for i, (c, s) in enumerate(zip(completions, samples)):
            try:
                reqs.append(self.request(c, s))
                where.append(i)
            except ValueError as e:                  # a template variable the sample lacks
                out[i] = e
        replies = self.client.chat_many(reqs, template=json.dumps(self.spec["input"], sort_keys=True))
        for i, reply in zip(where, replies):
            if isinstance(reply, Exception):
                out[i] = reply
                continue
            try:
                out[i] = parse_score(reply, self.lo, self.hi)
            except ScoreParseError as e:
                out[i] = e
        return out


def embed_scores(client, model: str, pairs: list[tuple[str, str]]) -> list:
    """Cosine similarity of each (text, reference) pair's embeddings: text_similarity's `cosine`."""
    from rftkit.graders.text_similarity import cosine
    texts = sorted({t for pair in pairs for t in pair})
    vectors = dict(zip(texts, client.embed_many(model, texts)))
    out = []
    for a, b in pairs:
        bad = next((v for v in (vectors[a], vectors[b]) if isinstance(v, Exception)), None)
        if bad is not None:
            out.append(bad)
            continue
        try:
            out.append(cosine(vectors[a], vectors[b]))
        except ValueError as e:
            out.append(e)
    return out
