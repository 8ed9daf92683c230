"""User data: a training file, and optionally a validation and a test file, as a Task whose splits are exactly
those files (no hidden split).

    task, about = data_task("train.jsonl", eval_data="val.jsonl")       # every row of train.jsonl trains
    rows = read_rows("data.csv", columns=["prompt=question", "answer=solution"])

Formats: JSONL (one object a line) and JSON (a list of objects) are read here, line by line, so an error names
its line and rows may differ in type (Bedrock's `reference_answer` is a string in one row, an object in the
next, which Arrow's JSON reader refuses). CSV, Parquet and local dataset folders (`save_to_disk` output, or a
folder of data files) go through the `datasets` library; a folder's split is the flag's: `--data` reads its
`train` split, `--eval-data` its `validation`, `--test-data` its `test`.

A row is a prompt, as chat `messages` (the OpenAI and Amazon Bedrock RFT formats) or a `prompt` string, plus
whatever the rewards read: `answer`, or Bedrock's `reference_answer` (copied to `answer` when it is a plain
value, for the default exact-match reward), and every other column, passed to the rewards as they are.
`columns` renames: `prompt=question` makes the column `question` the prompt. Without eval data no split is
made unless `eval_fraction` asks for one (a seeded draw of that share of the training rows), and `about`
says what was done, for the command to print.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from rftkit.rewards import exact_match
from rftkit.tasks import SPLITS, Task
from rftkit.traffic_log import LogQuery, held_out, select_prompts

FORMATS = {".jsonl": "json lines", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FLAG_SPLIT = {"data": "train", "eval_data": "validation", "test_data": "test"}   # a folder's split per flag


def parse_columns(columns: list[str] | None) -> dict[str, str]:
    """["prompt=question", ...] -> {"prompt": "question"} (our name -> the file's column)."""
    out: dict[str, str] = {}
    for item in columns or []:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ValueError(f"--columns item {item!r} is not NAME=COLUMN (e.g. prompt=question,answer=solution)")
        if ours.strip() in out:
            raise ValueError(f"--columns maps {ours.strip()!r} twice")
        out[ours.strip()] = theirs.strip()
    return out


def _read_jsonl(path: Path) -> list[tuple[str, int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line of a "
                                 f".jsonl file is one JSON object") from None
            rows.append((f"{path}:{n}", n, row))
    return rows


def _read_json(path: Path) -> list[tuple[str, int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); a .json file holds a list of "
                         f"objects (use .jsonl for one object a line)") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json data file holds a list of row objects, got {type(data).__name__}")
    return [(f"{path} row {i}", i, row) for i, row in enumerate(data, 1)]


def _read_with_datasets(path: Path, split: str) -> list[tuple[str, int, dict]]:
    import datasets
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(path))
        else:
            ds = datasets.load_dataset(FORMATS[path.suffix].split()[0], data_files=str(path), split="train")
    except Exception as e:          # datasets/arrow raise many types; the file and the reason are what matter
        raise ValueError(f"{path}: cannot read it as {'a dataset folder' if path.is_dir() else FORMATS[path.suffix]}"
                         f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: the dataset folder has no {split!r} split (it has {sorted(ds)}); the flag "
                             f"reads the split of its own name: --data train, --eval-data validation, "
                             f"--test-data test")
        ds = ds[split]
    where = f"{path}[{split}]" if path.is_dir() else str(path)
    return [(f"{where} row {i}", i, row) for i, row in enumerate(ds.to_list(), 1)]


def read_rows(path: str | Path, columns: list[str] | None = None, split: str = "train") -> list[dict]:
    """The rows of a data file or folder, renamed by `columns`; each row gets `_where` ("file:line" or
    "file row N") for error messages and `_line` (its number)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file or folder (JSONL, JSON, CSV or Parquet files, or a "
                                f"local dataset folder; a Hub dataset must be downloaded first, e.g. "
                                f"`hf download --repo-type dataset ORG/NAME --local-dir DIR`)")
    if path.is_file() and path.suffix not in FORMATS:
        raise ValueError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; use "
                         f"{', '.join(FORMATS)} or a dataset folder")
    if path.suffix == ".jsonl":
        raw = _read_jsonl(path)
    elif path.suffix == ".json" and path.is_file():
        raw = _read_json(path)
    else:
        raw = _read_with_datasets(path, split)
    if not raw:
        raise ValueError(f"{path}: no rows")
    mapping = parse_columns(columns)
    rows = []
    for where, n, row in raw:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object (a row with named columns), got {type(row).__name__}")
        for ours, theirs in mapping.items():
            if theirs not in row:
                raise ValueError(f"{where}: no column {theirs!r} (mapped by --columns {ours}={theirs}); the row "
                                 f"has {sorted(row)}")
            row[ours] = row.pop(theirs)
        rows.append({**row, "_where": where, "_line": n})
    return rows


def _text(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are taken."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise ValueError(f"{where}: message content must be a string or a list of text parts, got {content!r:.80}")


def prompt_messages(row: dict, where: str) -> list[dict]:
    """The chat an RFT row asks the model to continue: `messages`, or `prompt` (a string, or a list of messages
    as TRL's conversational format has it)."""
    if "messages" in row:
        msgs, name = row["messages"], "messages"
    elif "prompt" in row:
        msgs, name = row["prompt"], "prompt"
        if isinstance(msgs, str):
            msgs = [{"role": "user", "content": msgs}]
    else:
        have = sorted(k for k in row if not k.startswith("_"))
        raise ValueError(f"{where}: no 'messages' or 'prompt' column (the row has {have}); rename yours with "
                         f"--columns prompt=COLUMN or messages=COLUMN")
    if isinstance(msgs, str):               # a chat stored as JSON text (a CSV cell)
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: {name!r} is text that is not a JSON list of messages") from None
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise ValueError(f"{where}: {name!r} must be a non-empty list of {{'role', 'content'}} messages")
    out = [{**m, "content": _text(m.get("content"), f"{where}: {name}[{i}]")} for i, m in enumerate(msgs)]
    if out[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the chat ends with an assistant message; an RFT prompt ends where the model "
                         f"answers: drop the reply (or keep it as a column, e.g. 'answer')")
    return out


def to_sample(row: dict, need_answer: bool) -> dict:
    """A task sample: the prompt chat as `messages`, every other column as it is, `answer` filled from a
    plain `reference_answer`, and an `id` (the row's place) unless the row has one."""
    where = row["_where"]
    sample = {k: v for k, v in row.items() if not k.startswith("_") and k not in ("messages", "prompt")}
    sample["messages"] = prompt_messages(row, where)
    if "answer" not in sample and isinstance(sample.get("reference_answer"), (str, int, float)):
        sample["answer"] = sample["reference_answer"]
    if need_answer and "answer" not in sample:
        raise ValueError(f"{where}: no 'answer' or plain 'reference_answer' column for the default exact-match "
                         f"reward; map one with --columns answer=COLUMN, or pass a reward that reads the row "
                         f"(--task-reward / --reward file.py:fn)")
    sample.setdefault("id", where)
    return sample


def data_task(data: str | None = None, eval_data: str | None = None, test_data: str | None = None,
              columns: list[str] | None = None, eval_fraction: float = 0.0, seed: int = 0,
              need_answer: bool = True) -> tuple[Task, str]:
    """A Task over the user's files: train = every row of `data` (less an `eval_fraction` share when asked and
    no `eval_data` is given), validation = `eval_data`, test = `test_data`. Returns it and a line saying what
    was done. The default reward is exact match against `answer`."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction and eval_data:
        raise ValueError(f"give --eval-data or --eval-fraction, not both (got {eval_data} and {eval_fraction})")
    files = {"train": data, "validation": eval_data, "test": test_data}
    problems: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for split, path in files.items():
        if path:
            flag = {"train": "data", "validation": "eval_data", "test": "test_data"}[split]
            problems[split] = [to_sample(r, need_answer) for r in read_rows(path, columns, FLAG_SPLIT[flag])]
    about = []
    if data:
        train = problems["train"]
        if eval_fraction:
            n_eval = max(1, round(len(train) * eval_fraction))
            if n_eval >= len(train):
                raise ValueError(f"{data}: eval_fraction {eval_fraction} leaves no training rows out of {len(train)}")
            order = list(range(len(train)))
            random.Random(f"{seed}:eval-split").shuffle(order)
            problems["validation"] = [train[i] for i in sorted(order[:n_eval])]
            problems["train"] = [train[i] for i in sorted(order[n_eval:])]
            about.append(f"train: {len(problems['train'])} rows of {data}, validation: {n_eval} rows of it held out "
                         f"(--eval-fraction {eval_fraction}, seed {seed})")
        else:
            about.append(f"train: all {len(train)} rows of {data}")
    if eval_data:
        about.append(f"validation: all {len(problems['validation'])} rows of {eval_data}")
    elif data and not eval_fraction:
        about.append("no validation split (give --eval-data FILE, or --eval-fraction F to hold out rows)")
    if test_data:
        about.append(f"test: all {len(problems['test'])} rows of {test_data}")
    name = "data:" + Path(data or eval_data or test_data or "none").name
    return Task(name, problems, exact_match), "; ".join(about)


def logs_task(query: LogQuery, eval_fraction: float = 0.0, seed: int = 0, need_answer: bool = True) -> tuple[Task, str]:
    """A Task over the chat prompts `rft serve --log-requests` logged (rftkit.traffic_log): train = the selected
    prompts, validation = the `eval_fraction` share held out by a hash of each prompt (stable as the log grows,
    so `rft eval --from-logs` with the same flags scores the same held-out prompts). Logged prompts carry no
    answer: a verifier or grader reward scores them (`--task-reward`, `--grader`)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rows, about = select_prompts(query)
    problems: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in rows:
        split = "validation" if held_out(row["messages"], eval_fraction, seed) else "train"
        problems[split].append(to_sample(row, need_answer))
    if eval_fraction and not problems["train"]:
        raise ValueError(f"{query.db}: eval_fraction {eval_fraction} left no training prompts of {len(rows)}")
    about += (f"; train: {len(problems['train'])}, validation: {len(problems['validation'])} held out "
              f"(--eval-fraction {eval_fraction}, seed {seed})" if eval_fraction else "; no validation split")
    return Task("logs:" + (query.adapter or "all"), problems, exact_match), about


def task_from_flags(task: str, default_task: str, data: str | None, eval_data: str | None, test_data: str | None,
                    columns: list[str] | None, eval_fraction: float, seed: int,
                    need_answer: bool, logs: LogQuery | None = None) -> tuple[Task, str | None]:
    """The Task a command runs on: its data files when any is given (then `task` must be left at its default),
    the request log's prompts with `logs`, else the named task. Returns it and, for data files and logs, the line
    saying what was done."""
    if logs is not None:
        if data or eval_data or test_data or columns or task != default_task:
            raise ValueError(f"--from-logs {logs.db} is the data: give no --task, --data, --eval-data, --test-data "
                             f"or --columns beside it")
        return logs_task(logs, eval_fraction, seed, need_answer)
    if not (data or eval_data or test_data):
        if columns or eval_fraction:
            raise ValueError("--columns and --eval-fraction apply to data files: give --data (or --eval-data, "
                             "--test-data)")
        from rftkit.tasks import get_task
        return get_task(task), None
    if task != default_task:
        raise ValueError(f"give --task or data files (--data, --eval-data, --test-data), not both "
                         f"(got --task {task} and {data or eval_data or test_data})")
    return data_task(data, eval_data, test_data, columns, eval_fraction, seed, need_answer)
