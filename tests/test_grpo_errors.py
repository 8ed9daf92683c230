"""Acceptance 6 on real runs: bad reward files, rewards returning non-numbers and unknown tasks fail with a
specific message (before any model is loaded where possible); hostile programs in a code reward get bounded
scores while the run goes on; a run stopped by an error keeps its metrics and last checkpoint."""
import json

import pytest

from rftkit.cli import main
from rftkit.grpo import GRPOConfig, train
from rftkit.rewards import RewardError, code_execution
from rftkit.tasks import Task
from tests.conftest import grpo_config, grpo_setup


def test_rft_train_names_a_reward_file_that_fails_to_import(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("import not_a_module_xyz\n")
    rc = main(["train", "--reward", f"{tmp_path / 'broken.py'}:score", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "broken.py failed to import: ModuleNotFoundError: No module named 'not_a_module_xyz'" in err
    (tmp_path / "ok.py").write_text("def other(completion, sample):\n    return 1.0\n")
    assert main(["train", "--reward", f"{tmp_path / 'ok.py'}:score", "--output", str(tmp_path / "run")]) == 2
    assert "has no function 'score'; it defines ['other']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()          # refused before the model was loaded or anything written


def test_rft_train_names_an_unknown_task(tmp_path, capsys):
    assert main(["train", "--task", "arithmetik", "--output", str(tmp_path / "run")]) == 2
    assert "unknown task 'arithmetik': use one of ['arithmetic', 'countdown'], jsonl:FILE, or rg:NAME" \
        in capsys.readouterr().err
    assert main(["train", "--task", "rg:no_such_generator", "--output", str(tmp_path / "run")]) == 2
    assert "unknown reasoning-gym task 'no_such_generator'" in capsys.readouterr().err
    assert main(["train", "--task", f"jsonl:{tmp_path / 'missing.jsonl'}", "--output", str(tmp_path / "run")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err


def test_a_reward_file_returning_a_non_number_stops_the_run_and_keeps_its_data(tmp_path, tok_dir):
    model, tok, task = grpo_setup(tok_dir)
    reward_file = tmp_path / "rewards.py"
    reward_file.write_text("import itertools\n_calls = itertools.count()\n\n"
                           "def score(completion, sample):\n"
                           "    return 0.5 if next(_calls) < 16 else 'high'   # 8 completions per step\n")
    spec = f"{reward_file}:score"
    cfg = grpo_config(tmp_path / "run", steps=5, checkpoint_every=100, reward=[spec])
    with pytest.raises(RewardError, match=r"reward '.*rewards.py:score' returned 'high' \(must be a finite int "
                                          r"or float\) for sample \{'answer': \d+, 'id': '\d+\+\d+'\}"):
        train(cfg, model, tok, task, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r[f"reward/{spec}"] == 0.5 for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "weights.safetensors").is_file()

    # counted instead: the run goes on and every step reports how many values were bad
    m2, _, _ = grpo_setup(tok_dir)
    reward_file.write_text("def score(completion, sample):\n    return None\n")
    train(grpo_config(tmp_path / "count", steps=2, reward=[spec], on_reward_error="count"), m2, tok, task, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "count" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_errors"][spec]["count"] for r in rows] == [8, 16]
    assert "returned None" in rows[0]["reward_errors"][spec]["first"]


HOSTILE = {"loop": "while True:\n    pass\n",
           "10 GB": "x = bytearray(10 * 1024 ** 3)\nprint('done')\n",
           "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
           "benign": "print('done')\n"}


def test_hostile_programs_in_a_code_reward_get_bounded_scores_and_the_run_goes_on(tmp_path, tok_dir):
    model, tok, _ = grpo_setup(tok_dir)
    # the tiny model writes bytes, not programs: each sample carries the program the code reward runs
    samples = [{"messages": [{"role": "user", "content": f"write {name}"}], "program": code,
                "tests": [{"stdout": "done"}], "id": name} for name, code in HOSTILE.items()]
    code = code_execution(timeout_s=1.0, memory_mb=256, max_procs=8)
    task = Task("hostile", {"train": samples, "validation": samples, "test": samples},
                lambda completion, sample: code(sample["program"], sample))
    out = tmp_path / "run"
    result = train(grpo_config(out, steps=2, prompts_per_step=2, group_size=2), model, tok, task, progress=False)
    assert result["steps"] == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # each of the 4 programs ran twice (G = 2) over the 2 steps; only the benign one scores
    assert sum(r["reward"] * 4 for r in rows) == pytest.approx(2.0)
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows)
    assert (out / "checkpoints" / "step-0000002").is_dir() and (out / "adapter" / "adapter_config.json").is_file()
