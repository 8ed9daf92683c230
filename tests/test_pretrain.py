"""rft pretrain on tiny settings: exact resume, equal active parameters and equal batches for dense and MoE,
a held-out split that shares no document with training, logged expert loads that add up, and held-out loss
far below uniform after a few steps."""
import json
import math

import pytest
import torch

from rftkit.cli import main
from rftkit.pretrain import (PretrainConfig, active_parameters, batch_at, corpus, expert_shares, generated_text,
                             model_config, train)
from rftkit.model import Transformer

TINY = dict(dim=32, n_layers=2, n_heads=2, ffn_dim=64, experts=4, top_k=2, seq_len=32, batch_size=4,
            eval_every=3, eval_tokens=256, generated_bytes=20_000, checkpoint_every=3, lr=1e-2, warmup_steps=2,
            threads=1)


@pytest.fixture(scope="module")
def data():
    return corpus(TINY["generated_bytes"])


def _cfg(tmp_path, steps, **kw):
    return PretrainConfig(output=str(tmp_path), tokens=steps * TINY["batch_size"] * TINY["seq_len"],
                          **(TINY | kw))


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, data):
    full = train(_cfg(tmp_path / "a", 6), "moe", data)
    train(_cfg(tmp_path / "b", 3), "moe", data)                       # "killed" after step 3
    resumed = train(_cfg(tmp_path / "b", 6, resume=True), "moe", data)
    assert resumed["eval_loss"] == full["eval_loss"]
    a = [json.loads(l) for l in (tmp_path / "a/moe/metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "b/moe/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["expert_load"] == rb["expert_load"]
    from safetensors.torch import load_file
    wa, wb = load_file(tmp_path / "a/moe/model/model.safetensors"), load_file(tmp_path / "b/moe/model/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dense_and_moe_have_equal_active_parameters_and_batches(tmp_path, data):
    cfg = _cfg(tmp_path, 2)
    dense, moe = Transformer(model_config(cfg, "dense")), Transformer(model_config(cfg, "moe"))
    d, m = active_parameters(dense), active_parameters(moe)
    assert m["active"] == d["active"] + cfg.n_layers * cfg.experts * cfg.dim          # + the routers only
    mlp = 3 * cfg.dim * cfg.ffn_dim
    assert m["total"] == d["total"] + cfg.n_layers * (cfg.experts // cfg.top_k * mlp - mlp + cfg.experts * cfg.dim)
    assert torch.equal(batch_at(data[0], 5, cfg), batch_at(data[0], 5, _cfg(tmp_path, 9)))   # (seed, step) only
    assert not torch.equal(batch_at(data[0], 5, cfg), batch_at(data[0], 5, _cfg(tmp_path, 2, seed=1)))
    with pytest.raises(ValueError, match="multiple of top_k"):
        PretrainConfig(ffn_dim=63, top_k=2)


def test_held_out_shares_no_document_with_training(data):
    from pydoc_data.topics import topics
    train_bytes, held = bytes(data[0].tolist()), bytes(data[1].tolist())
    names = sorted(topics)
    for i, name in enumerate(names):
        probe = topics[name][:300].encode()
        assert (probe in held) == (i % 10 == 5) and (probe in train_bytes) == (i % 10 != 5), name
    assert generated_text(5000, 7) == generated_text(5000, 7) != generated_text(5000, 8)


def test_logged_loads_add_up_and_the_model_learns(tmp_path, data):
    s = train(_cfg(tmp_path, 30, eval_every=30), "moe", data)
    rows = [json.loads(l) for l in (tmp_path / "moe/metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["moe_balance"] >= 0.99 * 0.01 * 2 and r["moe_z"] > 0      # each layer's Switch loss >= coef
        for counts in r["expert_load"].values():
            assert sum(counts) == 4 * 32 * 2                                 # B*T tokens, K assignments each
    shares = expert_shares(rows)
    tail = rows[-3:]
    by_hand = torch.tensor([r["expert_load"]["0"] for r in tail]).sum(0).float()
    assert torch.allclose(torch.tensor(shares["0"]), by_hand / by_hand.sum())
    assert s["min_expert_share_last10"]["0"] == min(shares["0"])
    assert s["eval_loss"] < 0.75 * math.log(256)           # far below uniform bytes after 30 tiny steps


def test_cli_trains_both_and_plots(tmp_path, capsys):
    args = ["pretrain", "--output", str(tmp_path), "--tokens", str(2 * 4 * 32)]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out loss dense - moe" in out
    assert (tmp_path / "loss.png").stat().st_size > 1000
    for arch in ("dense", "moe"):
        summary = json.loads((tmp_path / arch / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["tokens"] == 256
        assert (tmp_path / arch / "model" / "config.json").is_file()
