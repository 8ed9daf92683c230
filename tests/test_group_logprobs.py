"""Prompt-once-per-group log-probs equal the naive per-row forward, in values and gradients."""
import torch

from rftkit.group_logprobs import group_logprobs
from rftkit.model import ModelConfig, Transformer


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)
    model = Transformer(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.05)      # softer logits: entropies well above zero
    return model


def _naive(model, prompts, completions, G, temperature):
    rows = []
    for i, c in enumerate(completions):
        p = prompts[i // G]
        ids = torch.tensor([p + c])
        logits, _ = model(ids)
        lp = torch.log_softmax(logits[0].float() / temperature, -1)
        rows.append(torch.stack([lp[len(p) - 1 + t, tok] for t, tok in enumerate(c)]))
    return rows


def test_group_logprobs_equal_naive_forward_and_gradients():
    model = _model()
    prompts = [[5, 6, 7, 8, 9], [1, 2]]                      # different lengths: padding in the prompt batch
    completions = [[10, 11, 12], [13], [14, 15], [16, 17, 18, 19], [20], [21, 22]]
    G, T = 3, 0.7
    logp, mask, ent, _ = group_logprobs(model, prompts, completions, G, temperature=T, with_entropy=True)
    ref = _naive(model, prompts, completions, G, T)
    for i, r in enumerate(ref):
        assert torch.allclose(logp[i, :len(r)], r, atol=1e-5), i
        assert mask[i].sum() == len(completions[i])
        assert torch.all(logp[i, len(r):] == 0)
    # entropy of the first completion token of row 0, from the full forward
    full, _ = model(torch.tensor([prompts[0] + completions[0]]))
    dist = torch.softmax(full[0, len(prompts[0]) - 1] / T, -1)
    assert torch.allclose(ent[0, 0], -(dist * dist.log()).sum(), atol=1e-4)

    w = torch.randn_like(logp)
    (logp * w).sum().backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum((r * w[i, :len(r)]).sum() for i, r in enumerate(_naive(model, prompts, completions, G, T))).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(g_fast[n], p.grad, rtol=1e-4, atol=1e-6), n
