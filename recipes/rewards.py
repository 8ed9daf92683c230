"""Plain-Python rewards the recipes name as `recipes/rewards.py:FUNCTION` (run from the repository root): a
reward is `(completion, sample) -> float`, and yours are written the same way."""
import json
import re


def just_a_number(completion: str, sample: dict) -> float:
    """1 when the reply is a bare integer (recipes/arithmetic.yaml's format bonus), else 0."""
    return float(re.fullmatch(r"\s*-?\d+\s*", completion) is not None)


def fields_match(completion: str, sample: dict) -> float:
    """The share of the expected fields (sample["answer"], a dict) that the completion's JSON object (or its last
    ```json block) gets right; 0 when it is not a JSON object (recipes/json_extraction.yaml)."""
    blocks = re.findall(r"```(?:json)?[ \t]*\n(.*?)```", completion, re.DOTALL)
    try:
        got = json.loads(blocks[-1] if blocks else completion)
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(got, dict):
        return 0.0
    want = sample["answer"]
    return sum(got.get(k) == v for k, v in want.items()) / len(want)
