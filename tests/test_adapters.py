"""PEFT-format adapter files: interop with PEFT on transformers in both directions, PEFT's pattern rules,
and refusals that name the file, the module and the value."""
import json

import pytest
import torch
import transformers

from rftkit.peft_format import AdapterConfig, read_adapter, safe_adapter_path, validate_adapter, write_adapter
from rftkit.loading import load_model
from rftkit.lora import LoRAConfig, apply_lora, load_lora, lora_disabled, lora_parameters, save_lora

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _pair(tmp_path):
    """The same random Llama as a transformers model and as ours (loaded from the folder transformers saved)."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ref.save_pretrained(tmp_path / "base", safe_serialization=True)
    return ref, load_model(str(tmp_path / "base"))


def _randomise(model):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.3)


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft_with_same_logits(tmp_path, rslora):
    import peft
    ref, ours = _pair(tmp_path)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, rslora=rslora, targets=["q_proj", "v_proj", "down_proj"]))
    _randomise(ours)
    save_lora(ours, tmp_path / "ad")
    peft_model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        expected = peft_model(IDS).logits
        got, _ = ours(IDS)
        assert (got - expected).abs().max() < 1e-4
        with lora_disabled(ours), peft_model.disable_adapter():     # adapter off = the base model
            base = peft_model(IDS).logits
            assert (ours(IDS)[0] - base).abs().max() < 1e-5
        assert (got - base).abs().max() > 1e-2                      # and the adapter matters


@pytest.mark.parametrize("kind", ["plain", "rslora", "rank_pattern"])
def test_peft_adapter_loads_into_ours_with_same_logits(tmp_path, kind):
    import peft
    ref, ours = _pair(tmp_path)
    extra = {"plain": {}, "rslora": {"use_rslora": True}, "rank_pattern": {
        "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6}, "alpha_pattern": {"v_proj": 3.0}}}[kind]
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra)
    pm = peft.get_peft_model(ref, pcfg).eval()
    pm.save_pretrained(str(tmp_path / "ad"))
    adapter = load_lora(ours, tmp_path / "ad")
    with torch.no_grad():
        assert (ours(IDS)[0] - pm(IDS).logits).abs().max() < 1e-4
    # our scaling rule equals the one PEFT applied, module by module
    for name, module in pm.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            path = name.removeprefix("base_model.model.")
            assert adapter.rank(path) == module.r["default"]
            assert adapter.scaling(path) == pytest.approx(module.scaling["default"], rel=1e-12)
    # and saving it again keeps its ranks and scales: PEFT reads back the same model
    save_lora(ours, tmp_path / "again")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    again = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "again")).eval()
    with torch.no_grad():
        assert (again(IDS).logits - pm(IDS).logits).abs().max() < 1e-4


def test_write_read_round_trip_and_peft_key_names(tmp_path):
    cfg = AdapterConfig(r=2, lora_alpha=4, target_modules=["q_proj"], rank_pattern={"k_proj": 3})
    w = {"model.layers.0.self_attn.q_proj": (torch.randn(2, 32), torch.randn(32, 2)),
         "model.layers.0.self_attn.k_proj": (torch.randn(3, 32), torch.randn(16, 3))}
    write_adapter(tmp_path, cfg, w)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(f"base_model.model.{m}.lora_{x}.weight" for m in w for x in "AB")
    cfg2, w2 = read_adapter(tmp_path)
    assert cfg2.rank_pattern == {"k_proj": 3} and cfg2.rank("model.layers.0.self_attn.k_proj") == 3
    for m, (A, B) in w.items():
        assert torch.equal(w2[m][0], A) and torch.equal(w2[m][1], B)
    assert not list(tmp_path.glob("*.tmp"))


def test_pattern_rule_is_peft_suffix_match():
    from peft.utils.other import get_pattern_key
    cfg = AdapterConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6, "^mlp.up": 5})
    for path in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj",
                 "model.layers.0.self_attn.xq_proj", "model.layers.0.mlp.up_proj"]:
        key = get_pattern_key(cfg.rank_pattern.keys(), path)
        assert cfg.rank(path) == cfg.rank_pattern.get(key, cfg.r), path
    assert AdapterConfig(r=4, lora_alpha=8, use_rslora=True).scaling("x") == 4.0


def test_refusals_name_the_problem(tmp_path):
    _, ours = _pair(tmp_path)
    apply_lora(ours, LoRAConfig(r=2, targets=["q_proj"]))
    save_lora(ours, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    for field, value, message in [("use_dora", True, "use_dora=True"),
                                  ("modules_to_save", ["lm_head"], "modules_to_save"),
                                  ("bias", "all", "bias='all'"),
                                  ("layers_to_transform", [0], "layers_to_transform"),
                                  ("peft_type", "IA3", "not LORA"),
                                  ("some_future_option", 3, "unknown adapter field 'some_future_option'$")]:
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ValueError, match=message):
            read_adapter(tmp_path / "ad")
    harmless = {**cfg, "init_lora_weights": "gaussian", "lora_dropout": 0.1, "exclude_modules": ["k_proj"]}
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(harmless))
    read_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    _, other = _pair(tmp_path / "o")
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(16, 32, bias=False)   # a model it does not fit
    with pytest.raises(ValueError, match=r"ad: module model.layers.0.self_attn.q_proj is 32x16 in the model"):
        load_lora(other, tmp_path / "ad")
    adapter, weights = read_adapter(tmp_path / "ad")
    with pytest.raises(ValueError, match="module model.layers.0.self_attn.q_proj has lora_A .* not rank 3"):
        validate_adapter(AdapterConfig(r=3), weights, other, "ad")
    with pytest.raises(ValueError, match="not a linear layer"):
        validate_adapter(adapter, {"model.norm": weights["model.layers.0.self_attn.q_proj"]}, other, "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").rename(tmp_path / "ad" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        read_adapter(tmp_path / "ad")


def test_adapter_names_cannot_escape_root(tmp_path):
    assert safe_adapter_path(tmp_path, "math-v2") == (tmp_path / "math-v2").resolve()
    for bad in ["../x", "/etc/passwd", "a/b", "..", "", ".hidden", "a\\b", "x/../../y", "a..b"]:
        with pytest.raises(ValueError, match="invalid adapter name"):
            safe_adapter_path(tmp_path, bad)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exported_merged_folder_gives_peft_logits_in_transformers(tmp_path, arch, tok_dir):
    """rft export: base + our adapter, merged, loads in plain transformers with the logits of base + adapter in
    PEFT; the tokenizer comes along."""
    import peft
    from rftkit.cli import main
    torch.manual_seed(0)
    extra = {"tie_word_embeddings": True} if arch == "qwen2" else {"tie_word_embeddings": False}
    cfg = transformers.AutoConfig.for_model(arch, vocab_size=258, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            **extra)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ref.save_pretrained(tmp_path / "base")
    for f in tok_dir.iterdir():
        if f.is_file():
            (tmp_path / "base" / f.name).write_bytes(f.read_bytes())
    ours = load_model(str(tmp_path / "base"))
    apply_lora(ours, LoRAConfig(r=4, alpha=8))
    _randomise(ours)
    save_lora(ours, tmp_path / "ad", base=str(tmp_path / "base"))
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]) == 0
    ids = torch.randint(0, 258, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = ref(ids).logits
        expected = peft.PeftModel.from_pretrained(ref, str(tmp_path / "ad")).eval()(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert type(merged) is type(ref)                                         # a plain model, no PEFT
        assert (merged(ids).logits - expected).abs().max() < 1e-4
        assert (base - expected).abs().max() > 1e-2                              # and the adapter is in it
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok("héllo")["input_ids"] == transformers.AutoTokenizer.from_pretrained(tok_dir)("héllo")["input_ids"]
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]) == 2  # exists


def test_every_config_field_is_type_checked_and_weights_are_2d_finite(tmp_path):
    """What would otherwise fail later, inside a batch (a string alpha in scaling(), a dict of targets in
    to_peft(), a bad regex at every load), or load a different model (NaN weights), is refused at read time,
    naming the field; an unknown field is named without its value (it may hold anything)."""
    from safetensors.torch import load_file, save_file
    _, ours = _pair(tmp_path)
    apply_lora(ours, LoRAConfig(r=2, targets=["q_proj"]))
    save_lora(ours, tmp_path / "ad")
    cfg_path, w_path = tmp_path / "ad" / "adapter_config.json", tmp_path / "ad" / "adapter_model.safetensors"
    cfg, weights = json.loads(cfg_path.read_text()), load_file(str(w_path))
    for edit, message in [(lambda c: [c], "must be a JSON object, got list"),
                          (lambda c: {**c, "lora_alpha": "16"}, "lora_alpha must be a finite number, got '16'"),
                          (lambda c: {**c, "lora_alpha": 1e300}, "lora_alpha must be a finite number"),
                          (lambda c: {**c, "r": 2.0}, "r must be a positive integer"),
                          (lambda c: {**c, "r": True}, "r must be a positive integer"),
                          (lambda c: {**c, "target_modules": 5}, "target_modules must be a string"),
                          (lambda c: {**c, "target_modules": [1]}, "target_modules must be a string"),
                          (lambda c: {**c, "use_rslora": "false"}, "use_rslora must be true or false"),
                          (lambda c: {**c, "rank_pattern": [1]}, "rank_pattern must be an object"),
                          (lambda c: {**c, "rank_pattern": {"q": 0}}, "rank_pattern\\['q'\\] must be a positive"),
                          (lambda c: {**c, "alpha_pattern": {"q": "2"}}, "alpha_pattern\\['q'\\] must be"),
                          (lambda c: {**c, "alpha_pattern": {"[q": 2}}, "is not a valid regex"),
                          (lambda c: {**c, "target_parameters": "x"}, "target_parameters must be a list"),
                          (lambda c: {**c, "base_model_name_or_path": 3}, "base_model_name_or_path must be"),
                          (lambda c: {**c, "token": "s3cr3t-value"}, "unknown adapter field 'token'$")]:
        cfg_path.write_text(json.dumps(edit(cfg)))
        with pytest.raises(ValueError, match=message) as e:
            read_adapter(tmp_path / "ad")
        assert "s3cr3t" not in str(e.value)
    for text in ('{"r": NaN}', "[" * 5000 + "]" * 5000, '{"r": 1' + "0" * 5000 + "}"):
        cfg_path.write_text(text)
        with pytest.raises(ValueError, match="not valid JSON"):
            read_adapter(tmp_path / "ad")
    cfg_path.write_bytes(b'{"r": "\xff"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter(tmp_path / "ad")
    cfg_path.write_text(json.dumps(cfg))
    for edit, message in [(lambda t: t.flatten(), "is 1-D torch.float32; LoRA weights are 2-D floats"),
                          (lambda t: t[None], "is 3-D"),
                          (lambda t: t.to(torch.int32), "LoRA weights are 2-D floats"),
                          (lambda t: t * float("inf"), "NaN or infinite values")]:
        save_file({k: edit(v) for k, v in weights.items()}, str(w_path))
        with pytest.raises(ValueError, match=message):
            read_adapter(tmp_path / "ad")


def test_confined_reads_refuse_symbolic_links(tmp_path):
    """The server reads adapter folders confined: a file linked elsewhere (here: a JSON file with a secret) is
    refused, not read; trainers loading from a Hub cache (links into its blobs) read unconfined."""
    from rftkit.peft_format import adapter_digest, adapter_files
    _, ours = _pair(tmp_path)
    apply_lora(ours, LoRAConfig(r=2, targets=["q_proj"]))
    save_lora(ours, tmp_path / "ad")
    files = adapter_files(tmp_path / "ad", confined=True)
    (tmp_path / "secret.json").write_text('{"password": "hunter2"}')
    (tmp_path / "ad" / "adapter_config.json").rename(tmp_path / "real.json")
    (tmp_path / "ad" / "adapter_config.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(ValueError, match="adapter_config.json is a symbolic link") as e:
        read_adapter(tmp_path / "ad", confined=True)
    assert "hunter2" not in str(e.value)
    (tmp_path / "ad" / "adapter_config.json").unlink()
    (tmp_path / "ad" / "adapter_config.json").symlink_to(tmp_path / "real.json")
    read_adapter(tmp_path / "ad")                                  # unconfined: links followed
    assert adapter_digest(adapter_files(tmp_path / "ad")) == adapter_digest(files)
    (tmp_path / "link").symlink_to(tmp_path / "ad")
    with pytest.raises(ValueError, match="the adapter folder is a symbolic link"):
        adapter_files(tmp_path / "link", confined=True)
