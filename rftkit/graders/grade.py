"""rft grade: try a grader before training. Validate it, sample completions for a few rows (a local model and
adapter through our engine, an OpenAI-compatible endpoint, or the rows' own `completion` field), score them,
and show the score distribution with a few examples per score bucket.

    rft grade --grader grader.json --data rows.jsonl --n 20 [--adapter DIR | --base-url URL --served-model M]

Order matters: the grader (every field, template variables, the formula, the python grader's `grade`) and the
data are checked before any model loads, so a bad grader fails in a second naming the field.
Failures of the grader on a completion are counted and shown (--on-reward-error raise stops at the first).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal


@dataclass
class GradeConfig:
    grader: str = ""                     # OpenAI grader JSON file (string_check, text_similarity, python,
                                         # score_model, multi)
    data: str = ""                       # JSONL rows: messages or prompt, plus the fields the grader reads
    n: int = 20                          # rows to grade (0 = all)
    samples: int = 1                     # completions per row
    model: str | None = None             # model folder / .gguf / None = embedded (ignored with --base-url)
    adapter: str | None = None           # LoRA adapter folder (PEFT format)
    base_url: str | None = None          # sample from an OpenAI-compatible server instead of a local model
    served_model: str | None = None      # the `model` field sent to --base-url
    use_completions: bool = False        # grade each row's own "completion" field; no model at all
    max_tokens: int = 128                # new tokens per completion
    temperature: float = 0.0             # 0 = greedy (samples must then be 1)
    seed: int = 0                        # sampling seed
    judge_base_url: str | None = None    # score_model / judges endpoint (default $RFTKIT_JUDGE_BASE_URL,
                                         # $OPENAI_BASE_URL)
    judge_concurrency: int = 8           # judge requests in flight
    judge_rpm: float = 0.0               # judge requests per minute (0 = no limit)
    judge_tpm: float = 0.0               # judge tokens per minute (0 = no limit)
    judge_cache: str | None = None       # judge cache folder ("" = none; default under the rftkit cache)
    on_reward_error: Literal["raise", "count"] = "count"   # a failing grade stops, or is counted and shown
    examples: int = 2                    # examples shown per score bucket
    output: str | None = None            # write each row, completion and score as JSONL here

    def __post_init__(self):
        if not self.grader or not self.data:
            raise ValueError("rft grade needs --grader FILE.json and --data FILE.jsonl")
        if self.samples < 1 or self.n < 0:
            raise ValueError(f"samples must be >= 1 and n >= 0, got samples={self.samples}, n={self.n}")
        if self.temperature == 0 and self.samples > 1:
            raise ValueError(f"greedy decoding gives the same completion every time: samples={self.samples} "
                             f"needs temperature > 0")
        if self.base_url and not self.served_model:
            raise ValueError("--base-url needs --served-model (the `model` field to send)")


def _generate_local(cfg: GradeConfig, rows: list[dict], model, tok) -> list[list[str]]:
    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    prompts = [tok.encode_chat(r["messages"]) for r in rows]
    engine = Engine(model, max_seq_len=max(map(len, prompts)) + cfg.max_tokens + 8, max_batch=64)
    params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, n=cfg.samples, seed=cfg.seed,
                            stop_token_ids=list(tok.eos_token_ids))
    return [[tok.decode(c.token_ids) for c in g] for g in engine.generate(prompts, params)]


def _generate_remote(cfg: GradeConfig, rows: list[dict]) -> list[list[str]]:
    import os
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI
    client = OpenAI(base_url=cfg.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"))

    def ask(row):
        r = client.chat.completions.create(model=cfg.served_model, messages=row["messages"], n=cfg.samples,
                                           temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed)
        return [c.message.content or "" for c in r.choices]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, rows))


def _buckets(scores: list[float], k: int = 5) -> list[tuple[float, float]]:
    lo, hi = min(0.0, min(scores)), max(1.0, max(scores))
    step = (hi - lo) / k
    return [(lo + i * step, lo + (i + 1) * step) for i in range(k)]


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def report(rows: list[dict], texts: list[list[str]], scores: list[float], failed: set[int], errors: dict,
           grader, examples: int = 2) -> str:
    """The distribution and examples, as printed by rft grade."""
    flat = [(r, t) for r, ts in zip(rows, texts) for t in ts]
    ok = [i for i in range(len(scores)) if i not in failed]
    lines = [f"grader {grader.name!r} on {len(flat)} completions of {len(rows)} rows"]
    if ok:
        vals = [scores[i] for i in ok]
        mean = sum(vals) / len(vals)
        lines.append(f"mean {mean:.3f}, min {min(vals):.3f}, max {max(vals):.3f}"
                     + (f", pass rate {sum(v >= grader.pass_threshold for v in vals) / len(vals):.3f} "
                        f"(pass_threshold {grader.pass_threshold})" if grader.pass_threshold is not None else ""))
        bins = _buckets(vals)
        for b, (a, z) in enumerate(bins):
            last = b == len(bins) - 1
            inside = [i for i in ok if a <= scores[i] < z or (last and scores[i] == z)]
            bar = "#" * round(40 * len(inside) / len(ok))
            lines.append(f"  [{a:5.2f}, {z:5.2f}{']' if last else ')'} {len(inside):5d}  {bar}")
            for i in inside[:examples]:
                row, text = flat[i]
                user = [m["content"] for m in row["messages"] if m.get("role") == "user"]
                lines.append(f"      {scores[i]:.3f}  prompt: {_short(user[-1] if user else '', 60)!r}")
                lines.append(f"             completion: {_short(text, 100)!r}")
    for name, sub in grader.last_sub_scores.items():
        vals = [v for v in sub if not isinstance(v, Exception)]
        if vals:
            lines.append(f"  sub-grader {name!r}: mean {sum(vals) / len(vals):.3f} on {len(vals)}")
    for name, e in errors.items():
        lines.append(f"failed on {e['count']} of {len(flat)} completions; first: {e['first']}")
    usage = grader.metrics()
    if usage:
        lines.append("judge: " + ", ".join(f"{k.removeprefix('judge_')} {v}" for k, v in usage.items()))
    return "\n".join(lines)


def grade(cfg: GradeConfig, model=None, tok=None) -> dict:
    """Validate, sample, score: {"scores", "texts", "rows", "errors", "report", "metrics"}."""
    from rftkit.graders import load_grader
    from rftkit.graders.judge_client import JudgeOptions
    from rftkit.data import read_rows, to_sample
    from rftkit.rewards import score_batch
    judge = JudgeOptions.from_env(base_url=cfg.judge_base_url, concurrency=cfg.judge_concurrency,
                                  rpm=cfg.judge_rpm, tpm=cfg.judge_tpm, cache_dir=cfg.judge_cache)
    grader = load_grader(cfg.grader, judge)            # every check of the grader: before any model loads
    rows = [to_sample(r, need_answer=False) for r in read_rows(cfg.data)][:cfg.n or None]
    t0 = time.perf_counter()
    if cfg.use_completions:
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get("completion"), str)]
        if missing:
            raise ValueError(f"--use-completions: row {missing[0] + 1} of {cfg.data} has no string 'completion'")
        texts = [[r["completion"]] for r in rows]
    elif cfg.base_url:
        texts = _generate_remote(cfg, rows)
    else:
        if model is None:
            from rftkit.loading import load
            from rftkit.lora import load_lora
            model, tok = load(cfg.model)
            if cfg.adapter:
                load_lora(model, cfg.adapter)
        texts = _generate_local(cfg, rows, model, tok)
    t_gen = time.perf_counter() - t0
    flat_texts = [t for ts in texts for t in ts]
    flat_rows = [r for r, ts in zip(rows, texts) for _ in ts]
    errors: dict = {}
    scores = score_batch({"grader": grader}, flat_texts, flat_rows, on_error=cfg.on_reward_error,
                         errors=errors, fallback=float("nan"))["grader"]
    failed = {i for i, s in enumerate(scores) if s != s}
    text = report(rows, texts, scores, failed, errors, grader, cfg.examples)
    if cfg.output:
        with open(cfg.output, "w") as f:
            for i, (r, t) in enumerate(zip(flat_rows, flat_texts)):
                f.write(json.dumps({"row": r, "completion": t, "score": None if i in failed else scores[i]},
                                   default=str) + "\n")
    return {"scores": scores, "failed": sorted(failed), "texts": texts, "rows": rows, "errors": errors,
            "report": text, "metrics": grader.metrics(), "generate_s": t_gen,
            "sub_scores": grader.last_sub_scores}


def run_grade(cfg: GradeConfig) -> int:
    result = grade(cfg)
    print(result["report"])
    return 0
