"""Our decoder against `transformers` on tiny random configs (the oracle), and on the real model (slow)."""
import pytest
import torch
import transformers

from rftkit.loading import load_model
from rftkit.loading.hf import config_from_hf, config_to_hf
from rftkit.model import KVCache, ModelConfig, Transformer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "llama3-rope-untied": ("llama", dict(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False)),
    "qwen2-qkv-bias": ("qwen2", {}),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=16)),
    "mistral-window": ("mistral", dict(sliding_window=5)),      # shorter than the 12-token prompt
}


def _reference(model_type, extra):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_with_and_without_cache(case, tmp_path):
    ref = _reference(*CASES[case])
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model(str(tmp_path))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        full, aux = ours(ids)
        cache = KVCache(ours.cfg.n_layers)
        first, _ = ours(ids[:, :7], cache=cache)
        second, _ = ours(ids[:, 7:], cache=cache)
    assert aux == {}
    assert (full - expected).abs().max() < 1e-4
    assert (torch.cat([first, second], 1) - expected).abs().max() < 1e-4
    if case == "mistral-window":   # the window really cuts: full attention would give other logits
        assert ours.cfg.sliding_window == 5
        ours.cfg.sliding_window = None
        for block in ours.model.layers:
            block.self_attn.window = None
        with torch.no_grad():
            assert (ours(ids)[0] - expected).abs().max() > 1e-3


def test_config_round_trips_through_hf_dict():
    for model_type, extra in CASES.values():
        ref = _reference(model_type, extra)
        cfg = config_from_hf(ref.config.to_dict())
        assert config_from_hf(config_to_hf(cfg)) == cfg


def test_unsupported_architecture_and_bad_config_named():
    with pytest.raises(ValueError, match="'gpt2'"):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="'yarn'"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_padding_positions_do_not_change_real_rows():
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                    ffn_dim=48)).eval()
    ids = torch.randint(0, 50, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, -1, -1, -1]])
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(padded, positions=pos)
    assert torch.allclose(a, b[:, :6], atol=1e-6)


@pytest.mark.parametrize("window,head_dim", [(None, 8), (3, 8), (None, 16)])   # head_dim 16: the packed kernel
def test_packed_rows_equal_each_sequence_alone(window, head_dim):
    """seq_lens: sequences packed back to back give each one's own logits (attention never crosses), also
    with a sliding window shorter than the sequences, and gradients flow to every token."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=head_dim,
                                    ffn_dim=48, sliding_window=window)).eval()
    seqs = [torch.randint(0, 50, (1, n)) for n in (5, 1, 9)]
    packed, _ = model(torch.cat(seqs, 1), seq_lens=[5, 1, 9])
    alone = torch.cat([model(s)[0] for s in seqs], 1)
    assert packed.shape == alone.shape == (1, 15, 50)
    assert torch.allclose(packed, alone, atol=1e-5)
    packed.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match=r"seq_lens \[5, 9\] must .* 15 tokens"):
        model(torch.cat(seqs, 1), seq_lens=[5, 9])


def _greedy(model, ids, steps):
    """Our greedy decode with the KV cache, `steps` tokens (no stopping at eos)."""
    cache, out, x = KVCache(model.cfg.n_layers), [], ids
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(x, cache=cache)
            x = logits[:, -1:].argmax(-1)
            out.append(int(x))
    return out


@pytest.mark.slow
def test_real_smollm2_matches_transformers_loading_the_same_gguf():
    """The embedded model as we convert and run it vs transformers' own GGUF loader (dequantize + unpermute)."""
    from rftkit.loading import load_tokenizer
    from rftkit.loading.embedded import _find_embedded_gguf, ensure_embedded
    ensure_embedded()
    gguf_path = _find_embedded_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                            dtype=torch.float32).eval()
    ours, tok = load_model(None), load_tokenizer(None)
    story = torch.tensor([tok.encode_chat([{"role": "user", "content": "Write a long story about a robot who "
                                                                       "learns to paint."}])])
    with torch.no_grad():
        assert (ref(story).logits - ours(story)[0]).abs().max() <= 1e-3
        expected = ref.generate(story, max_new_tokens=64, do_sample=False)[0, story.shape[1]:]
    assert len(expected) == 64, "the story should not end within 64 tokens"
    assert _greedy(ours, story, 64) == expected.tolist()
    # a chat prompt to the end of the answer: same tokens, same text
    prompt = "What is 12 + 34? Answer with just the number."
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": prompt}])])
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_ids)
    expected = expected[0, ids.shape[1]:].tolist()
    ours_ids = _greedy(ours, ids, len(expected))
    assert ours_ids == expected and expected[-1] in tok.eos_token_ids
    print(f"\n{prompt!r} -> {tok.decode(ours_ids)!r}")
