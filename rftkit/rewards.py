"""Rewards: a reward is a plain function `(completion: str, sample: dict) -> float`.

    reward = load_reward("last_integer")               # a built-in, "code", "judge:MODEL", or "my_rewards.py:fn"
    scores = score_batch({"correct": reward}, completions, samples)

Every value is checked: a reward that returns a non-number, NaN or inf, or raises, stops the run with the
reward's name, the sample and the completion shown (or, with on_error="count", is counted and reported) —
never a silent 0. Rewards of a batch run concurrently in a thread pool (sandboxed code runs in subprocesses).

Two built-ins do more than read the text:
  - `code_execution(...)` runs the completion's program in rftkit.sandbox against the sample's tests and
    scores the fraction passed (the sample fields it reads are in its docstring). A program that loops, eats
    memory or forks without end hits a limit and fails that test: the score stays in [0, 1] (or is the
    configured `limit_score`) and the run goes on.
  - `LLMJudge` scores completions with a judge model through our engine, all of a batch in one
    `engine.generate`. It is a `BatchReward`: score_batch hands it the whole batch at once. A reply with no
    parsable score is an error that shows the reply (counted instead, with on_error="count").
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import threading
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


_QUESTION = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*\?")


def arithmetic_verifier(completion: str, sample: dict) -> float:
    """A verifier that needs no answer column: 1 if the last integer in the completion equals the value of the
    last "A + B?" (also -, *) in the prompt's last user message, else 0; a prompt without one is an error.
    For prompts that arrive without answers (served traffic: rft train --from-logs)."""
    text = next(m["content"] for m in reversed(sample["messages"]) if m["role"] == "user")
    found = _QUESTION.findall(text)
    if not found:
        raise ValueError(f"arithmetic_verifier: no 'A + B?' question in the prompt {text[:80]!r}")
    a, op, b = found[-1]
    value = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(a), int(b))
    return last_integer(completion, {"answer": value})


def exact_match(completion: str, sample: dict) -> float:
    """1 if the completion equals sample["answer"] up to surrounding and repeated whitespace."""
    norm = lambda s: " ".join(str(s).split())
    return float(norm(completion) == norm(sample["answer"]))


def format_regex(pattern: str) -> Reward:
    """A reward of 1 when the whole completion matches `pattern` (re.DOTALL)."""
    rx = re.compile(pattern, re.DOTALL)
    return lambda completion, sample: float(rx.fullmatch(completion.strip()) is not None)


_TAGGED = re.compile(r"<answer>\s*\S.*?</answer>", re.DOTALL)


def answer_tags(completion: str, sample: dict) -> float:
    """Format shaping for answer-tag tasks (`rg:NAME`): 1 when the reply ends with its only, non-empty
    <answer>...</answer>, else 0 (an echo of the instruction, "... between <answer> and </answer>.", does not end
    with its tag). Give it a small weight beside the task's reward (recipes/reasoning_gym.yaml)."""
    return float(len(_TAGGED.findall(completion)) == 1 and completion.count("<answer>") == 1
                 and completion.rstrip().endswith("</answer>"))


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


def json_schema_valid(completion: str, sample: dict) -> float:
    """1 if the completion (or its last ```json block) parses as JSON valid under sample["schema"]."""
    import jsonschema
    blocks = re.findall(r"```(?:json)?[ \t]*\n(.*?)```", completion, re.DOTALL)
    try:
        value = json.loads(blocks[-1] if blocks else completion)
    except json.JSONDecodeError:
        return 0.0
    return float(jsonschema.Draft202012Validator(sample["schema"]).is_valid(value))


# ---------------------------------------------------------------------------------------------- code execution
_FENCE = re.compile(r"```([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str, extract: str = "auto") -> str | None:
    """The program in a completion: the last ```python (or ```py) block, else the last fenced block; with
    extract="auto" the whole completion when it has no block, with "block" None; "whole": the completion."""
    if extract not in ("auto", "block", "whole"):
        raise ValueError(f"extract must be 'auto', 'block' or 'whole', got {extract!r}")
    if extract == "whole":
        return completion
    blocks = _FENCE.findall(completion)
    py = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
    if py or blocks:
        return (py or [code for _, code in blocks])[-1]
    return completion if extract == "auto" else None


def _check_tests(sample: dict) -> list:
    from rftkit.sandbox_harness import compile_check
    tests = sample.get("tests")
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"code_execution needs sample['tests'], a non-empty list, got {tests!r}")
    for t in tests:
        if isinstance(t, str):
            compile_check(t)                                      # an assert test that is not Python: raise
        ok = isinstance(t, str) or (isinstance(t, dict) and isinstance(t.get("stdout"), str)
                                   and isinstance(t.get("stdin", ""), str) and set(t) <= {"stdin", "stdout"})
        if not ok:
            raise ValueError(f"a code test is an assert string or {{'stdin': str, 'stdout': str}}, got {t!r}")
    return tests


def _same_output(got: str, want: str) -> bool:
    lines = lambda text: [l.rstrip() for l in text.strip().splitlines()]
    return lines(got) == lines(want)


LIMITS = ("timeout", "cpu time", "memory", "file size", "disk")     # sandbox kill reasons that mean "a limit was hit"


def code_execution(timeout_s: float = 5.0, memory_mb: int = 512, max_procs: int | None = 16,
                   extract: str = "auto", limit_score: float | None = None, isolation: str | None = None) -> Reward:
    """A reward that runs the completion's program in the sandbox (rftkit.sandbox.run_python), once per test,
    and scores the fraction of tests passed.

    Sample fields:
      tests  (required) non-empty list; each test is either
             - {"stdin": "3 4\n", "stdout": "7\n"}: the program runs with that stdin ("" if absent) and
               passes when its stdout equals "stdout" line by line, trailing whitespace ignored; or
             - "assert add(3, 4) == 7": Python run after the program, in its namespace, by the sandbox's
               assert harness (rftkit/sandbox_harness.py): passes when every assert in it ran and held,
               judged by a process the program cannot write to, on plain values (a custom __eq__, an early
               `sys.exit(0)` or a printed marker pass nothing). Prefer literal expected values
               (`== 7`): those never reach the program's process.
      files  (optional) {relative name: text} written beside the program (helpers, data).
    Each run gets `timeout_s` of wall clock, `memory_mb` of address space and `max_procs` tasks, isolated as
    rftkit/sandbox.py says (`isolation="none"` or RFTKIT_SANDBOX_ISOLATION=none opts out where namespaces are not
    allowed; without either, such a machine raises a SandboxError naming what to enable). A test whose program is
    stopped by a limit, or whose supervisor dies, fails; with `limit_score` set, any limit hit makes the whole
    score `limit_score` (e.g. -1 to punish hanging programs). No code found (extract="block") scores 0. A malformed
    `tests` field raises (it is the data's fault, not the model's)."""
    from rftkit.sandbox import run_python
    if limit_score is not None and not math.isfinite(limit_score):
        raise ValueError(f"limit_score must be finite or None, got {limit_score!r}")
    extract_code("", extract)                                     # validates `extract` now, not mid-run

    def reward(completion: str, sample: dict) -> float:
        tests = _check_tests(sample)
        code = extract_code(completion, extract)
        if code is None:
            return 0.0
        passed, hit_limit = 0, False
        for t in tests:
            check, stdin = (t, "") if isinstance(t, str) else (None, t.get("stdin", ""))
            r = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs, stdin=stdin,
                           files=sample.get("files"), check=check, isolation=isolation)
            hit_limit |= r.killed_reason in LIMITS or r.output_truncated
            if isinstance(t, str):
                passed += r.passed is True
            else:
                passed += r.ok and _same_output(r.stdout, t["stdout"])
        if hit_limit and limit_score is not None:
            return float(limit_score)
        return passed / len(tests)
    return reward


# ------------------------------------------------------------------------------------------------ LLM judge
def load_module(file: str, what: str):
    """Import a user's Python file (reward, tools, environment: user code the user chose to run); a failing
    import names the file."""
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"{what} file {file!r} not found")
    spec = importlib.util.spec_from_file_location(f"rftkit_user_{what.replace(' ', '_')}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"{what} file {file} failed to import: {type(e).__name__}: {e}") from e
    return module

class BatchReward:
    """A reward scored a batch at a time: `batch(completions, samples)` returns one float per completion, or
    an Exception instance for a completion it could not score (score_batch reports or counts it like a
    raise). Calling it on one completion scores a batch of one."""

    def batch(self, completions: list[str], samples: list[dict]) -> list:
        raise NotImplementedError

    def metrics(self) -> dict:
        """Counters for the metrics log (a judge's requests, cache hits, tokens); none by default."""
        return {}

    def __call__(self, completion: str, sample: dict) -> float:
        value = self.batch([completion], [sample])[0]
        if isinstance(value, Exception):
            raise value
        return value


class MathEquivalence(BatchReward):
    """1 if `math-verify` finds the completion's final answer equal to sample["answer"]. A batch reward, so
    score_batch runs it in its own thread rather than a worker's: math-verify's 5 s timeouts use signal.alarm,
    which only the main thread may set (in a worker thread it refuses to run with them, and without them one
    pathological expression could hang sympy). Off the main thread it runs without the timeouts."""

    def batch(self, completions: list[str], samples: list[dict]) -> list:
        from math_verify import parse, verify
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        out: list = []
        for completion, sample in zip(completions, samples):
            try:
                gold = parse(str(sample["answer"]), parsing_timeout=timeout)
                out.append(float(bool(verify(gold, parse(completion, parsing_timeout=timeout),
                                             timeout_seconds=timeout))))
            except Exception as e:      # reported or counted per completion by score_batch
                out.append(e)
        return out


math_equivalence = MathEquivalence()


JUDGE_TEMPLATE = ("You grade answers. Question:\n{prompt}\n\nAnswer:\n{completion}\n\n"
                  "How good is the answer, from 0 (wrong) to 10 (perfect)? Reply with 'Score: N' and nothing else.")


class JudgeError(ValueError):
    pass


class LLMJudge(BatchReward):
    """LLM-as-judge through our engine: fill `template` for each (completion, sample), generate the judge's
    replies in one batched `engine.generate` (greedy by default), parse a number with `pattern` (its first
    group; the first match in the reply) and map [lo, hi] to [0, 1].

    The template is `str.format`-ed with {prompt} (the last user message of sample["messages"], or
    sample["prompt"]), {completion} and every other top-level field of the sample ({answer}, ...). A reply with
    no match, or a number outside [lo, hi], is a JudgeError that shows the reply.

        judge = LLMJudge(*load("path/to/judge-model"))         # in a reward file: --reward file.py:judge
    """

    def __init__(self, model, tok, template: str = JUDGE_TEMPLATE, pattern: str = r"[Ss]core\s*[:=]?\s*(-?\d+(?:\.\d+)?)",
                 lo: float = 0.0, hi: float = 10.0, max_tokens: int = 16, temperature: float = 0.0,
                 seed: int = 0, engine=None):
        if not hi > lo:
            raise ValueError(f"judge score range needs hi > lo, got lo={lo}, hi={hi}")
        self.pattern = re.compile(pattern)
        if self.pattern.groups < 1:
            raise ValueError(f"judge pattern {pattern!r} needs a capture group around the number")
        self.model, self.tok, self.template = model, tok, template
        self.lo, self.hi, self.max_tokens, self.temperature, self.seed = lo, hi, max_tokens, temperature, seed
        self.engine = engine
        self.last_replies: list[str] = []

    def prompt_text(self, completion: str, sample: dict) -> str:
        if "messages" in sample:
            users = [m["content"] for m in sample["messages"] if m.get("role") == "user"]
            question = users[-1] if users else ""
        else:
            question = str(sample.get("prompt", ""))
        fields = {k: v for k, v in sample.items() if k not in ("messages", "prompt", "completion")}
        try:
            return self.template.format(**fields, prompt=question, completion=completion)
        except KeyError as e:
            raise ValueError(f"judge template field {e.args[0]!r} is not in the sample (fields: "
                             f"{sorted(fields)} + prompt, completion)") from None

    def parse(self, reply: str) -> float:
        m = self.pattern.search(reply)
        if m is None:
            raise JudgeError(f"judge reply has no score matching {self.pattern.pattern!r}: {reply!r}")
        value = float(m.group(1))
        if not self.lo <= value <= self.hi:
            raise JudgeError(f"judge score {value} is outside [{self.lo}, {self.hi}] in reply {reply!r}")
        return (value - self.lo) / (self.hi - self.lo)

    def batch(self, completions: list[str], samples: list[dict]) -> list:
        from rftkit.engine import Engine
        from rftkit.sampling import SamplingParams
        prompts = [self.tok.encode_chat([{"role": "user", "content": self.prompt_text(c, s)}])
                   for c, s in zip(completions, samples)]
        if self.engine is None or self.engine.max_seq_len < max(map(len, prompts)) + self.max_tokens:
            self.engine = Engine(self.model, max_seq_len=2 * max(map(len, prompts)) + self.max_tokens,
                                 max_batch=64)
        params = SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed,
                                stop_token_ids=list(self.tok.eos_token_ids))
        replies = [self.tok.decode(g[0].token_ids) for g in self.engine.generate(prompts, params)]
        self.last_replies = replies
        out = []
        for reply in replies:
            try:
                out.append(self.parse(reply))
            except JudgeError as e:
                out.append(e)
        return out


BUILTIN: dict[str, Reward] = {"last_integer": last_integer, "numeric": numeric_match, "exact": exact_match,
                              "arithmetic_verifier": arithmetic_verifier,
                              "math": math_equivalence, "json_schema": json_schema_valid, "code": code_execution(),
                              "answer_tags": answer_tags}


# "PREFIX:..." specs that a room above registers (rftkit.graders: grader:FILE.json, judge-api:MODEL,
# judge-group:MODEL, http(s)://URL); importing rftkit.graders fills it
SPEC_LOADERS: dict[str, Callable[[str], Reward]] = {}
GRADER_PREFIXES = ("grader", "judge-api", "judge-group", "http", "https")


def load_reward(spec: str) -> Reward:
    """A built-in name, "judge:MODEL" (LLMJudge with the default template; MODEL a folder, .gguf, or
    "embedded"), "path/to/file.py:function" (any callable there, e.g. an LLMJudge instance), or, once
    rftkit.graders is imported, "grader:FILE.json", "judge-api:MODEL", "judge-group:MODEL" or an http(s) URL."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    prefix = spec.split(":", 1)[0]
    if prefix in SPEC_LOADERS:
        return SPEC_LOADERS[prefix](spec)
    if prefix in GRADER_PREFIXES:
        raise ValueError(f"reward {spec!r} needs rftkit.graders: `import rftkit.graders` first (the rft command "
                         f"does)")
    if spec.startswith("judge:"):
        from rftkit.loading import load
        name = spec[len("judge:"):]
        return LLMJudge(*load(None if name == "embedded" else name))
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {sorted(BUILTIN)}, 'judge:MODEL', "
                         f"'grader:FILE.json', 'judge-api:MODEL', 'judge-group:MODEL', an http(s) URL or "
                         f"'file.py:function'")
    path, name = spec.rsplit(":", 1)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"reward file {file} does not exist")
    module = load_module(str(file), "reward")
    fn = getattr(module, name, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward file {file} has no function {name!r}; it defines {defined}")
    return fn


def reward_metrics(rewards: dict[str, Reward]) -> dict:
    """{"NAME/counter": value} of every batch reward's metrics() (judges' requests, cache hits, tokens)."""
    return {f"{name}/{k}": v for name, fn in rewards.items() if isinstance(fn, BatchReward)
            for k, v in fn.metrics().items()}


class RewardError(ValueError):
    """A reward raised or returned something that is not a finite number (the message shows the sample)."""


def _show(completion: str, sample: dict) -> str:
    c = completion if len(completion) < 300 else completion[:300] + "..."
    s = {k: v for k, v in sample.items() if k != "messages"}
    return f"sample {s!r}, completion {c!r}"


def _check(name: str, value, completion: str, sample: dict) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardError(f"reward {name!r} returned {value!r} (must be a finite int or float) for "
                          f"{_show(completion, sample)}")
    return float(value)


_PER_SAMPLE = object()


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
        name, fn, c, s, given = args            # given: a batch reward's value (or Exception) for (c, s)
        try:
            value = fn(c, s) if given is _PER_SAMPLE else given
            if isinstance(value, Exception):
                raise value
            return _check(name, value, c, s)
        except RewardError as e:
            if on_error == "raise":
                raise
            failure = str(e)
        except SystemExit as e:     # sys.exit() in a reward would end the run with its status (0): always an error
            raise RewardError(f"reward {name!r} called sys.exit({e.code!r}) on {_show(c, s)}") from None
        except Exception as e:
            if on_error == "raise":
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e} on {_show(c, s)}") from e
            failure = f"{type(e).__name__}: {e} on {_show(c, s)}"
        if errors is not None:
            entry = errors.setdefault(name, {"count": 0, "first": failure})
            entry["count"] += 1
        return fallback

    batched = {}                            # batch rewards (a judge's engine) run once, in this thread
    for name, fn in rewards.items():
        if isinstance(fn, BatchReward):
            values = fn.batch(completions, samples)
            if len(values) != len(completions):
                raise RewardError(f"batch reward {name!r} returned {len(values)} values for {len(completions)} "
                                  f"completions")
            batched[name] = values
    jobs = [(name, fn, c, s, batched[name][i] if name in batched else _PER_SAMPLE)
            for name, fn in rewards.items() for i, (c, s) in enumerate(zip(completions, samples))]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        values = list(pool.map(one, jobs))
    n = len(completions)
    return {name: values[i * n:(i + 1) * n] for i, name in enumerate(rewards)}
