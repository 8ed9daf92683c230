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


def test_wandb_and_mlflow_get_the_same_scalars_through_their_public_calls(tmp_path, tok_dir, monkeypatch):
    """Stand-ins with the signatures of wandb 0.31 and mlflow 3.18's calls that rftkit makes (neither package is
    a test dependency): every backend receives metrics.jsonl's numeric fields at their steps, and the tables."""
    import types
    from rftkit.grpo import train
    from tests.conftest import grpo_config, grpo_setup
    got = {"wandb": {}, "mlflow": {}, "tables": []}

    class Run:
        def log(self, data: dict, step: int | None = None, commit: bool | None = None) -> None:
            for k, v in data.items():
                if isinstance(v, Table):
                    got["tables"].append(("wandb", step, v.columns, v.data))
                else:
                    got["wandb"][(step, k)] = v

        def finish(self, exit_code: int | None = None, quiet: bool | None = None) -> None:
            got["wandb_finished"] = True

    class Table:
        def __init__(self, columns=None, data=None, rows=None, dataframe=None, dtype=None, optional=True,
                     allow_mixed_types=False, log_mode="IMMUTABLE"):
            self.columns, self.data = columns, data

    def init(entity=None, project=None, dir=None, id=None, name=None, notes=None, tags=None, config=None,
             config_exclude_keys=None, config_include_keys=None, allow_val_change=None, group=None, job_type=None,
             mode=None, force=None, reinit=None, resume=None, resume_from=None, fork_from=None,
             save_code=None, tensorboard=None, sync_tensorboard=None, monitor_gym=None, settings=None,
             anonymous=None):
        assert project == "rftkit" and name == "run" and dir == str(tmp_path / "run") and config["eval_every"] == 2
        return Run()
    wandb = types.SimpleNamespace(init=init, Table=Table)

    def log_metrics(metrics: dict, step: int | None = None, synchronous=None, run_id=None, timestamp=None,
                    model_id=None, dataset=None):
        got["mlflow"].update({(step, k): v for k, v in metrics.items()})

    def log_dict(dictionary: dict, artifact_file: str, run_id=None):
        got["tables"].append(("mlflow", artifact_file, dictionary["columns"], dictionary["data"]))
    mlflow = types.SimpleNamespace(
        set_experiment=lambda experiment_name=None, experiment_id=None, trace_location=None: None,
        start_run=lambda run_id=None, experiment_id=None, run_name=None, nested=False, parent_run_id=None,
        tags=None, description=None, log_system_metrics=None: None,
        log_params=lambda params, synchronous=None, run_id=None: None, log_metrics=log_metrics,
        log_dict=log_dict, end_run=lambda status="FINISHED": got.__setitem__("mlflow_ended", True))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    model, tok, task = grpo_setup(tok_dir)
    train(grpo_config(tmp_path / "run", steps=2, eval_every=2, eval_n=4, report_to=["wandb", "mlflow"],
                      log_completions_every=1), model, tok, task, progress=False)
    expected = {(r["step"], k): v for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    assert ("2", "eval/accuracy") not in expected and (2, "eval/accuracy") in expected and (1, "entropy") in expected
    assert got["wandb"] == expected and got["mlflow"] == expected
    assert [(t[0], t[1]) for t in got["tables"]] == [("wandb", 1), ("mlflow", "completions/step-0000001.json"),
                                                     ("wandb", 2), ("mlflow", "completions/step-0000002.json")]
    assert all(len(t[3]) == 8 and t[2] == ["prompt", "completion", "reward", "task"] for t in got["tables"])
    assert got["wandb_finished"] and got["mlflow_ended"]
