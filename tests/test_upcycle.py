"""rft upcycle: the written MoE folder computes the dense model's logits (ours and transformers' Mixtral), and
bad settings are refused before anything is written."""
import pytest
import torch

from rftkit.cli import main
from rftkit.loading import load_model
from rftkit.loading.weights import save_model_folder
from rftkit.moe import moe_modules
from rftkit.upcycle import UpcycleConfig, parameter_counts, run_upcycle
from tests.conftest import tiny_model


@pytest.fixture
def dense_dir(tmp_path):
    model = tiny_model(seed=1, tie_embeddings=False)
    save_model_folder(model, tmp_path / "dense")
    return tmp_path / "dense"


def _ids(vocab=97, n=13, seed=4):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def test_upcycled_folder_equals_dense_in_ours_and_transformers(dense_dir, tmp_path):
    import transformers
    out = run_upcycle(UpcycleConfig(out=str(tmp_path / "moe"), model=str(dense_dir), experts=4, top_k=2))
    dense, moe = load_model(str(dense_dir)), load_model(str(out))
    assert moe.cfg.model_type == "mixtral" and moe.cfg.moe["n_experts"] == 4 and len(moe_modules(moe)) == 2
    ids = _ids()
    with torch.no_grad():
        expected = dense(ids)[0]
        assert (moe(ids)[0] - expected).abs().max() < 1e-4
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(hf).__name__ == "MixtralForCausalLM"
        assert (hf(ids).logits - expected).abs().max() < 1e-4
    gu = moe.model.layers[0].mlp.experts.gate_up_proj                          # [E, 2F, D]
    W = torch.cat([dense.model.layers[0].mlp.gate_proj.weight, dense.model.layers[0].mlp.up_proj.weight])
    assert all(torch.equal(gu[e], W) for e in range(4))
    router = moe.model.layers[0].mlp.gate.weight
    assert 0.01 < float(router.detach().std()) < 0.03                                   # router_std 0.02, random
    # the router matters: different routings of identical experts give the same output, and top-2 of 4 differ
    with torch.no_grad():
        x = torch.randn(50, 32)
        assert len({tuple(r) for r in (x @ router.T).topk(2).indices.sort(-1).values.tolist()}) > 1
    n = parameter_counts(moe)
    per_expert = 3 * 32 * 64
    assert n["total"] == dense.parameter_count() + 2 * (3 * per_expert + 4 * 32)
    assert n["active"] == n["total"] - 2 * 2 * per_expert


def test_rftkit_moe_with_dense_layers_and_the_cli(dense_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["upcycle", "--out", str(out), "--model", str(dense_dir), "--experts", "3", "--top-k", "2",
                 "--model-type", "rftkit_moe", "--moe-layers", "1", "--z-coef", "0.001"]) == 0
    assert "max logit difference" in capsys.readouterr().out
    moe = load_model(str(out))
    assert list(moe_modules(moe)) == [1] and moe.cfg.moe["z_coef"] == 0.001
    with torch.no_grad():
        assert (moe(_ids())[0] - load_model(str(dense_dir))(_ids())[0]).abs().max() < 1e-4
    # an existing folder is kept unless --overwrite
    assert main(["upcycle", "--out", str(out), "--model", str(dense_dir), "--experts", "3"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["upcycle", "--out", str(out), "--model", str(dense_dir), "--experts", "3", "--overwrite"]) == 0
    assert load_model(str(out)).cfg.moe["n_experts"] == 3


def test_bad_settings_are_refused(dense_dir, tmp_path):
    with pytest.raises(ValueError, match="top_k must be in"):
        UpcycleConfig(out="x", experts=2, top_k=3)
    with pytest.raises(ValueError, match="experts must be >= 2"):
        UpcycleConfig(out="x", experts=1, top_k=1)
    with pytest.raises(ValueError, match="no router z-loss and no dense layers"):
        run_upcycle(UpcycleConfig(out=str(tmp_path / "m"), model=str(dense_dir), moe_layers=[0]))
    with pytest.raises(ValueError, match="--out is required"):
        run_upcycle(UpcycleConfig(model=str(dense_dir)))
    moe = load_model(str(run_upcycle(UpcycleConfig(out=str(tmp_path / "m"), model=str(dense_dir), experts=2))))
    from rftkit.upcycle import upcycle_dense
    with pytest.raises(ValueError, match="needs a dense model"):
        upcycle_dense(moe, 2, 1)
    assert not (tmp_path / "m2").exists()


@pytest.mark.slow
def test_upcycled_smollm2_gives_the_dense_logits(tmp_path):
    from rftkit.loading import load
    dense, tok = load(None)
    out = run_upcycle(UpcycleConfig(out=str(tmp_path / "smol-moe"), experts=4, top_k=2))
    moe = load_model(str(out))
    assert moe.cfg.moe["n_experts"] == 4 and len(moe_modules(moe)) == dense.cfg.n_layers
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is 12 + 34? Answer with the number."}])])
    with torch.no_grad():
        want = dense(ids)[0]
        diff = float((moe(ids)[0] - want).abs().max())
    # fp32 rounding only: the experts are copies and their gate weights sum to one up to rounding; measured on
    # logits up to 38, 6.6e-5 (8-lane GEMV) and 1.3e-4 (16-lane, AVX-512) at 45 tokens, where a wrongly
    # weighted or wrongly routed expert moves them by whole units
    assert diff < 1e-5 * float(want.abs().max()), diff
    assert (out / "tokenizer.json").is_file()
