"""SFT: the loss is the completion tokens' mean NLL over the global batch (checked against a plain per-example
reference), micro-batching does not change gradients, a killed run resumes exactly, a tiny model learns 10
examples well enough to reproduce them through `rft generate --adapter`, and bad data fails with its line."""
import json

import pytest
import torch

from rftkit.loading import load
from rftkit.loading.weights import save_model_folder
from rftkit.lora import LoRAConfig, apply_lora, lora_parameters
from rftkit.data import read_rows as read_jsonl
from rftkit.sft import SFTConfig, batch_backward, completion_nll, encode_dataset, encode_example, train
from rftkit.tokenizer import Tokenizer
from tests.conftest import tiny_model

FACTS = [("capital of France?", "Paris"), ("2 + 2 =", "4"), ("colour of the sky?", "blue"),
         ("opposite of hot?", "cold"), ("first letter?", "A"), ("largest planet?", "Jupiter"),
         ("a baby cat?", "kitten"), ("H2O is?", "water"), ("days in a week?", "7"), ("say hi", "hello!")]


@pytest.fixture
def folder(tmp_path, tok_dir):
    model = tiny_model(vocab_size=258, dim=48, ffn_dim=96, head_dim=12)   # 256 bytes + <|im_start|>, <|im_end|>
    model.cfg.eos_token_id = [257]
    with torch.no_grad():          # embeddings ~N(0, 0.3): tied logits large enough to become confident
        model.model.embed_tokens.weight.mul_(3)
    save_model_folder(model, tmp_path / "tiny", tokenizer_dir=tok_dir)
    return tmp_path / "tiny"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_completion_mask_and_prompt_tokens_match_inference(folder):
    tok = Tokenizer.from_dir(folder)
    ids, mask = encode_example(tok, {"prompt": "hi", "completion": "yo"})
    prompt = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])        # as rft generate tokenizes it
    assert tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False) == "yo<|im_end|>\n"
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                         {"role": "assistant", "content": "d"}]}
    ids, mask = encode_example(tok, chat)
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(chat["messages"], False)
    assert tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False) == \
        "b<|im_end|>\nd<|im_end|>\n"                                          # both assistant turns, nothing else


def _examples(tok):
    rows = [{"prompt": p * k, "completion": c * k, "_line": i} for i, ((p, c), k) in enumerate(zip(FACTS, [1, 3, 2, 5]))]
    return encode_dataset(tok, rows, "x", 1024, "truncate")[0]


def _reference_loss(model, examples):
    """Per example, unpadded: full logits, log-softmax, completion tokens; summed and divided by their count."""
    total, n = 0.0, 0
    for ids, mask in examples:
        logits, _ = model(torch.tensor([ids]))
        logp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        m = torch.tensor(mask[1:], dtype=torch.double)
        total, n = total - (logp * m).sum(), n + m.sum()
    return total / n


def test_micro_batching_gives_the_reference_gradient(folder):
    model, tok = load(str(folder))
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    examples = _examples(tok)
    assert len({len(i) for i, _ in examples}) == 4                             # different lengths
    params = lora_parameters(model)
    ref = torch.autograd.grad(_reference_loss(model, examples), params)
    grads = {}
    for micro in (1, 4, 3):
        model.zero_grad()
        st = batch_backward(model, examples, micro)
        grads[micro] = [p.grad.clone() for p in params]
        assert st["nll_sum"] / st["n_tokens"] == pytest.approx(float(_reference_loss(model, examples).detach()), rel=1e-6)
    for micro in (1, 4, 3):
        for g, r in zip(grads[micro], ref):
            torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-7)
    # a mean of per-micro-batch means (the usual accumulation) would not be the same gradient
    model.zero_grad()
    for e in examples:
        nll, k, _ = completion_nll(model, [e])
        (nll / k / len(examples)).backward()
    assert max((p.grad - r).abs().max() / r.abs().max() for p, r in zip(params, ref)) > 1e-2


def test_prompt_predictions_do_not_enter_the_loss(folder):
    """Scramble the final hidden states wherever the next token is a prompt token: the loss is unchanged."""
    model, tok = load(str(folder))
    examples = _examples(tok)
    base = float(completion_nll(model, examples)[0].detach())
    # the examples are packed into one row; position t predicts token t+1 of the same example
    prompt_next = torch.tensor([b for _, mask in examples for b in [m == 0 for m in mask[1:]] + [False]])[None]
    handle = model.model.norm.register_forward_hook(
        lambda mod, inp, out: torch.where(prompt_next[..., None], torch.randn_like(out) * 10, out))
    try:
        scrambled = float(completion_nll(model, examples)[0].detach())
        handle.remove()
        prompt_next = ~prompt_next                                              # control: scramble the rest
        handle = model.model.norm.register_forward_hook(
            lambda mod, inp, out: torch.where(prompt_next[..., None], torch.randn_like(out) * 10, out))
        assert abs(float(completion_nll(model, examples)[0].detach()) - base) > 1.0
    finally:
        handle.remove()
    assert scrambled == pytest.approx(base, rel=1e-6)


def _cfg(tmp_path, data, **kw):
    base = dict(data=data, output=str(tmp_path / "run"), eval_fraction=0.0, batch_size=4, micro_batch=2,
                lr=1e-2, warmup_steps=2, lora_r=4, lora_alpha=8, checkpoint_every=2, device="cpu")
    return SFTConfig(**{**base, **kw})


def test_killed_run_resumes_exactly(tmp_path, folder):
    data = _write(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS])
    kw = dict(steps=7, lora_dropout=0.2)                       # dropout: the RNG state must be restored too
    full, tok = load(str(folder))
    start = {n: p.detach().clone() for n, p in full.named_parameters()}
    train(_cfg(tmp_path / "a", data, **kw), full, tok, progress=False)

    class Killed(Exception):
        pass

    def kill(step, row):
        if step == 5:                                           # after step 5; the last checkpoint is step 4
            raise Killed
    model, tok = load(str(folder))
    with pytest.raises(Killed):
        train(_cfg(tmp_path / "b", data, **kw), model, tok, progress=False, on_step=kill)
    model, tok = load(str(folder))
    train(_cfg(tmp_path / "b", data, resume=True, **kw), model, tok, progress=False)
    resumed = dict(model.named_parameters())
    moved = 0.0
    for n, p in full.named_parameters():
        assert torch.equal(p, resumed[n]), n
        if "lora_" not in n:
            assert torch.equal(p, start[n.replace(".base.", ".")]), f"{n}: a base weight changed"      # only LoRA trains
        elif "lora_B" in n:
            moved = max(moved, float(p.detach().abs().max()))
    assert moved > 1e-2                                         # parameters moved far beyond the tolerance (0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8))                              # the killed run's step 5 is not logged twice


def test_time_budget_ends_the_run_and_saves_the_adapter(tmp_path, folder):
    data = _write(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS])
    model, tok = load(str(folder))
    seen = []
    result = train(_cfg(tmp_path, data, steps=10**6, time_budget=0.5, checkpoint_every=10**6), model, tok,
                   progress=False, on_step=lambda step, row: seen.append(row["time"]))
    assert 1 <= result["steps"] == len(seen) < 10**6
    assert result["seconds"] >= 0.5 and (len(seen) == 1 or seen[-2] <= 0.5)    # the first step past it (times: 0.01 s)
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="time_budget"):
        SFTConfig(data="x.jsonl", time_budget=-1)


def test_tiny_model_learns_ten_examples_and_generates_them(tmp_path, folder, capsys):
    from rftkit.cli import main
    data = _write(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS])
    cfg = _cfg(tmp_path, data, steps=150, batch_size=10, micro_batch=10, lr=1e-2, warmup_steps=5,
               lora_r=16, lora_alpha=32, checkpoint_every=1000, model=str(folder))
    result = train(cfg, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["data"] == {"examples": 10, "truncated": 0, "dropped": 0, "kept": 10, "train": 10, "held_out": 0}
    assert rows[-1]["loss"] < 0.02 and rows[1]["loss"] > 5
    assert (tmp_path / "run/loss.png").is_file()
    capsys.readouterr()
    for prompt, completion in FACTS:
        assert main(["generate", "--model", str(folder), "--adapter", result["output"], "--prompt", prompt,
                     "--max-tokens", "16"]) == 0
        assert capsys.readouterr().out == completion + "\n"


def test_bad_data_names_the_line_and_overlong_examples_are_counted(tmp_path, folder):
    tok = Tokenizer.from_dir(folder)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        read_jsonl(bad)
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"question": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected 'messages' or 'prompt' and 'completion', got keys \['question'\]"):
        encode_dataset(tok, read_jsonl(bad), str(bad), 100, "truncate")
    rows = read_jsonl(_write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c" * n} for n in (5, 60, 200)]
                             + [{"prompt": "p" * 300, "completion": "c"}]))
    kept, counts = encode_dataset(tok, rows, "d", 100, "truncate")
    assert counts == {"examples": 4, "truncated": 2, "dropped": 1, "kept": 3}  # a prompt filling 100: nothing left
    assert [len(i) for i, _ in kept] == [len(encode_example(tok, rows[0])[0]), 100, 100]
    assert sum(kept[2][1]) == 100 - len(tok.encode_chat([{"role": "user", "content": "p"}]))
    assert encode_dataset(tok, rows, "d", 100, "drop")[1] == {"examples": 4, "truncated": 0, "dropped": 3, "kept": 1}
