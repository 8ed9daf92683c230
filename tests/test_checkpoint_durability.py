"""Nothing lost on kill, preemption or power cut: checkpoints fsync'ed before their rename, a re-saved step keeps
its old copy until the new one is in place, leftovers of a killed save cleaned up, --resume falls back to the
previous checkpoint when the newest does not load, SIGTERM checkpoints and exits 143, metrics.jsonl has no
duplicate rows after a resume even with a torn last line, and a reward calling sys.exit() fails the run."""
import json
import os
import signal
import sys

import pytest
import torch

from rftkit.grpo import GRPOConfig, train
from rftkit.lora import lora_parameters
from rftkit.rewards import RewardError, score_batch
from rftkit.tasks import Task, arithmetic
from rftkit.tokenizer import Tokenizer
from rftkit.loading.checkpoint import (latest_checkpoint, newest_readable_checkpoint, recover_checkpoints,
                                      save_checkpoint)
from tests.conftest import tiny_model


def _tiny_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def test_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    model, opt = _tiny_state()
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    final = save_checkpoint(tmp_path / "ck", 3, model, opt, {})
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = events[rename][1]
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    for name in ("weights.safetensors", "optimizer.safetensors", "state.json"):
        assert f"{tmp}/{name}" in synced_before, name
    assert tmp in synced_before                                              # the folder itself
    assert ("fsync", str(tmp_path / "ck")) in events[rename:]                # and the parent after the rename


def test_a_resave_that_dies_between_its_renames_keeps_the_old_copy(tmp_path, monkeypatch):
    model, opt = _tiny_state()
    folder = tmp_path / "ck"
    first = save_checkpoint(folder, 5, model, opt, {"v": 1})
    real_replace = os.replace

    def dies_on_new_copy(a, b):
        if ".tmp-step" in str(a):
            raise OSError("killed")
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", dies_on_new_copy)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(folder, 5, model, opt, {"v": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    recover_checkpoints(folder)                              # what the next save or resume does first
    assert latest_checkpoint(folder) == first
    assert json.loads((first / "state.json").read_text())["state"] == {"v": 1}
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000005"]   # no temporary folder left


def test_leftover_temporary_folders_are_removed(tmp_path):
    model, opt = _tiny_state()
    (tmp_path / "ck" / ".tmp-step-0000002-4242").mkdir(parents=True)
    save_checkpoint(tmp_path / "ck", 3, model, opt, {})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-0000003"]


def test_newest_readable_falls_back_when_the_newest_is_torn(tmp_path):
    model, opt = _tiny_state()
    save_checkpoint(tmp_path, 1, model, opt, {})
    newest = save_checkpoint(tmp_path, 2, model, opt, {})
    data = (newest / "weights.safetensors").read_bytes()
    (newest / "weights.safetensors").write_bytes(data[:len(data) // 2])      # a torn write
    with pytest.warns(UserWarning, match="step-0000002.*does not load"):
        path, read = newest_readable_checkpoint(tmp_path)
    assert path.name == "step-0000001" and read["meta"]["step"] == 1


def _setup(tok_dir):
    base = arithmetic()
    task = Task("tiny", {k: v[:40] for k, v in base.problems.items()},
                lambda c, s: sum(ch.isdigit() for ch in c) / max(1, len(c)))
    return tiny_model(vocab_size=258, max_seq_len=512), Tokenizer.from_dir(tok_dir), task


def _cfg(out, **kw):
    kw = {"checkpoint_every": 2, "prompts_per_step": 2, "group_size": 4, "max_tokens": 6, "lr": 5e-2, "lora_r": 4,
          "micro_batch_groups": 1, "seed": 3, **kw}
    return GRPOConfig(output=str(out), **kw)


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_falls_back_past_a_torn_checkpoint_and_logs_no_duplicate_rows(tmp_path, tok_dir):
    model, tok, task = _setup(tok_dir)
    train(_cfg(tmp_path / "a", steps=4), model, tok, task, progress=False)
    full = [p.detach().clone() for p in lora_parameters(model)]

    out = tmp_path / "b"
    m1, _, _ = _setup(tok_dir)
    train(_cfg(out, steps=4), m1, tok, task, progress=False)
    newest = latest_checkpoint(out / "checkpoints")
    assert newest.name == "step-0000004"
    (newest / "optimizer.safetensors").write_bytes(b"torn")                  # killed while writing step 4
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')                                          # and while logging step 5
    m2, _, _ = _setup(tok_dir)
    with pytest.warns(UserWarning, match="step-0000004.*does not load"):
        train(_cfg(out, steps=4, resume=True), m2, tok, task, progress=False)        # resumes from step 2
    assert _steps(out) == [1, 2, 3, 4]
    assert max(float((a - b).abs().max()) for a, b in zip(full, lora_parameters(m2))) < 1e-5


def test_sigterm_checkpoints_the_step_and_stops_then_resume_finishes_equal(tmp_path, tok_dir):
    model, tok, task = _setup(tok_dir)
    train(_cfg(tmp_path / "a", steps=4, checkpoint_every=10), model, tok, task, progress=False)
    full = [p.detach().clone() for p in lora_parameters(model)]

    out = tmp_path / "b"
    m1, _, _ = _setup(tok_dir)

    def preempt(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    result = train(_cfg(out, steps=4, checkpoint_every=10), m1, tok, task, progress=False, on_step=preempt)
    assert result["stopped"] == "SIGTERM" and result["steps"] == 3
    assert latest_checkpoint(out / "checkpoints").name == "step-0000003"
    assert not (out / "adapter").exists()
    assert signal.getsignal(signal.SIGTERM) is before                       # the handler is put back
    m2, _, _ = _setup(tok_dir)
    train(_cfg(out, steps=4, checkpoint_every=10, resume=True), m2, tok, task, progress=False)
    assert _steps(out) == [1, 2, 3, 4]
    assert max(float((a - b).abs().max()) for a, b in zip(full, lora_parameters(m2))) < 1e-5


def test_sigterm_through_the_cli_exits_143(tmp_path, tok_dir):
    import subprocess
    from rftkit.loading import save_model_folder
    model = tiny_model(vocab_size=258, max_seq_len=512)
    model.cfg.eos_token_id = [257]
    save_model_folder(model, tmp_path / "tiny", tokenizer_dir=tok_dir)
    reward = tmp_path / "preempt.py"
    reward.write_text("import os, signal\n"
                      "def preempt(completion, sample):\n"
                      "    os.kill(os.getpid(), signal.SIGTERM)   # the scheduler preempts the job mid-step\n"
                      "    return 0.0\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rftkit.cli", "train", "--model", str(tmp_path / "tiny"),
                           "--output", str(out), "--steps", "50", "--prompts-per-step", "2", "--group-size", "2",
                           "--max-tokens", "4", "--reward", f"{reward}:preempt"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert "stopped by SIGTERM after step 1" in proc.stderr and "--resume" in proc.stderr
    assert latest_checkpoint(out / "checkpoints").name == "step-0000001"


def test_a_reward_calling_sys_exit_is_an_error_not_a_clean_exit(tmp_path, tok_dir):
    def quits(completion, sample):
        sys.exit(0)
    with pytest.raises(RewardError, match=r"reward 'quits' called sys.exit\(0\)"):
        score_batch({"quits": quits}, ["a"], [{"answer": 1}], on_error="count", errors={})
    model, tok, task = _setup(tok_dir)
    task.default_reward = quits
    with pytest.raises(RewardError, match="sys.exit"):
        train(_cfg(tmp_path / "run", steps=2), model, tok, task, progress=False)
