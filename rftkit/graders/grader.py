"""A grader object compiled into a reward: `Grader(spec)` is a BatchReward, `(completion, sample) -> float`
one at a time or a batch at once, so `rft train --grader grader.json` scores rollouts through the same path
as every other reward (score_batch: checked values, --on-reward-error).

    grader = Grader(read_grader("grader.json"))
    grader("Paris", {"messages": [...], "reference_answer": "Paris"})      # 1.0

The dataset row is OpenAI's `item` (for a Bedrock row: messages + reference_answer; for a task sample: its
fields), the completion fills `sample` (output_text, output_json, ...). Each kind scores a whole batch: text
graders in this process, python graders in one sandboxed process per batch, score_model graders as concurrent
requests. A `multi` grader scores every sub-grader on the batch, then its formula per completion; a failure of
a sub-grader on a completion is that completion's error, named by the sub-grader's key. The endpoint client
(judge_client) is made on first use, so a grader without score_model or cosine never opens its cache.
"""
from __future__ import annotations

from rftkit.graders.judge_client import EndpointReward, JudgeOptions
from rftkit.graders.multi import Formula
from rftkit.graders.python_grader import run_python_grader
from rftkit.graders.schema import validate
from rftkit.graders.score_model import ScoreModel, embed_scores
from rftkit.graders.template import render, sample_namespace
from rftkit.graders.text_similarity import similarity, string_check


class Grader(EndpointReward):
    def __init__(self, spec: dict, judge: JudgeOptions | None = None, embedding_model: str | None = None):
        import os
        self.spec = validate(spec)
        self.name = spec.get("name") or spec["type"]
        self.pass_threshold = spec.get("pass_threshold")
        self.judge, self._client = judge, None
        self.embedding_model = embedding_model or os.environ.get("RFTKIT_EMBEDDING_MODEL", "text-embedding-3-large")
        self.last_sub_scores: dict[str, list] = {}       # a multi grader's sub-graders on the last batch

    def batch(self, completions: list[str], samples: list[dict]) -> list:
        self.last_sub_scores = {}
        return self._scores(self.spec, completions, samples, top=True)

    def _scores(self, spec: dict, completions: list[str], samples: list[dict], top: bool = False) -> list:
        kind = spec["type"]
        if kind == "multi":
            subs = {k: self._scores(g, completions, samples) for k, g in spec["graders"].items()}
            if top:
                self.last_sub_scores = subs
            formula = Formula(spec["calculate_output"], set(subs))
            out = []
            for i in range(len(completions)):
                bad = next(((k, v[i]) for k, v in subs.items() if isinstance(v[i], Exception)), None)
                if bad is not None:
                    out.append(type(bad[1])(f"grader {bad[0]!r}: {bad[1]}"))
                    continue
                try:
                    out.append(formula({k: v[i] for k, v in subs.items()}))
                except ValueError as e:
                    out.append(e)
            return out
        if kind == "score_model":
            return ScoreModel(spec, self.client).scores(completions, samples)
        if kind == "python":
            return run_python_grader(spec["source"], [(sample_namespace(c), s) for c, s in zip(completions, samples)])
        pairs: list = []
        for c, s in zip(completions, samples):     # string_check, text_similarity: render both sides
            ns = sample_namespace(c)
            try:
                pairs.append((render(spec["input"], s, ns), render(spec["reference"], s, ns)))
            except ValueError as e:
                pairs.append(e)
        if kind == "text_similarity" and spec["evaluation_metric"] == "cosine":
            ok = [p for p in pairs if not isinstance(p, Exception)]
            got = iter(embed_scores(self.client, self.embedding_model, ok))
            return [p if isinstance(p, Exception) else next(got) for p in pairs]
        out = []
        for p in pairs:
            if isinstance(p, Exception):
                out.append(p)
            elif kind == "string_check":
                out.append(string_check(spec["operation"], *p))
            else:
                out.append(similarity(spec["evaluation_metric"], *p))
        return out
