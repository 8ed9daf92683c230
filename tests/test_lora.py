"""LoRA and PEFT-format adapters: interop with PEFT on transformers, both directions, and refusals."""
import json

import pytest
import torch
import transformers

from rftkit.adapters import read_adapter, safe_adapter_path
from rftkit.loading import load_model
from rftkit.lora import LoRAConfig, apply_lora, load_lora, lora_disabled, lora_parameters, merge_lora, save_lora


def _pair(tmp_path):
    """The same random Llama as a transformers model and as ours."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ref.save_pretrained(tmp_path / "base", safe_serialization=True)
    return ref, load_model(str(tmp_path / "base"))


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _randomise(model):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.3)


def test_our_adapter_loads_in_peft_with_same_logits(tmp_path):
    import peft
    ref, ours = _pair(tmp_path)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    _randomise(ours)
    save_lora(ours, tmp_path / "ad")
    peft_model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        expected = peft_model(IDS).logits
        got, _ = ours(IDS)
        assert (got - expected).abs().max() < 1e-4
        with lora_disabled(ours), peft_model.disable_adapter():     # adapter off = the base model
            assert (ours(IDS)[0] - peft_model(IDS).logits).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["rslora", "rank_pattern"])
def test_peft_adapter_loads_into_ours_with_same_logits(tmp_path, kind):
    import peft
    ref, ours = _pair(tmp_path)
    extra = {"use_rslora": True} if kind == "rslora" else {
        "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6}, "alpha_pattern": {"v_proj": 3.0}}
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra)
    pm = peft.get_peft_model(ref, pcfg).eval()
    pm.save_pretrained(str(tmp_path / "ad"))
    load_lora(ours, tmp_path / "ad")
    with torch.no_grad():
        assert (ours(IDS)[0] - pm(IDS).logits).abs().max() < 1e-4


def test_merge_equals_unmerged_and_reference_formula(tmp_path):
    _, ours = _pair(tmp_path)
    W = ours.model.layers[0].self_attn.q_proj.weight.detach().clone()
    apply_lora(ours, LoRAConfig(r=3, alpha=6, targets=["q_proj"]))
    _randomise(ours)
    m = ours.model.layers[0].self_attn.q_proj
    expected_w = W + (6 / 3) * m.lora_B.detach() @ m.lora_A.detach()
    with torch.no_grad():
        unmerged, _ = ours(IDS)
        merge_lora(ours)
        merged, _ = ours(IDS)
    assert torch.allclose(ours.model.layers[0].self_attn.q_proj.weight, expected_w, atol=1e-6)
    assert (unmerged - merged).abs().max() < 1e-5


def test_refusals_name_the_problem(tmp_path):
    _, ours = _pair(tmp_path)
    apply_lora(ours, LoRAConfig(r=2, targets=["q_proj"]))
    save_lora(ours, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    for field, value, message in [("use_dora", True, "use_dora=True"),
                                  ("modules_to_save", ["lm_head"], "modules_to_save"),
                                  ("some_future_option", 3, "unknown adapter field some_future_option=3")]:
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ValueError, match=message):
            read_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    _, other = _pair(tmp_path / "o")
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(16, 32, bias=False)   # a model it does not fit
    with pytest.raises(ValueError, match=r"ad: module model.layers.0.self_attn.q_proj is 32x16 in the model"):
        load_lora(other, tmp_path / "ad")
    with pytest.raises(ValueError, match="unknown LoRA target modules"):
        LoRAConfig(targets=["qproj"])


def test_adapter_names_cannot_escape_root(tmp_path):
    assert safe_adapter_path(tmp_path, "math-v2") == (tmp_path / "math-v2").resolve()
    for bad in ["../x", "/etc/passwd", "a/b", "..", "", ".hidden", "a\\b"]:
        with pytest.raises(ValueError, match="invalid adapter name"):
            safe_adapter_path(tmp_path, bad)
