"""Shared fixtures: tiny random models built in-process (no network, no files).

    from tests.conftest import tiny_config, tiny_model
    model = tiny_model(seed=0, vocab_size=258, tie_embeddings=False)    # any ModelConfig field overrides
"""
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
