"""Pruning, factorization, weight sharing and distillation do their jobs (tiny models, against references)."""
import pytest
import torch
import torch.nn as nn

from rftkit.compress.folder import load_compressed, save_compressed
from rftkit.compress.transforms import compress
from rftkit.compress.distill import distill, drop_layers, kd_loss
from rftkit.compress.factorize import LowRankLinear, SharedLinear, kmeans_1d, low_rank, uniform_levels, weight_share
from rftkit.compress.prune import prune_mask, prune_structured, prune_unstructured
from tests.conftest import tiny_model

torch.set_num_threads(1)
KW = dict(vocab_size=97, dim=64, head_dim=16, ffn_dim=128)


def _ids(seed, rows=8, T=32):
    return torch.randint(0, 97, (rows, T), generator=torch.Generator().manual_seed(seed))


def _mse(model, ref_logits, ids):
    with torch.no_grad():
        return float((model(ids)[0] - ref_logits).pow(2).mean())


def _outlier_model():
    """A few residual channels scaled up in every norm: the inputs of q/k/v/gate/up carry outlier channels,
    as LLM activations do."""
    m = tiny_model(**KW)
    with torch.no_grad():
        for b in m.model.layers:
            for n in (b.input_layernorm, b.post_attention_layernorm):
                n.weight[[3, 17, 40]] = 25.0
    return m


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_beats_magnitude_on_outlier_channels(pattern):
    ref, calib, ids = _outlier_model(), _ids(1), _ids(2)
    with torch.no_grad():
        dense = ref(ids)[0]
    errs = {}
    for method in ("magnitude", "wanda"):
        m = _outlier_model()
        rec = prune_unstructured(m, method, 0.5, pattern, calib)
        assert rec["sparsity"] == pytest.approx(0.5, abs=1e-3)
        for path, lin in m.named_modules():
            if type(lin) is nn.Linear and path != "lm_head":
                w = lin.weight
                if pattern == "2:4":                  # exactly 2 non-zeros in every 4 consecutive inputs
                    assert torch.all((w.view(w.shape[0], -1, 4) != 0).sum(-1) == 2)
                else:                                 # half of every output row
                    assert torch.all((w == 0).sum(1) == w.shape[1] // 2)
        errs[method] = _mse(m, dense, ids)
    assert errs["wanda"] < 0.7 * errs["magnitude"], errs


def test_wanda_keeps_the_weights_of_loud_inputs():
    # one row, inputs 0..7: input 0 is 100x louder; its weight is the smallest but it matters most
    w = torch.tensor([[0.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    norms = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 1])
    assert not prune_mask(w.abs(), 0.5, None)[0, 0]                       # magnitude drops it
    assert prune_mask(w.abs() * norms, 0.5, None)[0, 0]                   # wanda keeps it
    assert prune_mask(w.abs() * norms, 0.5, None).sum() == 4


def _hetero_model():
    """Units of unequal importance, as in trained networks: each neuron's / head's output weights scaled by
    a log-normal factor."""
    m = tiny_model(**KW)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in m.model.layers:
            b.mlp.down_proj.weight.mul_(torch.randn(128, generator=g).exp()[None])
            b.self_attn.o_proj.weight.mul_(torch.randn(4, generator=g).exp().repeat_interleave(16)[None])
    return m


def test_structured_activation_ranking_beats_random():
    base, calib, ids = _hetero_model(), _ids(2), _ids(3)
    with torch.no_grad():
        dense = base(ids)[0]
    m, rec = prune_structured(base, 0.5, calib)
    act = _mse(m, dense, ids)
    rand = [_mse(prune_structured(base, 0.5, calib, rank="random", seed=s)[0], dense, ids) for s in range(5)]
    assert act < 0.5 * min(rand), (act, rand)
    assert (m.cfg.ffn_dim, m.cfg.n_heads, m.cfg.n_kv_heads) == (64, 2, 2)
    assert rec["params"][1] == m.parameter_count() < base.parameter_count()


def test_structured_equals_original_with_removed_units_zeroed():
    base, calib, ids = tiny_model(**KW), _ids(2), _ids(4)
    m, rec = prune_structured(base, 0.25, calib, head_ratio=0.5)
    assert m.cfg.ffn_dim == 96 and m.cfg.n_heads == 2 and m.cfg.n_kv_heads == 2      # one head per GQA group
    ref = tiny_model(**KW)
    with torch.no_grad():                   # zero the output weights of every removed neuron / head
        for i, b in enumerate(ref.model.layers):
            gone = sorted(set(range(128)) - set(rec["kept_neurons"][i]))
            b.mlp.down_proj.weight[:, gone] = 0
            for h in sorted(set(range(4)) - set(rec["kept_heads"][i])):
                b.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
            assert all(h // 2 == g for g, h in enumerate(rec["kept_heads"][i]))       # one from each group
        torch.testing.assert_close(m(ids)[0], ref(ids)[0], rtol=1e-4, atol=1e-5)


def test_svd_error_is_sqrt_of_lost_energy():
    model = tiny_model(**KW)
    with torch.no_grad():                   # a decaying spectrum, so that a rank below full keeps the energy
        for p, lin in model.named_modules():
            if type(lin) is nn.Linear and p != "lm_head":
                u, s, vh = torch.linalg.svd(lin.weight, full_matrices=False)
                lin.weight.copy_(u @ torch.diag(s * 0.7 ** torch.arange(len(s))) @ vh)
    orig = {p: m.weight.detach().clone() for p, m in model.named_modules() if type(m) is nn.Linear}
    rec = low_rank(model, energy=0.95)
    assert any(r["kind"] == "lowrank" for r in rec.values())
    for path, r in rec.items():
        if r["kind"] != "lowrank":
            continue
        w, m = orig[path], model.get_submodule(path)
        assert isinstance(m, LowRankLinear)
        s2 = torch.linalg.svdvals(w.double()).pow(2)
        kept = float(s2[:r["rank"]].sum() / s2.sum())
        assert kept >= 0.95 > float(s2[:r["rank"] - 1].sum() / s2.sum())             # smallest such rank
        rel = float((m.weight.double() - w.double()).norm() / w.double().norm())
        assert rel == pytest.approx((1 - kept) ** 0.5, rel=1e-4)
        assert r["rank"] * (m.in_features + m.out_features) < m.in_features * m.out_features
        x = torch.randn(3, m.in_features)
        torch.testing.assert_close(m(x), x @ m.weight.T, rtol=1e-4, atol=1e-5)


def test_kmeans_16_beats_uniform_4bit():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[0, :4] = 0.2                                          # a few large weights stretch the uniform range
    lin = nn.Linear(256, 128, bias=False)
    lin.weight.data.copy_(w)
    shared = SharedLinear.from_linear(lin, 16)
    assert len(torch.unique(shared.weight)) <= 16 and shared.codes.shape == (128, 128)    # 4-bit codes
    err_k = float((shared.weight - w).pow(2).mean())
    err_u = float((uniform_levels(w, 16) - w).pow(2).mean())
    assert err_k < 0.5 * err_u, (err_k, err_u)
    c, codes = kmeans_1d(w.reshape(-1), 16)
    assert torch.all((c[codes] - w.reshape(-1)).abs() <= (c[None] - w.reshape(-1, 1)).abs().min(1).values + 1e-7)


def test_kd_loss_is_kl_and_distillation_moves_student_towards_teacher():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1),
                                     log_target=True, reduction="sum") / 10 * 4
    torch.testing.assert_close(kd_loss(s, t, temperature=2.0), ref)
    teacher = tiny_model(**KW)
    student, _ = prune_structured(teacher, 0.5, _ids(1))
    held = _ids(9)

    def gap():
        with torch.no_grad():
            return float(kd_loss(student(held)[0], teacher(held)[0]))
    before = gap()
    log = distill(student, teacher, _ids(5, rows=16), steps=30, lr=3e-3, batch=4)
    assert gap() < 0.7 * before and log["loss_last"] < log["loss_first"]
    assert not any(p.requires_grad for p in student.parameters())
    shallow = drop_layers(teacher, [0])
    assert shallow.cfg.n_layers == 1 and len(shallow.model.layers) == 1


METHODS = [("magnitude", {}), ("wanda", {"pattern": "2:4"}), ("structured", {"ratio": 0.5}),
           ("svd", {"rank": 8}), ("kmeans", {"clusters": 16}), ("distill", {"ratio": 0.5, "distill_steps": 3})]


@pytest.mark.parametrize("method,kw", METHODS)
def test_saved_size_shrinks_as_promised_and_reload_is_identical(method, kw, tmp_path):
    model, calib, ids = tiny_model(**KW), _ids(1), _ids(2, rows=2, T=12)
    full = tiny_model(**KW)
    save_compressed(full, {"modules": {}}, tmp_path / "fp32")
    model, rec = compress(model, method, calib=calib, **kw)
    save_compressed(model, rec, tmp_path / "m")
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    lins = {p: m for p, m in full.named_modules() if type(m) is nn.Linear and p != "lm_head"}
    nk = sum(m.in_features * m.out_features for m in lins.values())
    rest = 4 * (full.parameter_count() - nk)                  # embedding + norms, fp32
    expect = {"magnitude": rest + nk * (0.5 * 4 + 1 / 8),  # non-zero values + 1-bit mask
              "wanda": rest + nk * (0.5 * 4 + 1 / 8),
              "structured": 4 * model.parameter_count(), "distill": 4 * model.parameter_count(),
              "svd": rest + 4 * sum(8 * (m.in_features + m.out_features) for m in lins.values()),
              "kmeans": rest + nk * 0.5 + 4 * 16 * len(lins)}[method]
    assert expect <= size < expect + 8192                     # + the safetensors header
    assert size < 0.8 * (tmp_path / "fp32" / "model.safetensors").stat().st_size
    back = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(ids)[0], model(ids)[0])


def test_bad_settings_fail_before_work():
    model = tiny_model(**KW)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method, kw, match in [("svd", {"rank": 33}, "rank 33"), ("structured", {"ratio": 1.0}, "ratio .* 1.0"),
                              ("magnitude", {"sparsity": -0.1}, "sparsity .* -0.1"),
                              ("kmeans", {"clusters": 300}, "clusters .* 300"),
                              ("int4", {"group_size": 48}, "48")]:
        with pytest.raises(ValueError, match=match):
            compress(model, method, calib=_ids(1), **kw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)         # nothing was touched
    with pytest.raises(ValueError, match="rank 100"):
        low_rank(tiny_model(**KW), rank=100)
    with pytest.raises(ValueError, match="4:2"):
        prune_unstructured(tiny_model(**KW), "magnitude", 0.5, "4:2")
    with pytest.raises(ValueError, match="calibration"):
        prune_unstructured(tiny_model(**KW), "wanda", 0.5)
    with pytest.raises(ValueError, match="quantiz"):
        compress(compress(tiny_model(**KW), "int8")[0], "structured", calib=_ids(1))
