"""Evaluation: accuracy and pass@k of a model (+ adapter) on a task split, locally through the engine or
against any OpenAI-compatible endpoint.

    rft eval --task arithmetic --split test --n 200 --adapter rft-demo/adapter
    result = evaluate(model, tok, task, split="test", n=200)

A completion counts as correct when the task's reward gives it >= 1. pass@k uses the unbiased estimator
1 - C(n-c, k) / C(n, k) over `samples` completions per problem (Codex paper).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass
class EvalConfig:
    model: str | None = None             # model folder / .gguf / None = embedded (ignored with --base-url)
    adapter: str | None = None           # LoRA adapter folder (PEFT format)
    task: str = "arithmetic"             # arithmetic, countdown, jsonl:FILE, rg:NAME (or give data files)
    data: str | None = None              # rows of the train split: .jsonl/.json/.csv/.parquet or a dataset folder
    eval_data: str | None = None         # rows of the validation split
    test_data: str | None = None         # rows of the test split
    eval_fraction: float = 0.0           # the validation rows `rft train --eval-fraction` held out of --data
    columns: list[str] = field(default_factory=list)  # column renames NAME=COLUMN, e.g. prompt=question,answer=sol
    from_logs: str | None = None         # score the prompts `rft serve --log-requests DIR` logged (DIR): with
                                         # --eval-fraction F, the held-out prompts `rft train --from-logs` left out
    logs_adapter: str = ""               # only the traffic of this served model id (as rft train --logs-adapter)
    logs_since: str = ""                 # only requests since then: 24h, 30m, 7d ago, or an ISO time (UTC)
    logs_until: str = ""                 # only requests before then (same forms)
    logs_feedback: str = "any"           # any, with, without, score>=X (also >, <=, <, =) or label=NAME
    reward: str = ""                     # replaces the task's own reward (built-in name or file.py:fn)
    split: str = ""                      # train, validation or test (default: test; with data files the test
                                         # rows, else the validation rows, else --data)
    n: int | None = None                 # problems (default: 200 of a task, every row of a data split)
    samples: int = 1                     # completions per problem (pass@k needs samples >= k)
    k: int = 1                           # pass@k
    temperature: float = 0.0             # 0 = greedy (samples must then be 1)
    max_tokens: int = 32                 # new tokens per completion
    seed: int = 0                        # which problems (order of the split) and sampling
    base_url: str | None = None          # evaluate an OpenAI-compatible server instead of a local model
    served_model: str | None = None      # the `model` field sent to --base-url
    output: str | None = None            # write the per-problem results as JSONL here
    tools: list[str] = field(default_factory=list)   # multi-turn: tools the model may call (as rft train --tools)
    env: str = ""                        # multi-turn: environment FILE.py:ClassName (as rft train --env)
    env_trl: bool = False                # --env is a TRL environment_factory class
    max_turns: int = 4                   # multi-turn: model turns per conversation
    max_total_tokens: int = 256          # multi-turn: tokens after the prompt
    tool_timeout: float = 10.0           # seconds per tool call

    def __post_init__(self):
        if self.k > self.samples:
            raise ValueError(f"pass@{self.k} needs samples >= {self.k}, got samples={self.samples}")
        if self.temperature == 0 and self.samples > 1:
            raise ValueError(f"greedy decoding gives the same completion every time: samples={self.samples} "
                             f"needs temperature > 0")


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, tok, task, split: str = "test", n: int = 200, samples: int = 1, k: int = 1,
             temperature: float = 0.0, max_tokens: int = 32, seed: int = 0, progress: bool = True,
             engine=None, rewards: dict | None = None) -> dict:
    """Accuracy (the task's reward >= 1) and pass@k of the model as it is (a live LoRA adapter included) on n
    problems of `split`; also each of `rewards`' mean ({name: fn}, default {"task": the task's reward}; "task"
    decides accuracy), the mean completion length in tokens and the share cut at max_tokens."""
    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    problems = task.samples(split, n, seed=seed)
    prompts = [tok.encode_chat(p["messages"]) for p in problems]
    if engine is None:
        engine = Engine(model, max_seq_len=max(map(len, prompts)) + max_tokens + 8, max_batch=64)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, n=samples, seed=seed,
                            stop_token_ids=list(tok.eos_token_ids))
    t0 = time.perf_counter()
    groups = engine.generate(prompts, params, progress=progress)
    texts = [[tok.decode(c.token_ids) for c in g] for g in groups]
    result = _score(task, problems, texts, k, time.perf_counter() - t0, rewards)
    comps = [c for g in groups for c in g]
    result.update(completion_len=sum(len(c.token_ids) for c in comps) / len(comps),
                  truncated_frac=sum(c.finish_reason == "length" for c in comps) / len(comps))
    return result


def evaluate_conversations(model, tok, task, split: str, n: int, make_env, limits, samples: int = 1, k: int = 1,
                           temperature: float = 0.0, seed: int = 0, rewards: dict | None = None) -> dict:
    """`evaluate` for multi-turn tasks (rftkit.multiturn): the rewards score the model's last turn, plus the
    environment's reward (as reward "env"; accuracy still counts the "task" reward >= 1); also the mean model
    turns, the share of conversations stopped by a limit, and each row's whole conversation."""
    from rftkit.engine import Engine
    from rftkit.multiturn import Conversation, TurnCodec, run_conversations
    from rftkit.rewards import score_batch
    from rftkit.sampling import SamplingParams
    problems = task.samples(split, n, seed=seed)
    codec = TurnCodec(tok)
    convs = [Conversation.start(make_env(), p, codec) for p in problems for _ in range(samples)]
    engine = Engine(model, max_seq_len=max(len(c.prompt) for c in convs) + limits.max_total_tokens + 8,
                    max_batch=64)
    t0 = time.perf_counter()
    run_conversations(engine, codec, convs, limits, lambda i, turn, m: SamplingParams(
        temperature=temperature, max_tokens=m, seed=seed + 7919 * i + turn, stop_token_ids=list(tok.eos_token_ids)))
    texts = [[c.last_text for c in convs[j * samples:(j + 1) * samples]] for j in range(len(problems))]
    result = _score(task, problems, texts, k, time.perf_counter() - t0, rewards)
    env = [c.reward() for c in convs]
    result["rewards"]["env"] = sum(env) / len(env)
    for j, row in enumerate(result["rows"]):
        row["conversations"] = [c.messages for c in convs[j * samples:(j + 1) * samples]]
    result.update(completion_len=sum(map(sum, (c.mask for c in convs))) / len(convs),
                  truncated_frac=sum(bool(c.truncated) for c in convs) / len(convs),
                  turns=sum(c.turns for c in convs) / len(convs))
    return result


def _score(task, problems, texts, k, seconds, rewards: dict | None = None) -> dict:
    from rftkit.rewards import score_batch
    rewards = rewards or {"task": task.default_reward}
    by_reward = score_batch(rewards, [t for outs in texts for t in outs],
                         [p for p, outs in zip(problems, texts) for _ in outs])   # checked, concurrent
    flat = by_reward["task"]
    rows, correct, i = [], [], 0
    for p, outs in zip(problems, texts):
        scores, i = flat[i:i + len(outs)], i + len(outs)
        c = sum(s >= 1 for s in scores)
        correct.append(c)
        rows.append({"id": p.get("id"), "completions": outs, "scores": scores})
    n_s = len(texts[0])
    firsts = [outs[0].strip() for outs in texts]
    top = max(set(firsts), key=firsts.count)
    return {"accuracy": sum(correct) / (len(correct) * n_s), f"pass@{k}": sum(pass_at_k(n_s, c, k) for c in correct)
            / len(correct), "n": len(problems), "seconds": seconds, "rows": rows,
            "rewards": {name: sum(v) / len(v) for name, v in by_reward.items()},
            "top_reply": {"text": top, "share": firsts.count(top) / len(firsts)}}


def collapse_warning(result: dict, at: float = 0.8) -> str | None:
    """A warning when one reply answers most problems: a policy that gives one answer to everything (a GRPO
    failure on tasks where one answer is common) scores exactly as often as that answer is the reference."""
    top = result["top_reply"]
    if result["n"] < 20 or top["share"] < at:
        return None
    return (f"rft eval: warning: {top['share']:.0%} of the {result['n']} problems got the same reply "
            f"{top['text'][:60]!r}; the accuracy may be how often that one answer is right, not skill (compare the "
            f"share of problems whose reference answer it is)")


def evaluate_remote(base_url: str, served_model: str, task, split="test", n=200, samples=1, k=1,
                    temperature=0.0, max_tokens=32, seed=0, api_key: str | None = None) -> dict:
    """The same evaluation against an OpenAI-compatible chat endpoint (our server, vLLM, ...)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI
    client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"))
    problems = task.samples(split, n, seed=seed)
    t0 = time.perf_counter()

    def ask(p):
        r = client.chat.completions.create(model=served_model, messages=p["messages"], n=samples,
                                           temperature=temperature, max_tokens=max_tokens, seed=seed)
        return [c.message.content or "" for c in r.choices]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, problems))
    return _score(task, problems, texts, k, time.perf_counter() - t0)


def run_eval(cfg: EvalConfig) -> int:
    from rftkit.data import task_from_flags
    from rftkit.rewards import load_reward
    from rftkit.traffic_log import log_query
    task, about = task_from_flags(cfg.task, "arithmetic", cfg.data, cfg.eval_data, cfg.test_data, cfg.columns,
                                  cfg.eval_fraction, cfg.seed, need_answer=not cfg.reward, logs=log_query(cfg))
    if cfg.reward:
        task.default_reward = load_reward(cfg.reward)
    split = cfg.split or ("test" if cfg.test_data or not about else
                          "validation" if cfg.eval_data or cfg.eval_fraction else "train")
    n = cfg.n if cfg.n is not None else (task.size(split) if about else 200)
    if about:
        print(f"rft eval: {about}; scoring the {split} split ({n} rows)")
    cfg = replace(cfg, split=split, n=n)
    if cfg.base_url:
        if not cfg.served_model:
            raise ValueError("--base-url needs --served-model (the `model` field to send)")
        result = evaluate_remote(cfg.base_url, cfg.served_model, task, cfg.split, cfg.n, cfg.samples, cfg.k,
                                 cfg.temperature, cfg.max_tokens, cfg.seed)
    else:
        from rftkit.loading import load
        from rftkit.lora import load_lora
        model, tok = load(cfg.model)
        if cfg.adapter:
            load_lora(model, cfg.adapter)
        if cfg.tools or cfg.env:
            from rftkit.environments import environment_factory
            from rftkit.multiturn import Limits
            make_env = environment_factory(cfg.env, cfg.tools, cfg.tool_timeout, cfg.env_trl)
            result = evaluate_conversations(model, tok, task, cfg.split, cfg.n, make_env, Limits(
                cfg.max_turns, cfg.max_tokens, cfg.max_total_tokens), cfg.samples, cfg.k, cfg.temperature, cfg.seed)
            print(f"rft eval: {result['turns']:.2f} model turns per conversation, {result['truncated_frac']:.3f} "
                  f"stopped by a limit, environment reward {result['rewards']['env']:.3f}")
        else:
            result = evaluate(model, tok, task, cfg.split, cfg.n, cfg.samples, cfg.k, cfg.temperature,
                              cfg.max_tokens, cfg.seed)
    if cfg.output:
        with open(Path(cfg.output), "w") as f:
            for row in result["rows"]:
                f.write(json.dumps(row) + "\n")
    print(f"{task.name} {cfg.split}: accuracy {result['accuracy']:.3f}, pass@{cfg.k} {result[f'pass@{cfg.k}']:.3f} "
          f"on {result['n']} problems ({result['seconds']:.1f} s)")
    if warning := collapse_warning(result):
        print(warning)
    return 0
