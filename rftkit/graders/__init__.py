"""Graders users already have, and judges through any OpenAI-compatible endpoint, as rewards.

    reward = load_grader("grader.json")        # OpenAI's grader object, verbatim -> a BatchReward
    rft train --task jsonl:rows.jsonl --grader grader.json
    rft grade --grader grader.json --data rows.jsonl --n 50     # try it before training

Files: template.py (OpenAI's {{ item.x }} / {{ sample.output_text }}), text_similarity.py (string_check and
text_similarity), python_grader.py (python graders in rftkit.sandbox), multi.py (calculate_output, via ast),
schema.py (validation naming the field), judge_client.py (the endpoint: limits, retries, cache, usage),
score_model.py, grader.py (a grader object compiled to a reward), judges.py (judge-api:, judge-group:, HTTP
rewards), grade.py (rft grade, its rows read by rftkit.data).

Importing this package registers its reward specs with rftkit.rewards.load_reward: "grader:FILE.json",
"judge-api:MODEL", "judge-group:MODEL" and "http(s)://URL". Third-party libraries are imported where used, so
importing it stays light.
"""
from __future__ import annotations

from rftkit import rewards


def load_grader(path_or_spec, judge=None):
    """A validated grader object (JSON file or dict) as a Grader, a BatchReward."""
    from rftkit.graders.grader import Grader
    from rftkit.graders.schema import read_grader
    return Grader(read_grader(path_or_spec), judge)


def _judge_api(spec: str):
    from rftkit.graders.judges import ApiJudge
    return ApiJudge(spec.split(":", 1)[1])


def _judge_group(spec: str):
    from rftkit.graders.judges import GroupJudge
    return GroupJudge(spec.split(":", 1)[1])


def _http(spec: str):
    from rftkit.graders.judges import HttpReward
    return HttpReward(spec)


rewards.SPEC_LOADERS.update({"grader": lambda spec: load_grader(spec.split(":", 1)[1]), "judge-api": _judge_api,
                             "judge-group": _judge_group, "http": _http, "https": _http})
