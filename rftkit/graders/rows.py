"""A minimal JSONL reader for `rft grade --data`: one row per line, `messages` (OpenAI / Bedrock RFT rows) or
`prompt`, plus the fields graders read (reference_answer, ...).

    rows = read_rows("train.jsonl", n=50)        # [{"messages": [...], "reference_answer": ..., ...}]

Kept small on purpose: the general data loader (CSV, Parquet, Hub datasets) belongs beside tasks, and this
reader is to be replaced by it.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: str, n: int = 0) -> list[dict]:
    """The first `n` rows (all with n=0); each gets `messages` (from `prompt` when it has none)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data file {file} does not exist")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not ("messages" in row or "prompt" in row):
            raise ValueError(f"{file}:{number}: a row needs a 'messages' or 'prompt' field")
        messages = row.get("messages") or [{"role": "user", "content": str(row["prompt"])}]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise ValueError(f"{file}:{number}: 'messages' must be a list of {{'role', 'content'}} objects")
        rows.append({**row, "messages": messages})
        if n and len(rows) == n:
            break
    if not rows:
        raise ValueError(f"data file {file} has no rows")
    return rows
