"""LoRA on our model, checked against the formula y = W x + s·B·A·dropout(x) computed by hand."""
import math

import pytest
import torch

from rftkit.lora import (LoRAConfig, LoRALinear, apply_lora, lora_disabled, lora_modules, lora_parameters, lora_state,
                         merge_lora, unmerge_lora)
from tests.conftest import tiny_model

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))


def _randomise(model, std=0.3):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, std)


def test_init_is_the_base_model_and_only_lora_trains():
    model = tiny_model()
    with torch.no_grad():
        base, _ = model(IDS)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        assert torch.equal(model(IDS)[0], base)                      # B = 0 at init
    mods = lora_modules(model)
    assert len(mods) == 2 * 7 and "lm_head" not in mods              # all-linear: 7 per layer, no lm_head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{x}" for m in mods for x in "AB"}
    for m in mods.values():
        bound = 1 / math.sqrt(m.in_features)                         # kaiming_uniform(a=sqrt(5)), PEFT's init
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.8 * bound
        assert not m.lora_B.any() and m.scaling == 2.0
    named = apply_lora(tiny_model(), LoRAConfig(r=2, targets="q_proj,v_proj"))
    assert sorted(lora_modules(named)) == [f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]
    assert apply_lora(tiny_model(), LoRAConfig(r=4, rslora=True)).model.layers[0].mlp.up_proj.scaling == 32 / 2


def test_forward_is_the_formula_with_dropout():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    m = LoRALinear(base, r=3, scaling=1.5, dropout=0.25).train()
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(4, 5, 12)
    torch.manual_seed(7)
    got = m(x)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, 0.25, training=True)
    expected = x @ base.weight.T + base.bias + 1.5 * (dropped @ m.lora_A.T @ m.lora_B.T)
    assert torch.allclose(got, expected, atol=1e-6)
    m.eval()
    assert torch.allclose(m(x), x @ base.weight.T + base.bias + 1.5 * (x @ m.lora_A.T @ m.lora_B.T), atol=1e-6)


def test_training_gradients_are_the_formulas_through_the_in_place_add():
    """The adapter's product is added into the base output's memory (one GEMM call): the values and the
    gradients of x, A and B are the formula's, for a frozen base and for a base that trains too."""
    torch.manual_seed(1)
    for frozen in (True, False):
        base = torch.nn.Linear(12, 10).requires_grad_(not frozen)
        m = LoRALinear(base, r=3, scaling=1.5).train()
        with torch.no_grad():
            m.lora_B.normal_()
        x = torch.randn(4, 5, 12, requires_grad=True)
        x2, A, B = (t.detach().clone().requires_grad_() for t in (x, m.lora_A, m.lora_B))
        got = m(x)
        want = x2 @ base.weight.T + base.bias + 1.5 * (x2 @ A.T @ B.T)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        dy = torch.randn(4, 5, 10)
        got.backward(dy)
        want.backward(dy)
        for a, b in ((x.grad, x2.grad), (m.lora_A.grad, A.grad), (m.lora_B.grad, B.grad)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if not frozen:
            assert base.weight.grad is not None


def test_merge_unmerge_and_disable():
    model = tiny_model()
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        base, _ = model(IDS)
    apply_lora(model, LoRAConfig(r=3, alpha=6, targets=["q_proj", "down_proj"]))
    _randomise(model)
    m = model.model.layers[0].self_attn.q_proj
    expected_w = W + (6 / 3) * m.lora_B.detach() @ m.lora_A.detach()
    with torch.no_grad():
        unmerged, _ = model(IDS)
        assert (unmerged - base).abs().max() > 1e-2
        with lora_disabled(model):
            assert torch.equal(model(IDS)[0], base)
        merge_lora(model, unwrap=False)
        assert torch.allclose(m.base.weight, expected_w, atol=1e-6)
        assert (model(IDS)[0] - unmerged).abs().max() < 1e-5
        with pytest.raises(ValueError, match="unmerge_lora"):
            with lora_disabled(model):
                pass
        unmerge_lora(model)
        assert (m.base.weight - W).abs().max() < 1e-6
        assert (model(IDS)[0] - unmerged).abs().max() < 1e-5
        state = {k: (a.clone(), b.clone()) for k, (a, b) in lora_state(model).items()}
        merge_lora(model)                                             # unwrap: plain nn.Linear again
    assert not lora_modules(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, expected_w, atol=1e-6)
    assert torch.equal(state["model.layers.0.self_attn.q_proj"][1], m.lora_B)
    with torch.no_grad():
        assert (model(IDS)[0] - unmerged).abs().max() < 1e-5


def test_config_refusals():
    with pytest.raises(ValueError, match="unknown LoRA target modules"):
        LoRAConfig(targets=["qproj"])
    with pytest.raises(ValueError, match="r=0"):
        LoRAConfig(r=0)
    model = apply_lora(tiny_model(), LoRAConfig(r=2, targets=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(r=2, targets=["q_proj"]))
