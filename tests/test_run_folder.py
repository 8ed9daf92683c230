"""One run per output folder: `rft train` / `rft sft` / `rft demo` refuse a used folder unless --resume or
--overwrite; --overwrite starts clean; a demo whose plot fails still prints its table, writes its report and
exits 0."""
import json

import pytest

from rftkit.cli import main
from rftkit.demo import DemoConfig, run_demo
from rftkit.grpo import GRPOConfig, train
from rftkit.run_folder import prepare_output
from rftkit.sft import SFTConfig
from rftkit.sft import train as sft_train
from rftkit.tasks import Task, arithmetic
from rftkit.tokenizer import Tokenizer
from tests.conftest import tiny_model


def _grpo(tok_dir, out, **kw):
    base = arithmetic()
    task = Task("tiny", {k: v[:40] for k, v in base.problems.items()}, lambda c, s: float(len(c) % 2))
    kw = {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_tokens": 4, "lora_r": 2, "micro_batch_groups": 1,
          "checkpoint_every": 1, **kw}
    cfg = GRPOConfig(output=str(out), **kw)
    return train(cfg, tiny_model(vocab_size=258, max_seq_len=256), Tokenizer.from_dir(tok_dir), task,
                 progress=False)


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_second_train_into_a_used_folder_is_refused_unless_resume_or_overwrite(tmp_path, tok_dir):
    out = tmp_path / "run"
    _grpo(tok_dir, out)
    assert _steps(out) == [1, 2]
    with pytest.raises(ValueError, match=r"already holds a run .*--resume.*--overwrite"):
        _grpo(tok_dir, out)
    assert _steps(out) == [1, 2]                                  # the refused run wrote nothing
    _grpo(tok_dir, out, overwrite=True)
    assert _steps(out) == [1, 2]                                  # replaced, not appended
    _grpo(tok_dir, out, resume=True, steps=3)                     # resume continues the same run
    assert _steps(out) == [1, 2, 3]
    with pytest.raises(ValueError, match="pass one"):
        _grpo(tok_dir, out, resume=True, overwrite=True)


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"\(metrics.jsonl, checkpoints\)"):
        prepare_output(out, resume=False, overwrite=False, command="rft sft")
    prepare_output(out, resume=False, overwrite=True, command="rft sft")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    prepare_output(tmp_path / "new", resume=False, overwrite=False, command="rft sft")    # a fresh folder is fine
    assert (tmp_path / "new").is_dir()


def test_sft_refuses_a_used_folder_before_loading_the_model(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    # the model named does not exist: the folder check must come first
    with pytest.raises(ValueError, match="--overwrite"):
        sft_train(SFTConfig(data=str(data), model=str(tmp_path / "no-such-model"), output=str(out), steps=1))


def test_cli_train_on_a_used_folder_exits_2_naming_the_flags(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    assert main(["train", "--output", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (adapter)" in err and "--resume" in err and "--overwrite" in err


def test_demo_whose_plot_fails_still_prints_the_table_writes_its_report_and_exits_0(tmp_path, tiny_folder,
                                                                                   monkeypatch, capsys):
    import matplotlib.figure

    def broken_savefig(*a, **k):
        raise OSError("disk full while drawing")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_folder), "--output", str(out), "--time-budget", "0.5", "--eval-n", "4",
            "--prompts-per-step", "2", "--group-size", "2", "--train-max-tokens", "4"]
    with pytest.warns(UserWarning, match="could not draw .*reward.png.*disk full"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| base     |" in printed and "| RFT      |" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["eval_n"] == 4 and report["train_steps"] >= 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "reward.png").exists()
    assert main(argv) == 2                                        # a second demo into it is refused ...
    assert "--overwrite" in capsys.readouterr().err
    run_demo(DemoConfig(model=str(tiny_folder), output=str(out), time_budget=0.5, eval_n=4, prompts_per_step=2,
                        group_size=2, train_max_tokens=4, overwrite=True))        # ... unless replaced
    assert _steps(out)[0] == 1 and (out / "report.json").is_file()
