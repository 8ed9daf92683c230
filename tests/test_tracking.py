"""--report-to: a tiny `rft train` logged to TensorBoard and trackio is read back with the libraries' own readers
(TensorBoard's EventAccumulator, trackio's SQLite storage) and holds the same scalars as metrics.jsonl, the
evaluation rows and the completions table; wandb and mlflow without their package fail before any training,
naming the install."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rftkit.grpo import GRPOConfig
from rftkit.sft import SFTConfig
from rftkit.tracking import check_report_to

ROOT = Path(__file__).resolve().parent.parent

RUN = """
import json, sys
from rftkit.grpo import train
from tests.conftest import grpo_config, grpo_setup
out, tok_dir = sys.argv[1], sys.argv[2]
model, tok, task = grpo_setup(tok_dir)
train(grpo_config(out, steps=4, eval_every=2, eval_n=8, report_to=["tensorboard", "trackio"],
                  log_completions_every=2), model, tok, task, progress=False)
from trackio.sqlite_storage import SQLiteStorage           # read back through trackio's own storage
json.dump({"projects": SQLiteStorage.get_projects(), "runs": SQLiteStorage.get_runs("rftkit"),
           "logs": SQLiteStorage.get_logs("rftkit", "tracked")}, open(sys.argv[3], "w"), default=str)
"""


def test_tensorboard_and_trackio_runs_read_back_with_the_same_scalars(tmp_path, tok_dir):
    pytest.importorskip("tensorboard")
    pytest.importorskip("trackio")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, got = tmp_path / "tracked", tmp_path / "trackio.json"
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio-store"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", RUN, str(out), str(tok_dir), str(got)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward" in r]
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and [r["step"] for r in eval_rows] == [2, 4]

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    for key in ("reward", "accuracy", "completion_len", "entropy", "kl", "reward/task"):
        assert [(e.step, e.value) for e in ea.Scalars(key)] == \
            [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-7)) for r in train_rows], key
    assert [(e.step, e.value) for e in ea.Scalars("eval/accuracy")] == \
        [(r["step"], pytest.approx(r["eval/accuracy"])) for r in eval_rows]
    tables = ea.Tensors("completions/text_summary")
    assert [t.step for t in tables] == [2, 4]
    text = tables[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| prompt | completion | reward | task |") and len(text.split("\n")) == 2 + 8

    store = json.loads(got.read_text())
    assert store["projects"] == ["rftkit"] and store["runs"] == ["tracked"]
    logged = {}
    for entry in store["logs"]:
        for k, v in entry.items():
            if k not in ("step", "timestamp"):
                logged[(entry["step"], k)] = v
    for r in train_rows:
        for key in ("reward", "accuracy", "completion_len", "entropy", "kl", "step_s"):
            assert logged[(r["step"], key)] == pytest.approx(r[key]), (r["step"], key)
    for r in eval_rows:
        assert logged[(r["step"], "eval/accuracy")] == pytest.approx(r["eval/accuracy"])
    table = logged[(2, "completions")]
    assert table["_type"] == "trackio.table" and len(table["_value"]) == 8
    assert set(table["_value"][0]) == {"prompt", "completion", "reward", "task"}


@pytest.mark.parametrize("backend", ["wandb", "mlflow", "tensorboard", "trackio"])
def test_a_backend_without_its_package_fails_before_training_naming_the_install(backend, tmp_path, monkeypatch,
                                                                                capsys):
    from rftkit.cli import main
    monkeypatch.setitem(sys.modules, backend, None)           # as if not installed: its import fails
    with pytest.raises(ValueError, match=f"--report-to {backend} needs the {backend} package: pip install {backend}"):
        GRPOConfig(report_to=[backend])
    with pytest.raises(ValueError, match=f"pip install {backend}"):
        SFTConfig(data="d.jsonl", report_to=["none", backend])
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--steps", "1", "--report-to", backend]) == 2
    assert f"pip install {backend}" in capsys.readouterr().err
    assert not out.exists()                                    # refused before the run touched anything


def test_report_to_names_are_checked():
    assert check_report_to([]) == [] and check_report_to(["none"]) == []
    with pytest.raises(ValueError, match="'neptune': not a tracking backend; use some of tensorboard, trackio"):
        check_report_to(["neptune"])
