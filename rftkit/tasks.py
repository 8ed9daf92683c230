"""Tasks: where prompts come from. A task yields samples — chat messages plus the fields its reward needs —
and names a default reward.

    task = get_task("arithmetic")                    # or "countdown", "jsonl:data.jsonl", "rg:basic_arithmetic",
                                                     # "rg:chain_sum:min_terms=2,max_terms=2" (generator config)
                                                     # (a user's own files: rftkit.data, `--data`)
    batch = [task.sample("train", i, seed=0) for i in range(8)]

One rule for prompts: `sample["messages"]` holds the conversation without the reply; the trainer and the
evaluator apply the model's chat template with its default system prompt and the generation prompt.
Splits `train`, `validation` and `test` never overlap: a problem's split is a function of a hash of the
problem itself, so the same problem cannot land in two splits whatever the seed.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rftkit.rewards import Reward, exact_match, last_integer

SPLITS = ("train", "validation", "test")


def split_of(key: str) -> str:
    """test ≈ 20%, validation ≈ 10%, train ≈ 70% of a problem space, by a stable hash of the problem."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return "test" if h < 2 else ("validation" if h == 2 else "train")


@dataclass
class Task:
    name: str
    problems: dict[str, list[dict]]            # split -> samples
    default_reward: Reward

    def size(self, split: str) -> int:
        return len(self._split(split))

    def _split(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
        if not self.problems[split]:
            raise ValueError(f"task {self.name!r} has no {split} samples")
        return self.problems[split]

    def sample(self, split: str, index: int, seed: int = 0) -> dict:
        """The index-th sample of a seeded pass over the split (reshuffled every epoch); a function of
        (split, index, seed) alone, so a resumed or sharded run sees exactly the same stream."""
        items = self._split(split)
        epoch, i = divmod(index, len(items))
        order = list(range(len(items)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        return items[order[i]]

    def samples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        items = self._split(split)
        if n > len(items):
            raise ValueError(f"asked for {n} {split} samples of task {self.name!r}, which has {len(items)}")
        return [self.sample(split, i, seed) for i in range(n)]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def arithmetic(digits: int = 2, ops: str = "+",
               template: str = "What is {a} {op} {b}? Answer with just the number.") -> Task:
    """All pairs of `digits`-digit operands (10–99 for 2) under each operation in `ops`."""
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    if digits > 3:
        raise ValueError(f"arithmetic enumerates every problem: digits must be <= 3, got {digits}")
    fns = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    bad = [o for o in ops if o not in fns]
    if bad:
        raise ValueError(f"unknown arithmetic operations {bad}: use some of {list(fns)}")
    problems = {s: [] for s in SPLITS}
    for op in ops:
        for a in range(lo, hi + 1):
            for b in range(lo, hi + 1):
                key = f"{a}{op}{b}"
                problems[split_of(key)].append({"messages": _user(template.format(a=a, op=op, b=b)),
                                                "answer": fns[op](a, b), "id": key})
    return Task(f"arithmetic{digits}{ops}", problems, last_integer)


def countdown(n_numbers: int = 3, size: int = 5000, seed: int = 0) -> Task:
    """Reach a target with the given numbers and + - * (each number used at most once)."""
    rng = random.Random(seed)
    problems = {s: [] for s in SPLITS}
    seen = set()
    while sum(map(len, problems.values())) < size:
        nums = [rng.randint(1, 25) for _ in range(n_numbers)]
        a, b, *rest = nums
        value = a
        for x in [b] + rest:
            value = rng.choice([value + x, value - x, value * x]) if value * x < 1000 else value + x
        key = f"{sorted(nums)}={value}"
        if key in seen or value <= 0:
            continue
        seen.add(key)
        text = (f"Using the numbers {nums}, each at most once, with + - * and parentheses, make {value}. "
                f"Give just the expression.")
        problems[split_of(key)].append({"messages": _user(text), "numbers": nums, "target": value, "id": key})
    return Task(f"countdown{n_numbers}", problems, countdown_reward)


def countdown_reward(completion: str, sample: dict) -> float:
    """1 if the last line is an expression over the allowed numbers that equals the target (no eval)."""
    import ast
    lines = [l for l in completion.strip().splitlines() if l.strip()]
    if not lines:
        return 0.0
    expr = lines[-1].split("=")[0].strip().strip("`$")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return 0.0
    used: list[int] = []

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            used.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            l, r = ev(node.left), ev(node.right)
            return l + r if isinstance(node.op, ast.Add) else (l - r if isinstance(node.op, ast.Sub) else l * r)
        raise ValueError("disallowed")
    try:
        value = ev(tree)
    except ValueError:
        return 0.0
    pool = list(sample["numbers"])
    for u in used:
        if u not in pool:
            return 0.0
        pool.remove(u)
    return float(value == sample["target"])


def jsonl(path: str) -> Task:
    """Each line: {"prompt": text} or {"messages": [...]}, plus the fields the reward reads (e.g. "answer").
    The lines are hash-split 70/10/20 like the built-in tasks; `--data FILE` (rftkit.data) trains on every row."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"task file {file} does not exist")
    problems = {s: [] for s in SPLITS}
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or ("prompt" not in row and "messages" not in row):
            raise ValueError(f"{file}:{n}: a sample needs a 'prompt' or 'messages' field")
        messages = row.pop("messages", None) or _user(row.pop("prompt"))
        problems[split_of(line)].append({"messages": messages, **row})
    return Task(f"jsonl:{file.name}", problems, exact_match)


ANSWER_FORMAT = "Give only the final answer, between <answer> and </answer>."


def answer_in_tags(completion: str) -> str:
    """What a reply answers: the text of its last <answer>...</answer>, else the whole reply (stripped), so a bare
    answer still counts (the scoring of `rg:` tasks before they asked for tags)."""
    from reasoning_gym.utils import extract_answer
    tagged = extract_answer(completion)
    return completion.strip() if tagged is None else tagged


def reasoning_gym(name: str, size: int = 2000, seed: int = 0, answer_format: str = ANSWER_FORMAT, shots: int = 2,
                  partial_credit: bool = False, **config) -> Task:
    """A reasoning-gym generator, each question followed by `answer_format` (reasoning-gym's answer tags; "" for
    the bare question) and preceded by `shots` worked examples (a user turn and the assistant's
    `<answer>ANSWER</answer>`, drawn from the generator past the task's own items), scored by the dataset's own
    `score_answer` on the answer in the tags (`answer_in_tags`): 1 for a right answer, else 0, unless
    `partial_credit` keeps its fractions (credit for a reply that merely contains the answer, which GRPO learns to
    game). `config` goes to the generator's config (e.g. `max_terms=2`, or `datasets=[DatasetSpec(...)]` for
    "composite"); from the command line, `rg:NAME:KEY=VALUE,KEY=VALUE`. The `answer_tags` reward
    (rftkit.rewards) shapes the format."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS
    if name not in DATASETS:
        raise ValueError(f"unknown reasoning-gym task {name!r}; names: {', '.join(sorted(DATASETS))}")
    try:
        data = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
        extra = list(reasoning_gym.create_dataset(name, size=shots + 8, seed=seed + size, **config)) if shots else []
    except (TypeError, AssertionError, ValueError) as e:   # an unknown key or an out-of-range value
        raise ValueError(f"reasoning-gym task {name!r} rejects its config {config}: {type(e).__name__}: {e}") from e
    entries = list(data)
    ask = lambda q: f"{q.rstrip()}\n\n{answer_format}" if answer_format else q
    questions = {e["question"] for e in entries}
    shown = [e for e in extra if e["question"] not in questions and e["answer"] is not None][:shots]
    prefix = [m for e in shown for m in (*_user(ask(e["question"])),
                                        {"role": "assistant", "content": f"<answer>{e['answer']}</answer>"})]
    problems = {s: [] for s in SPLITS}
    for i, entry in enumerate(entries):
        problems[split_of(entry["question"])].append({"messages": prefix + _user(ask(entry["question"])),
                                                      "entry": entry, "answer": entry["answer"], "id": f"{name}:{i}"})

    def score(completion: str, sample: dict) -> float:
        s = float(data.score_answer(answer=answer_in_tags(completion), entry=sample["entry"]))
        return s if partial_credit else float(s >= 1.0)
    label = ",".join(f"{k}={v}" for k, v in config.items())
    return Task(f"rg:{name}" + (f":{label}" if label else ""), problems, score)


def _rg_config(text: str) -> dict:
    """"max_terms=2,min_digits=1" -> {"max_terms": 2, "min_digits": 1} (values read as YAML scalars)."""
    import yaml
    config = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"rg: config item {item!r} is not KEY=VALUE (e.g. rg:chain_sum:min_terms=2,max_terms=2)")
        config[key.strip()] = yaml.safe_load(value)
    return config


TASKS: dict[str, Callable[..., Task]] = {"arithmetic": arithmetic, "countdown": countdown}


def get_task(name: str, **kwargs) -> Task:
    if name.startswith("jsonl:"):
        return jsonl(name[len("jsonl:"):])
    if name.startswith("rg:"):
        gen, _, config = name[len("rg:"):].partition(":")
        return reasoning_gym(gen, **{**_rg_config(config), **kwargs})
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: use one of {sorted(TASKS)}, jsonl:FILE, or rg:NAME "
                         f"(reasoning-gym; list names with python -c \"import reasoning_gym.factory as f; "
                         f"print(sorted(f.DATASETS))\")")
    return TASKS[name](**kwargs)
