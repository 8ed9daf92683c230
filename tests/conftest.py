"""Shared fixtures and helpers of the tests (the only file tests import helpers from): tiny random models
built in-process (no network), a byte-level tokenizer folder, the greedy reference decode, a tiny GRPO setup.

    from tests.conftest import tiny_config, tiny_model
    model = tiny_model(seed=0, vocab_size=258, tie_embeddings=False)    # any ModelConfig field overrides
    def test_x(tok_dir): ...                                            # fixture: a tokenizer folder
"""
import json

import pytest
import torch

from rftkit.model import ModelConfig, Transformer


def tiny_config(**overrides) -> ModelConfig:
    """~22k parameters: V=97, D=32, 2 layers, 4 heads (2 kv) of 8."""
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
                max_seq_len=256)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    with torch.no_grad():  # softer logits than N(0, 1) embeddings give: sampling tests need spread
        model.model.embed_tokens.weight.mul_(0.1)
    return model.eval()


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def tiny() -> Transformer:
    return tiny_model()


def reference_greedy(model, prompt, n):
    """The plain reference of every decode path: n greedy tokens, each the argmax of a full forward."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def tok_dir(tmp_path):
    """A tokenizer folder: byte-level BPE with an empty merge list, so every byte is a token (UTF-8 splits
    across tokens), ChatML specials and CHAT_TEMPLATE."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(sorted(set(pre_tokenizers.ByteLevel.alphabet())))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tmp_path


@pytest.fixture
def tiny_folder(tmp_path, tok_dir):
    """A tiny model folder (256 byte tokens + the two ChatML specials, EOS <|im_end|>) with tok_dir's tokenizer,
    as the commands' --model takes it."""
    from rftkit.loading import save_model_folder
    model = tiny_model(vocab_size=258, max_seq_len=512)
    model.cfg.eos_token_id = [257]
    save_model_folder(model, tmp_path / "tiny", tokenizer_dir=tok_dir)
    return tmp_path / "tiny"


def digit_share(completion: str, sample: dict) -> float:
    """A reward with spread on a random model: the share of digits in the completion."""
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


def grpo_setup(tok_dir):
    """(tiny model, byte tokenizer, a 40-problem arithmetic task rewarded by digit_share) for GRPO tests."""
    from rftkit.tasks import Task, arithmetic
    from rftkit.tokenizer import Tokenizer
    base = arithmetic()
    task = Task("tiny", {k: v[:40] for k, v in base.problems.items()}, digit_share)
    return tiny_model(vocab_size=258, max_seq_len=512), Tokenizer.from_dir(tok_dir), task


def grpo_config(tmp_path, **kw):
    """A GRPOConfig small enough for the tiny model: 2 prompts x 4 samples of 6 tokens, checkpoints every 2."""
    from rftkit.grpo import GRPOConfig
    kw = {"checkpoint_every": 2, "prompts_per_step": 2, "group_size": 4, "max_tokens": 6, "lr": 5e-2, "lora_r": 4,
          "micro_batch_groups": 1, "seed": 3, **kw}
    return GRPOConfig(output=str(tmp_path), **kw)
