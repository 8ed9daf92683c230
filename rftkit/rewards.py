"""Rewards: a reward is a plain function `(completion: str, sample: dict) -> float`.

    reward = load_reward("last_integer")               # a built-in, or "my_rewards.py:fn"
    scores = score_batch({"correct": reward}, completions, samples)

Every value is checked: a reward that returns a non-number, NaN or inf, or raises, stops the run with the
reward's name, the sample and the completion shown (or, with on_error="count", is counted and reported) —
never a silent 0. Rewards of a batch run concurrently in a thread pool (sandboxed code runs in subprocesses).
"""
from __future__ import annotations

import importlib.util
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

Reward = Callable[[str, dict], float]

_INT = re.compile(r"-?\d[\d,]*")


def last_integer(completion: str, sample: dict) -> float:
    """1 if the last integer in the completion equals sample["answer"] (the `rft demo` rule), else 0."""
    found = _INT.findall(completion)
    if not found:
        return 0.0
    try:
        return float(int(found[-1].replace(",", "")) == int(sample["answer"]))
    except ValueError:
        return 0.0


def numeric_match(completion: str, sample: dict, tol: float = 1e-6) -> float:
    """1 if the last number in the completion is within `tol` (relative) of sample["answer"]."""
    found = re.findall(r"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?", completion.replace(",", ""))
    if not found:
        return 0.0
    value, target = float(found[-1]), float(sample["answer"])
    return float(abs(value - target) <= tol * max(1.0, abs(target)))


def exact_match(completion: str, sample: dict) -> float:
    """1 if the completion equals sample["answer"] up to surrounding and repeated whitespace."""
    norm = lambda s: " ".join(str(s).split())
    return float(norm(completion) == norm(sample["answer"]))


def math_equivalence(completion: str, sample: dict) -> float:
    """1 if `math-verify` finds the completion's final answer equal to sample["answer"]."""
    from math_verify import parse, verify
    gold = parse(str(sample["answer"]))
    return float(bool(verify(gold, parse(completion))))


def format_regex(pattern: str) -> Reward:
    """A reward of 1 when the whole completion matches `pattern` (re.DOTALL)."""
    rx = re.compile(pattern, re.DOTALL)
    return lambda completion, sample: float(rx.fullmatch(completion.strip()) is not None)


def soft_overlong(max_chars: int, cache_chars: int) -> Reward:
    """DAPO's soft overlong punishment on length (characters here): 0 up to max - cache, then linear to -1."""
    def reward(completion: str, sample: dict) -> float:
        n = len(completion)
        if n <= max_chars - cache_chars:
            return 0.0
        return max(-1.0, (max_chars - cache_chars - n) / cache_chars)
    return reward


def weighted(parts: dict[str, tuple[Reward, float]]) -> Reward:
    """Σ weight · reward over named parts."""
    def reward(completion: str, sample: dict) -> float:
        return sum(w * fn(completion, sample) for fn, w in parts.values())
    return reward


BUILTIN: dict[str, Reward] = {"last_integer": last_integer, "numeric": numeric_match, "exact": exact_match,
                              "math": math_equivalence}


def load_reward(spec: str) -> Reward:
    """A built-in name, or "path/to/file.py:function"."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {sorted(BUILTIN)} or 'file.py:function'")
    path, name = spec.rsplit(":", 1)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"reward file {file} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"rftkit_user_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"reward file {file} failed to import: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward file {file} has no function {name!r}; it defines {defined}")
    return fn


class RewardError(RuntimeError):
    pass


def _show(completion: str, sample: dict) -> str:
    c = completion if len(completion) < 300 else completion[:300] + "..."
    s = {k: v for k, v in sample.items() if k != "messages"}
    return f"sample {s!r}, completion {c!r}"


def _check(name: str, value, completion: str, sample: dict) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardError(f"reward {name!r} returned {value!r} (must be a finite int or float) for "
                          f"{_show(completion, sample)}")
    return float(value)


def score_batch(rewards: dict[str, Reward], completions: list[str], samples: list[dict],
                on_error: str = "raise", fallback: float = 0.0, max_workers: int = 8,
                errors: dict | None = None) -> dict[str, list[float]]:
    """{name: [score per completion]}. on_error="count" records failures in `errors` (count and first
    message per reward) and uses `fallback` for them; the default raises RewardError."""
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
    if on_error not in ("raise", "count"):
        raise ValueError(f"on_error must be 'raise' or 'count', got {on_error!r}")

    def one(args):
        name, fn, c, s = args
        try:
            return _check(name, fn(c, s), c, s)
        except RewardError:
            if on_error == "raise":
                raise
            failure = "bad value"
        except Exception as e:
            if on_error == "raise":
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e} on {_show(c, s)}") from e
            failure = f"{type(e).__name__}: {e}"
        if errors is not None:
            entry = errors.setdefault(name, {"count": 0, "first": failure})
            entry["count"] += 1
        return fallback

    jobs = [(name, fn, c, s) for name, fn in rewards.items() for c, s in zip(completions, samples)]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        values = list(pool.map(one, jobs))
    n = len(completions)
    return {name: values[i * n:(i + 1) * n] for i, name in enumerate(rewards)}
