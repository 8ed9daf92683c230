"""The GRPO loop on a tiny model: exact resume, only LoRA changes, bad configs refused."""
import pytest
import torch

from rftkit.grpo import GRPOConfig, train
from rftkit.lora import lora_parameters
from tests.conftest import digit_share, grpo_config, grpo_setup


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, tok_dir):
    model, tok, task = grpo_setup(tok_dir)
    base = {n: p.clone() for n, p in model.named_parameters()}
    train(grpo_config(tmp_path / "a", steps=4), model, tok, task, progress=False)
    full = [p.detach().clone() for p in lora_parameters(model)]
    for n, p in model.named_parameters():       # the base weights never move
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base.", ".")]), n

    m1, _, _ = grpo_setup(tok_dir)
    train(grpo_config(tmp_path / "b", steps=2), m1, tok, task, progress=False)      # "killed" after step 2
    m2, _, _ = grpo_setup(tok_dir)
    train(grpo_config(tmp_path / "b", steps=4, resume=True), m2, tok, task, progress=False)
    resumed = lora_parameters(m2)
    init_B_zero = [p for p in full if p.abs().sum() > 0]
    assert len(init_B_zero) == len(full)            # every LoRA tensor moved away from its B = 0 start
    moved = max(float((a - b).abs().max()) for a, b in zip(full, resumed))
    assert moved < 1e-5
    assert max(float(p.abs().max()) for p in full[1::2]) > 1e-2   # B matrices moved far beyond tolerance


def test_metrics_and_adapter_written(tmp_path, tok_dir):
    import json
    model, tok, task = grpo_setup(tok_dir)
    train(grpo_config(tmp_path, steps=2), model, tok, task, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "accuracy", "zero_std_frac", "completion_len", "clip_frac", "kl",
                "entropy", "tok_per_s", "samples"):
        assert key in rows[0], key
    for r in rows:                      # the step's timers: its parts add up to no more than the whole step
        parts = [r[k] for k in ("gen_s", "reward_s", "forward_s", "backward_s", "optim_s")]
        assert all(p >= 0 for p in parts) and r["gen_s"] > 0 and r["backward_s"] > 0
        assert sum(parts) <= r["step_s"] + 0.01
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "reward.png").is_file()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="training never ends"):
        GRPOConfig(steps=0, time_budget=0)
    with pytest.raises(ValueError, match="'ppo'"):
        GRPOConfig(loss_type="ppo")


def test_a_raising_reward_stops_the_run_and_keeps_its_progress(tmp_path, tok_dir):
    from rftkit.rewards import RewardError
    model, tok, task = grpo_setup(tok_dir)
    calls = {"n": 0}

    def flaky(completion, sample):
        calls["n"] += 1
        if calls["n"] > 2 * 8:                  # fails during step 3 (8 completions per step)
            raise ZeroDivisionError("bad sample")
        return digit_share(completion, sample)
    task.default_reward = flaky
    with pytest.raises(RewardError, match=r"reward 'task' raised ZeroDivisionError: bad sample on sample"):
        train(grpo_config(tmp_path, steps=5, checkpoint_every=100), model, tok, task, progress=False)
    assert (tmp_path / "checkpoints" / "step-0000002").is_dir()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    task.default_reward = digit_share
    m2, _, _ = grpo_setup(tok_dir)
    train(grpo_config(tmp_path, steps=3, resume=True), m2, tok, task, progress=False)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
