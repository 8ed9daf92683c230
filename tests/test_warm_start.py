"""--init-adapter: an RFT run started from an SFT adapter samples its first rollouts from the SFT model (equal to
rollouts of a model with the SFT adapter loaded by hand, unlike the base model's); a mismatched adapter names
the field that differs."""
import json

import pytest
import torch

from rftkit.grpo import GRPOConfig, rollout
from rftkit.grpo import train as grpo_train
from rftkit.loading import load
from rftkit.loading.weights import save_model_folder
from rftkit.lora import load_lora, lora_parameters
from rftkit.sft import SFTConfig
from rftkit.sft import train as sft_train
from tests.conftest import digit_share, tiny_model


@pytest.fixture
def setup(tmp_path, tok_dir):
    model = tiny_model(vocab_size=258, max_seq_len=512)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3)
    save_model_folder(model, tmp_path / "tiny", tokenizer_dir=tok_dir)
    rows = [{"prompt": f"What is {a} + {b}?", "completion": str(a + b), "answer": str(a + b)}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "tiny"), str(tmp_path / "d.jsonl")


def _first_rollouts(model, tok, task, cfg):
    from rftkit.engine import Engine
    engine = Engine(model, max_seq_len=512, max_batch=cfg.prompts_per_step * cfg.group_size)
    _, _, texts, _ = rollout(engine, tok, task, cfg, 0, {"task": digit_share}, {"task": 1.0}, {})
    return texts


def test_rft_starts_from_the_sft_adapter(tmp_path, setup):
    from rftkit.data import data_task
    folder, data = setup
    sft = sft_train(SFTConfig(data=data, model=folder, output=str(tmp_path / "sft"), steps=30, batch_size=4,
                              micro_batch=4, lr=3e-2, warmup_steps=2, lora_r=4, lora_alpha=8, device="cpu"),
                    progress=False)
    task, _ = data_task(data)
    task.default_reward = digit_share
    cfg = GRPOConfig(model=folder, data=data, init_adapter=sft["output"], output=str(tmp_path / "rft"), steps=1,
                     prompts_per_step=2, group_size=3, max_tokens=6, lora_r=4, lora_alpha=8, log_samples=6)
    rows = []
    model, tok = load(folder)
    grpo_train(cfg, model, tok, task, progress=False, on_step=lambda step, row: rows.append(row))
    got = [s["completion"] for s in rows[0]["samples"]]

    with_sft, _ = load(folder)
    load_lora(with_sft, sft["output"])
    assert got == _first_rollouts(with_sft, tok, task, cfg)            # the SFT model's samples, token for token
    base, _ = load(folder)
    assert got != _first_rollouts(base, tok, task, cfg)                # (which the base model does not give)
    assert any(str(a + b) in t for t in got for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)])   # SFT taught the sums


def test_a_mismatched_adapter_names_the_field(tmp_path, setup):
    folder, data = setup
    model, tok = load(folder)
    from rftkit.lora import LoRAConfig, apply_lora, save_lora
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    save_lora(model, tmp_path / "ad")
    kw = dict(model=folder, data=data, init_adapter=str(tmp_path / "ad"), steps=1, prompts_per_step=2, group_size=2,
              max_tokens=4)
    cases = [({"lora_r": 8, "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj"]}, r"lora_r differs: the adapter "
              r"has rank \[4\], this run --lora-r 8; pass --lora-r 4"),
             ({"lora_r": 4, "lora_alpha": 16, "lora_targets": ["q_proj", "v_proj"]}, r"lora_alpha differs: the "
              r"adapter has alpha \[8.0\], this run --lora-alpha 16; pass --lora-alpha 8"),
             ({"lora_r": 4, "lora_alpha": 8}, r"lora_targets differ: the adapter adapts \['q_proj', 'v_proj'\], "
              r"this run's --lora-targets all-linear adapt \['down_proj', .*pass --lora-targets q_proj,v_proj")]
    for i, (lora, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            grpo_train(GRPOConfig(output=str(tmp_path / f"r{i}"), **kw, **lora), progress=False)
    with pytest.raises(ValueError, match=r"lora_r differs"):
        sft_train(SFTConfig(data=data, model=folder, init_adapter=str(tmp_path / "ad"), lora_r=8,
                            output=str(tmp_path / "s"), steps=1), progress=False)
    with pytest.raises(ValueError, match=r"does not apply with --full"):
        sft_train(SFTConfig(data=data, model=folder, init_adapter=str(tmp_path / "ad"), full=True,
                            output=str(tmp_path / "s2"), steps=1), progress=False)
    m, _ = load(folder)                      # a matching run starts from the adapter's weights exactly
    grpo_train(GRPOConfig(output=str(tmp_path / "ok"), **{**kw, "steps": 1}, lora_r=4, lora_alpha=8,
                          lora_targets=["q_proj", "v_proj"], lr=0.0, warmup_steps=0), m, tok, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(m), lora_parameters(model)))
