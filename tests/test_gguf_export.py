"""GGUF export: the file reads back as the same model (our reader, gguf's reader), and llama.cpp decodes it
as we do (slow, needs llama-cpp-python)."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from rftkit.compress.folder import save_compressed
from rftkit.compress.transforms import compress
from rftkit.loading.gguf_file import permute_qk, write_gguf
from rftkit.loading.gguf_file import _unpermute, read_gguf
from tests.conftest import tiny_model

torch.set_num_threads(1)


@pytest.fixture
def tok_dir(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["Ġa"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "a")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    d = tmp_path / "tok"
    d.mkdir()
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return d


def _model(**kw):
    return tiny_model(vocab_size=264, dim=64, head_dim=16, ffn_dim=128, **kw)


def test_qk_permutation_is_llama_cpp_inverse_of_ours():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(_unpermute(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_reads_back_as_the_same_model(arch, tok_dir, tmp_path):
    kw = {"llama": {}, "qwen2": {"model_type": "qwen2", "qkv_bias": True, "tie_embeddings": False},
          "qwen3": {"model_type": "qwen3", "qk_norm": True}}[arch]
    model = _model(**kw)
    if arch == "qwen2":
        with torch.no_grad():
            for b in model.model.layers:
                b.self_attn.q_proj.bias.normal_()
    path = write_gguf(model, tmp_path / "m.gguf", tok_dir, dtype="f32")
    cfg, state = read_gguf(path)
    own = model.state_dict()
    assert set(state) == set(own) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    for k, v in state.items():
        assert torch.equal(v, own[k]), k
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.head_dim, cfg.qkv_bias, cfg.qk_norm) == \
        (4, 2, 128, 16, model.cfg.qkv_bias, model.cfg.qk_norm)
    import gguf
    r = gguf.GGUFReader(str(path))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    assert len(tokens) == 264 and tokens[tj["model"]["vocab"]["Ġa"]] == "Ġa" and tokens[257] == "<|im_start|>"
    assert tokens[-1] == "[PAD263]" and r.fields["tokenizer.ggml.token_type"].contents()[-1] == 5     # unused
    assert r.fields["tokenizer.ggml.merges"].contents() == ["Ġ a"]
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == 258


@pytest.mark.parametrize("dtype,tol", [("f16", 1e-3), ("q8_0", 1e-2), ("q4_1", 0.1)])
def test_f16_q8_gguf_close(dtype, tol, tok_dir, tmp_path):
    import gguf
    model = _model()
    path = write_gguf(model, tmp_path / "m.gguf", tok_dir, dtype=dtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    want = {"f16": "F16", "q8_0": "Q8_0", "q4_1": "Q4_1"}[dtype]
    assert types["blk.0.ffn_up.weight"].name == want and types["blk.0.attn_norm.weight"].name == "F32"
    assert types["token_embd.weight"].name == ("F16" if dtype == "f16" else "Q8_0")
    _, state = read_gguf(path)
    for k, v in model.state_dict().items():
        if k in state:
            assert (state[k] - v).abs().max() <= tol * v.abs().max() + 1e-6, k


def test_cli_exports_compressed_folder_as_dequantized_gguf(tok_dir, tmp_path):
    from rftkit.cli import main
    model, rec = compress(_model(), "int4")
    save_compressed(model, rec, tmp_path / "int4", tokenizer_dir=tok_dir)
    assert main(["export", "--model", str(tmp_path / "int4"), "--gguf", str(tmp_path / "m.gguf"),
                 "--gguf-type", "f32"]) == 0
    _, state = read_gguf(tmp_path / "m.gguf")
    torch.testing.assert_close(state["model.layers.1.mlp.down_proj.weight"],
                               model.model.layers[1].mlp.down_proj.dequantize(), rtol=0, atol=0)
    assert main(["export", "--model", str(tmp_path / "int4"), "--gguf", str(tmp_path / "x.gguf"),
                 "--gguf-type", "q4"]) == 2                                       # bad type named, nothing written
    assert not (tmp_path / "x.gguf").exists()


def test_refusals(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="sliding-window"):
        write_gguf(_model(sliding_window=8), tmp_path / "a.gguf", tok_dir)
    with pytest.raises(ValueError, match="tokenizer.json"):
        write_gguf(_model(), tmp_path / "a.gguf", tmp_path)
    with pytest.raises(ValueError, match="does not fit the model's vocab_size 97"):
        write_gguf(tiny_model(), tmp_path / "a.gguf", tok_dir)


def test_an_unmerged_adapter_is_refused(tok_dir, tmp_path):
    """The writer (in rftkit.loading, below LoRA) tells an unmerged adapter by its parameters' names; merged,
    the same model writes."""
    from rftkit.lora import LoRAConfig, apply_lora, merge_lora
    model = apply_lora(_model(), LoRAConfig(r=2, targets=["q_proj"]))
    with pytest.raises(ValueError, match="merge the adapter first"):
        write_gguf(model, tmp_path / "a.gguf", tok_dir)
    assert not (tmp_path / "a.gguf").exists()
    merge_lora(model)
    assert write_gguf(model, tmp_path / "a.gguf", tok_dir).is_file()


@pytest.mark.slow
def test_q4_1_export_of_embedded_model_gives_back_its_grid(tmp_path):
    # the embedded SmolLM2's linears are Q4_1 in its GGUF: re-exporting as Q4_1 returns the same values
    from rftkit.loading import load_model, resolve
    model = load_model(None)
    _, state = read_gguf(write_gguf(model, tmp_path / "q41.gguf", resolve(None), dtype="q4_1"))
    for k in ("model.layers.0.mlp.down_proj.weight", "model.layers.29.self_attn.q_proj.weight"):
        w = model.state_dict()[k]
        assert (state[k] - w).abs().max() <= 1e-3 * w.abs().max(), k


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_greedy_equals_ours_on_exported_embedded_model(tmp_path):
    from llama_cpp import Llama
    from rftkit.loading import load, resolve
    model, tok = load(None)
    path = write_gguf(model, tmp_path / "smollm2.gguf", resolve(None), dtype="f32")
    llm = Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
    try:
        for prompt in ("What is 12 + 34? Answer with just the number.", "Write a story about a robot."):
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
            assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == tok.encode(prompt)
            ours = list(ids)
            with torch.no_grad():
                for _ in range(16):
                    ours.append(int(model(torch.tensor([ours]))[0][0, -1].argmax()))
            theirs = []
            for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                theirs.append(int(t))
                if len(theirs) == 16:
                    break
            assert theirs == ours[len(ids):], (prompt, tok.decode(theirs), tok.decode(ours[len(ids):]))
    finally:
        llm.close()
