"""`rft generate` and `rft chat` end to end: greedy text equals transformers' on the same model."""
import subprocess
import sys

import pytest
import torch

from rftkit.loading.weights import save_model_folder
from tests.conftest import tiny_model


def _rft(*args, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "rftkit.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _hf_greedy(folder, messages, max_new_tokens):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture
def tiny_folder(tmp_path, tok_dir):
    model = tiny_model(vocab_size=258)          # 256 byte tokens + 2 specials
    model.cfg.eos_token_id = [257]
    save_model_folder(model, tmp_path / "tiny", tokenizer_dir=tok_dir)
    return tmp_path / "tiny"


def test_generate_and_chat_on_a_tiny_model_match_transformers(tiny_folder):
    msg = [{"role": "user", "content": "hello"}]
    out = _rft("generate", "--model", str(tiny_folder), "--prompt", "hello", "--max-tokens", "12")
    assert out == _hf_greedy(tiny_folder, msg, 12) + "\n"
    reply = _rft("chat", "--model", str(tiny_folder), "--temperature", "0", "--max-tokens", "8",
                 stdin="hello\nhow are you\n/exit\nnever read\n").splitlines()
    first = _hf_greedy(tiny_folder, msg, 8)
    second = _hf_greedy(tiny_folder, msg + [{"role": "assistant", "content": first},
                                             {"role": "user", "content": "how are you"}], 8)
    assert "\n".join(reply) == f"{first}\n{second}"


def test_generate_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rftkit.cli", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"rft generate: error: {tmp_path / 'nope'}: no such model "
                                                f"folder or file (use a HF folder, a .gguf file, or "
                                                f"'smollm2-135m-instruct')"]


@pytest.mark.slow
def test_generate_on_the_embedded_model_matches_transformers():
    from rftkit.loading.embedded import ensure_embedded
    prompt = "What is 12 + 34? Answer with just the number."
    out = _rft("generate", "--prompt", prompt, "--max-tokens", "32")
    assert out == _hf_greedy(ensure_embedded(), [{"role": "user", "content": prompt}], 32) + "\n"
