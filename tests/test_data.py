"""User data (rftkit.data): the OpenAI and Amazon Bedrock RFT formats load as their docs show them; CSV, Parquet
and dataset folders through `datasets` with column renames; every training row trains and the validation split
is exactly --eval-data; a split is made only when asked and said; bad files name the file, the row and the fix."""
import json

import pytest

from rftkit.data import data_task, read_rows, task_from_flags

# OpenAI RFT (developers.openai.com, reinforcement fine-tuning guide and API reference): `messages` (and `tools`)
# are reserved, any other key is a reference field graders read as {{ item.XXX }}; content may be text parts.
OPENAI_RFT = [
    {"messages": [{"role": "user", "content": "Compliance Audit Request: is the distributor's export of reagent X "
                                              "to country Y allowed under policy 4.2?"}],
     "compliant": "yes", "explanation": "Policy 4.2 allows reagent exports to listed countries."},
    {"messages": [{"role": "developer", "content": "Answer yes or no."},
                  {"role": "user", "content": [{"type": "text", "text": "Is a 3-day password rotation required?"}]}],
     "compliant": "no", "explanation": "The policy requires rotation every 90 days."},
]
# Amazon Bedrock RFT (docs.aws.amazon.com/bedrock/latest/userguide/rft-prepare-data-open-weight.html): `messages`
# + `reference_answer` (any format) + optional fields for the grader Lambda. (The docs' first example misses a
# quote before `role`; written here as valid JSON.)
BEDROCK_RFT = [
    {"messages": [{"role": "system", "content": "You are a helpful assistant"},
                  {"role": "user", "content": "What is machine learning?"}],
     "reference_answer": "Machine learning is a subset of artificial intelligence that enables computers to learn "
                         "and make decisions from data without being explicitly programmed."},
    {"id": "sample-001",
     "messages": [{"role": "system", "content": "You are a math tutor"},
                  {"role": "user", "content": "Solve: 2x + 5 = 13"}],
     "reference_answer": {"solution": "x = 4", "steps": ["2x = 13 - 5", "2x = 8", "x = 4"]}},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_openai_and_bedrock_rft_examples_load_as_they_are(tmp_path):
    task, about = data_task(_jsonl(tmp_path / "openai.jsonl", OPENAI_RFT), need_answer=False)
    a, b = task.problems["train"]
    assert a["messages"] == OPENAI_RFT[0]["messages"] and a["compliant"] == "yes" and "explanation" in a
    assert b["messages"][1] == {"role": "user", "content": "Is a 3-day password rotation required?"}  # text parts
    assert a["id"].endswith("openai.jsonl:1") and about.startswith("train: all 2 rows of")

    task, _ = data_task(_jsonl(tmp_path / "bedrock.jsonl", BEDROCK_RFT), need_answer=False)
    qa, math = task.problems["train"]
    assert qa["answer"] == BEDROCK_RFT[0]["reference_answer"]          # a plain reference is the default answer
    assert math["reference_answer"]["solution"] == "x = 4" and "answer" not in math and math["id"] == "sample-001"
    assert task.default_reward("x = 4", {"answer": "x = 4"}) == 1.0
    with pytest.raises(ValueError, match=r"bedrock.jsonl:2: no 'answer' or plain 'reference_answer' column .*"
                                         r"--columns answer=COLUMN.*--task-reward"):
        data_task(str(tmp_path / "bedrock.jsonl"))                     # the default exact match needs an answer


def test_csv_parquet_and_dataset_folders_with_renamed_columns(tmp_path):
    import datasets
    rows = [{"question": f"q{i}", "solution": str(i), "difficulty": i % 3} for i in range(5)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "validation": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    _jsonl(tmp_path / "files" / "train.jsonl", rows[:4])
    _jsonl(tmp_path / "files" / "test.jsonl", rows[4:])
    cols = ["prompt=question", "answer=solution"]
    for f in ("d.csv", "d.parquet"):
        task, _ = data_task(str(tmp_path / f), columns=cols)
        s = task.problems["train"]
        assert [x["messages"] for x in s] == [[{"role": "user", "content": f"q{i}"}] for i in range(5)], f
        assert [str(x["answer"]) for x in s] == [str(i) for i in range(5)] and s[4]["difficulty"] == 1, f
    task, about = data_task(str(tmp_path / "saved"), eval_data=str(tmp_path / "saved"), columns=cols)
    assert [x["answer"] for x in task.problems["train"]] == ["0", "1", "2"]       # --data: the train split
    assert [x["answer"] for x in task.problems["validation"]] == ["3", "4"]       # --eval-data: validation
    task, _ = data_task(str(tmp_path / "files"), test_data=str(tmp_path / "files"), columns=cols)
    assert task.size("train") == 4 and [x["answer"] for x in task.problems["test"]] == ["4"]
    with pytest.raises(ValueError, match=r"saved: the dataset folder has no 'test' split \(it has \['train', "
                                         r"'validation'\]\)"):
        data_task(str(tmp_path / "saved"), test_data=str(tmp_path / "saved"), columns=cols)


def test_bad_files_name_the_file_the_row_and_the_fix(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: not valid JSON .* one JSON object"):
        read_rows(f)
    f.write_text('{"prompt": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: no 'messages' or 'prompt' column \(the row has \['answer', "
                                         r"'question'\]\); rename yours with --columns prompt=COLUMN"):
        data_task(str(f))
    with pytest.raises(ValueError, match=r"d.jsonl:1: no column 'question' \(mapped by --columns prompt=question\)"):
        read_rows(f, ["prompt=question"])
    with pytest.raises(ValueError, match=r"--columns item 'prompt' is not NAME=COLUMN"):
        read_rows(f, ["prompt"])
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"d.txt: unknown data format '.txt'; use .jsonl, .json, .csv, .parquet"):
        read_rows(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl: no such data file or folder"):
        read_rows(tmp_path / "nope.jsonl")
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                             "answer": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: the chat ends with an assistant message"):
        data_task(str(f))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: cannot read it as parquet"):
        read_rows(tmp_path / "bad.parquet")


def test_a_split_is_made_only_when_asked_and_said(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(20)])
    task, about = data_task(data)
    assert task.size("train") == 20 and not task.problems["validation"] and not task.problems["test"]
    assert "no validation split" in about
    task, about = data_task(data, eval_fraction=0.1, seed=1)
    train, val = task.problems["train"], task.problems["validation"]
    assert len(train) == 18 and len(val) == 2 and {x["answer"] for x in train} | {x["answer"] for x in val} == \
        {str(i) for i in range(20)}
    assert "validation: 2 rows of it held out (--eval-fraction 0.1, seed 1)" in about
    assert data_task(data, eval_fraction=0.1, seed=1)[0].problems["validation"] == val      # the same rows again
    with pytest.raises(ValueError, match="give --eval-data or --eval-fraction, not both"):
        data_task(data, eval_data=data, eval_fraction=0.1)
    with pytest.raises(ValueError, match="give --task or data files"):
        task_from_flags("countdown", "arithmetic", data, None, None, [], 0.0, 0, True)
    with pytest.raises(ValueError, match="--columns and --eval-fraction apply to data files"):
        task_from_flags("arithmetic", "arithmetic", None, None, None, ["prompt=q"], 0.0, 0, True)
    from rftkit.grpo import GRPOConfig, train
    with pytest.raises(ValueError, match="rft train needs training rows: give --data FILE with --eval-data"):
        train(GRPOConfig(eval_data=data, output=str(tmp_path / "run")), progress=False)


@pytest.fixture
def model_folder(tmp_path, tok_dir):
    from rftkit.loading.weights import save_model_folder
    from tests.conftest import tiny_model
    save_model_folder(tiny_model(vocab_size=258, max_seq_len=512), tmp_path / "tiny", tokenizer_dir=tok_dir)
    return str(tmp_path / "tiny")


def test_rft_train_uses_every_training_row_and_rft_eval_scores_the_eval_file(tmp_path, model_folder, capsys):
    from rftkit.cli import main
    seen = tmp_path / "seen.txt"
    (tmp_path / "r.py").write_text(f"def tag(completion, sample):\n    open({str(seen)!r}, 'a').write(sample['tag'] "
                                   f"+ '\\n')\n    return float(len(completion) % 2)\n")
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": f"train question {i}", "tag": f"t{i}"} for i in range(6)])
    val = _jsonl(tmp_path / "val.jsonl", [{"prompt": f"val question {i}", "tag": f"v{i}"} for i in range(3)])
    common = ["--model", model_folder, "--max-tokens", "4"]
    assert main(["train", *common, "--data", train, "--eval-data", val, "--task-reward", f"{tmp_path}/r.py:tag",
                 "--prompts-per-step", "2", "--group-size", "2", "--steps", "3", "--lora-r", "2", "--eval-every", "3",
                 "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"rft train: train: all 6 rows of {train}; validation: all 3 rows of {val}" in out
    tags = seen.read_text().split()
    assert sorted(t for t in tags if t[0] == "t") == sorted(f"t{i}" for i in range(6) for _ in range(2))  # G=2
    assert sorted(t for t in tags if t[0] == "v") == ["v0", "v1", "v2"]     # evaluated during training: the file
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/n"] for r in rows if "eval/n" in r] == [3]

    seen.unlink()
    assert main(["eval", *common, "--data", train, "--eval-data", val, "--reward", f"{tmp_path}/r.py:tag"]) == 0
    out = capsys.readouterr().out
    assert "scoring the validation split (3 rows)" in out
    assert sorted(seen.read_text().split()) == ["v0", "v1", "v2"]                 # the given file, all of it
    seen.unlink()
    assert main(["eval", *common, "--test-data", val, "--reward", f"{tmp_path}/r.py:tag", "--n", "2"]) == 0
    assert len(seen.read_text().split()) == 2 and "scoring the test split (2 rows)" in capsys.readouterr().out


def test_rft_sft_reads_csv_with_renamed_columns(tmp_path, model_folder, capsys):
    import datasets

    from rftkit.cli import main
    rows = [{"instruction": f"say {w}", "output": w} for w in ("one", "two", "three", "four")]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    assert main(["sft", "--model", model_folder, "--data", str(tmp_path / "d.csv"), "--columns",
                 "prompt=instruction,completion=output", "--steps", "1", "--batch-size", "4", "--lora-r", "2",
                 "--output", str(tmp_path / "run")]) == 0
    assert "4 examples, 0 truncated to 1024 tokens, 0 dropped; 4 train / 0 held out (none" in capsys.readouterr().out
    assert main(["sft", "--model", model_folder, "--data", str(tmp_path / "d.csv"), "--steps", "1",
                 "--output", str(tmp_path / "run2")]) == 2
    assert "d.csv row 1: expected 'messages' or 'prompt' and 'completion', got keys ['instruction', 'output'] " \
           "(rename yours with --columns prompt=COLUMN,completion=COLUMN)" in capsys.readouterr().err
