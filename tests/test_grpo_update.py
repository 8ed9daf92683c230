"""grpo_update, the whole update on hand-built rollouts, against an independent per-sequence reference: a full
forward of each prompt + completion, the papers' advantage and normaliser written out, zero-variance groups
dropped, truncated completions masked, the KL to the adapter-off model."""
import pytest
import torch

from rftkit.grpo import GRPOConfig, Rollouts, grpo_update
from rftkit.lora import LoRAConfig, apply_lora, lora_disabled, lora_parameters
from tests.conftest import tiny_model

PROMPTS = [[5, 6, 7, 8], [1, 2], [9, 10, 11]]
COMPLETIONS = [[12, 13, 14], [15], [16, 17],            # group 0: rewards 1, 0, 0
               [18, 19], [20], [21, 22, 23],            # group 1: rewards all 1 -> no signal, dropped
               [24, 25, 26, 27], [28, 29], [30]]        # group 2: rewards 0, .5, 1; the first one truncated
REWARDS = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.5, 1.0]])
TRUNCATED = [False] * 6 + [True, False, False]


def _model():
    model = tiny_model(seed=1)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)                           # B != 0: the adapter changes the policy
    return model


def _seq_logp(model, prompt, completion, temperature):
    logits, _ = model(torch.tensor([prompt + completion]))
    lp = torch.log_softmax(logits[0].float() / temperature, -1)
    return torch.stack([lp[len(prompt) - 1 + t, tok] for t, tok in enumerate(completion)])     # [T_i]


def _reference_loss(model, loss_type, beta, temperature, old_shift=None):
    """On-policy (ratio = 1 in value, gradient of the ratio = gradient of log-prob), or with the old policy's
    log-probs `old_shift` below the current ones: ratio e^shift, clipped to [0.8, 1.28] where min() says."""
    G, L_max = 3, 4
    terms, n_tokens = [], 0
    for g in (0, 2):                                    # group 1 has zero std: dropped
        r = REWARDS[g]
        adv = (r - r.mean()) / (r.std() + 1e-4)         # DeepSeekMath outcome advantage (unbiased std, as TRL)
        for j in range(G):
            row = g * G + j
            lp = _seq_logp(model, PROMPTS[g], COMPLETIONS[row], temperature)
            if TRUNCATED[row]:
                terms.append(None)
                continue
            old = lp.detach() - (old_shift[row] if old_shift is not None else 0.0)
            ratio = torch.exp(lp - old)
            per_token = -torch.minimum(ratio * adv[j], ratio.clamp(0.8, 1.28) * adv[j])
            if beta:
                with torch.no_grad(), lora_disabled(model):
                    ref = _seq_logp(model, PROMPTS[g], COMPLETIONS[row], temperature)
                per_token = per_token + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
            terms.append(per_token)
            n_tokens += len(lp)
    N = len(terms)                                      # truncated rows count in N (TRL's grpo mean), not in tokens
    kept = [t for t in terms if t is not None]
    if loss_type == "grpo":
        return sum(t.mean() for t in kept) / N
    if loss_type == "dr_grpo":
        return sum(t.sum() for t in kept) / (N * L_max)
    return sum(t.sum() for t in kept) / n_tokens


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("dapo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.1)])
def test_grpo_update_gradient_equals_the_per_sequence_reference(loss_type, beta):
    model = _model()
    cfg = GRPOConfig(loss_type=loss_type, beta=beta, max_tokens=4, mask_truncated=True, grad_clip=0.0,
                     micro_batch_groups=1, temperature=0.8)
    batch = Rollouts(PROMPTS, COMPLETIONS, REWARDS, [[0.0] * len(c) for c in COMPLETIONS], TRUNCATED)
    opt = torch.optim.SGD(lora_parameters(model), lr=0.0)
    stats = grpo_update(model, opt, batch, cfg, step_optimizer=False)
    assert stats["groups_kept"] == 2 and stats["zero_std_frac"] == pytest.approx(1 / 3)
    fast = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad()
    ref = _reference_loss(model, loss_type, beta, 0.8)
    assert stats["loss"] == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-6)
    ref.backward()
    for a, p in zip(fast, lora_parameters(model)):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in fast) > 1e-3       # the gradients compared are not all ~0


def test_several_passes_use_the_engine_log_probs_as_the_old_policy():
    # iterations=2: the ratio is against the rollout's log-probs. Set them 0.5 below the current policy on
    # group 0 (ratio 1.65: clipped where A > 0) and 0.1 above on group 2 (ratio 0.905: inside the range)
    model = _model()
    shift = [0.5] * 3 + [0.0] * 3 + [-0.1] * 3
    with torch.no_grad():
        old = [(_seq_logp(model, PROMPTS[i // 3], c, 1.0) - shift[i]).tolist() for i, c in enumerate(COMPLETIONS)]
    cfg = GRPOConfig(loss_type="dapo", max_tokens=4, mask_truncated=True, grad_clip=0.0, iterations=2)
    batch = Rollouts(PROMPTS, COMPLETIONS, REWARDS, old, TRUNCATED)
    stats = grpo_update(model, torch.optim.SGD(lora_parameters(model), lr=0.0), batch, cfg, step_optimizer=False)
    assert stats["clip_frac"] == pytest.approx(3 / 9, abs=1e-6)    # row 0 (A > 0): 3 of the 9 valid tokens
    fast = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad()
    ref = _reference_loss(model, "dapo", 0.0, 1.0, old_shift=shift)
    assert stats["loss"] == pytest.approx(float(ref.detach()), rel=1e-4)
    ref.backward()
    for a, p in zip(fast, lora_parameters(model)):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)
