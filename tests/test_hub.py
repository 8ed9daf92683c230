"""Models by Hub id: a Hub-style cache built in tmp_path (models--ORG--NAME/snapshots/<rev>/ + refs/main) loads
offline and gives the same logits as the folder it was made from; an absent model, an unreachable Hub and a
pickle-only repo fail with the id named and what to do. Nothing is downloaded."""
import pytest
import torch

from rftkit.loading import load, resolve
from rftkit.loading.weights import save_model_folder
from tests.conftest import tiny_model

REV = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(root, repo_id, files_from):
    """The layout huggingface_hub writes: blobs are the files, snapshots/<rev>/ links to them, refs/main names rev."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REV
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    for i, f in enumerate(sorted(p for p in files_from.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blob)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def test_hub_id_loads_from_the_cache_offline(tmp_path, tok_dir, offline_cache):
    model = tiny_model(vocab_size=258)
    save_model_folder(model, tmp_path / "src", tokenizer_dir=tok_dir)
    snap = hub_cache_with(offline_cache, "tiny-org/Tiny-Chat", tmp_path / "src")
    assert resolve("tiny-org/Tiny-Chat") == snap
    loaded, tok = load("tiny-org/Tiny-Chat")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "hi"}])])
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert resolve(f"tiny-org/Tiny-Chat@{REV}") == snap              # a pinned revision


def test_absent_hub_model_offline_names_the_id_and_the_fix(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"model 'no-org/absent': no such local folder, not in the "
                                                r"Hugging Face cache .*HF_HUB_OFFLINE is set"
                                                r".*hf download no-org/absent"):
        load("no-org/absent")
    from rftkit.cli import main
    assert main(["generate", "--model", "no-org/absent", "--prompt", "hi"]) == 2


def test_unreachable_hub_names_the_id_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")         # nothing listens: refused at once
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match=r"model 'no-org/absent': no such local folder, not in the "
                                                r"Hugging Face cache .*could not be reached"
                                                r".*hf download no-org/absent"):
        resolve("no-org/absent")


def test_pickle_only_repo_is_refused_by_id(tmp_path, tok_dir, offline_cache):
    src = tmp_path / "src"
    save_model_folder(tiny_model(vocab_size=258), src, tokenizer_dir=tok_dir)
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")              # never opened
    hub_cache_with(offline_cache, "old-org/pickled", src)
    with pytest.raises(ValueError, match=r"model 'old-org/pickled': no safetensors weights, only pickle files "
                                         r"\['pytorch_model.bin'\]; rftkit never loads pickles"):
        load("old-org/pickled")


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder or file"):
        resolve(str(tmp_path / "runs" / "model"))
