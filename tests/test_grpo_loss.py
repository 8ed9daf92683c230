"""GRPO-family maths against numbers worked out by hand from the papers' formulas."""
import math

import pytest
import torch

from rftkit.grpo_loss import LossSpec, Totals, group_advantages, policy_loss


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # group 0: mean .5, unbiased std sqrt(1/3); group 1: zero variance -> zero advantage
    a = group_advantages(r, "group", eps=0.0)
    assert torch.allclose(a[0], torch.tensor([1, -1, -1, 1]) * 0.5 / math.sqrt(1 / 3))
    assert torch.equal(group_advantages(r, "group")[1], torch.zeros(4))
    assert torch.allclose(group_advantages(r, "none"), torch.tensor([[.5, -.5, -.5, .5], [0, 0, 0, 0.]]))
    # batch std over all 8 rewards (6 ones, 2 zeros): unbiased var = (6*.0625*... ) computed explicitly
    flat = r.flatten()
    batch_std = math.sqrt(((flat - flat.mean()) ** 2).sum().item() / 7)
    assert torch.allclose(group_advantages(r, "batch", eps=0.0)[0], torch.tensor([.5, -.5, -.5, .5]) / batch_std)
    with pytest.raises(ValueError, match="'sigma'"):
        group_advantages(r, "sigma")


def _batch():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 3.0], [0.5, 1.0, 1.1]]))   # ratios, since old = 0
    adv = torch.tensor([1.0, -1.0])
    return logp.requires_grad_(), old, adv, mask


@pytest.mark.parametrize("loss_type,expected", [
    # per-token terms: seq0 (A=+1) -1, -1.28 (1.5 clipped to 1+0.28); seq1 (A=-1) 0.8 (0.5 clipped to 0.8), 1, 1.1
    ("grpo", ((-1 - 1.28) / 2 + (0.8 + 1 + 1.1) / 3) / 2),
    ("dapo", (-1 - 1.28 + 0.8 + 1 + 1.1) / 5),
    ("dr_grpo", (-1 - 1.28 + 0.8 + 1 + 1.1) / (2 * 4)),
])
def test_policy_loss_types(loss_type, expected):
    logp, old, adv, mask = _batch()
    spec = LossSpec(loss_type=loss_type, eps_low=0.2, eps_high=0.28, max_completion_len=4)
    loss, stats = policy_loss(logp, old, adv, mask, spec, Totals(n_seqs=2, n_tokens=5))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_low_tokens"] == 1 and stats["clip_high_tokens"] == 1
    loss.backward()
    # clipped tokens carry no gradient; the masked token none either
    assert logp.grad[0, 1] == 0 and logp.grad[1, 0] == 0 and logp.grad[0, 2] == 0


def test_gspo_sequence_ratio_and_gradient():
    logp, old, adv, mask = _batch()
    spec = LossSpec(loss_type="grpo", importance="sequence")
    loss, _ = policy_loss(logp, old, adv, mask, spec, Totals(2, 5))
    s0, s1 = math.sqrt(1.5), 0.55 ** (1 / 3)      # exp(mean log-ratio) per sequence
    assert loss.item() == pytest.approx((-s0 + s1) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp_t of -(s0 * A) averaged over 2 tokens and 2 sequences: -s0/4 on each valid token of seq 0
    assert torch.allclose(logp.grad[0], torch.tensor([-s0 / 4, -s0 / 4, 0.0]))
    assert torch.allclose(logp.grad[1], torch.full((3,), s1 / 6))


def test_kl_k3_estimator():
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[math.log(2.0), 0.0]])
    spec = LossSpec(loss_type="dapo", beta=0.1)
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), spec, Totals(1, 2), ref)
    kl = 2 - math.log(2) - 1                        # exp(d) - d - 1 at d = ln 2
    assert stats["kl_sum"] == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * kl / 2, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), spec, Totals(1, 2))


def test_microbatch_split_sums_to_global_loss():
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5), torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    adv = torch.randn(6)
    for lt in ("grpo", "dr_grpo", "dapo"):
        spec, tot = LossSpec(loss_type=lt), Totals(6, int(mask.sum()))
        whole, _ = policy_loss(logp, old, adv, mask, spec, tot)
        parts = sum(policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], spec, tot)[0]
                    for i in range(0, 6, 2))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_bad_spec_values_named():
    with pytest.raises(ValueError, match="'ppo'"):
        LossSpec(loss_type="ppo")
    with pytest.raises(ValueError, match="eps_low=1.5"):
        LossSpec(eps_low=1.5)


def test_clip_is_one_sided_as_in_ppo():
    # A < 0 with the ratio above 1 + eps, A > 0 with it below 1 - eps: min() keeps the unclipped term, so the
    # gradient flows (the update may undo a move in the wrong direction without limit)
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    adv_tokens = torch.tensor([-1.0, 1.0])
    total = 0
    for t in range(2):
        loss, stats = policy_loss(logp[:, t:t + 1], torch.zeros(1, 1), adv_tokens[t:t + 1], torch.ones(1, 1),
                                  LossSpec("dapo"), Totals(1, 2))
        assert stats["clip_low_tokens"] == 0 and stats["clip_high_tokens"] == 0
        total = total + loss
    assert total.item() == pytest.approx((1.5 - 0.5) / 2)            # -min(rA, clip(r)A) per token, / 2 tokens
    total.backward()
    assert torch.allclose(logp.grad, torch.tensor([[1.5 / 2, -0.5 / 2]]))   # d/dlogp of -A r = -A r
    # clip-higher moves only the upper bound: r = 1.25, A = +1 is clipped at 1.2 symmetric, not at 1.28
    lp = torch.log(torch.tensor([[1.25]]))
    sym, st = policy_loss(lp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), LossSpec("dapo", 0.2, 0.2), Totals(1, 1))
    high, st2 = policy_loss(lp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), LossSpec("dapo"), Totals(1, 1))
    assert sym.item() == pytest.approx(-1.2) and st["clip_high_tokens"] == 1
    assert high.item() == pytest.approx(-1.25) and st2["clip_high_tokens"] == 0


def test_the_three_normalisations_on_one_group():
    # one group of G = 4, rewards [1, 0, 0, 1], lengths [4, 1, 2, 3], on-policy (ratio 1), L_max = 4
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    T = [4, 1, 2, 3]
    mask = torch.tensor([[1.0] * t + [0.0] * (4 - t) for t in T])
    logp = torch.zeros(4, 4, requires_grad=True)
    a_std = 0.5 / math.sqrt(1 / 3)                                  # (r - mean) / std, unbiased std = sqrt(1/3)
    cases = {  # loss type, advantage scaling -> (loss, d loss / d logp of one token of completion i)
        ("grpo", "group"): (0.0, [-a_std / (4 * 4), a_std / (4 * 1), a_std / (4 * 2), -a_std / (4 * 3)]),
        ("dapo", "group"): (-a_std * (4 - 1 - 2 + 3) / 10, [-a_std / 10, a_std / 10, a_std / 10, -a_std / 10]),
        ("dr_grpo", "none"): (-0.5 * (4 - 1 - 2 + 3) / 16, [-0.5 / 16, 0.5 / 16, 0.5 / 16, -0.5 / 16]),
    }
    for (lt, scale), (expected, grads) in cases.items():
        adv = group_advantages(r, scale, eps=0.0).flatten()
        assert adv.abs().tolist() == pytest.approx([a_std if scale == "group" else 0.5] * 4)
        logp.grad = None
        loss, _ = policy_loss(logp, logp.detach(), adv, mask, LossSpec(lt, max_completion_len=4), Totals(4, 10))
        assert loss.item() == pytest.approx(expected, abs=1e-7), lt
        loss.backward()
        want = torch.tensor(grads)[:, None] * mask
        assert torch.allclose(logp.grad, want, atol=1e-7), lt


def test_gspo_clips_whole_sequences():
    logp, old, adv, mask = _batch()
    # sequence ratios s0 = sqrt(1.5) = 1.2247 (A = +1) and s1 = 0.55^(1/3) = 0.8193 (A = -1); with eps 0.1 both
    # leave [0.9, 1.1]: terms -1.1 and +0.9, and no token of either sequence gets a gradient
    spec = LossSpec(loss_type="grpo", importance="sequence", eps_low=0.1, eps_high=0.1)
    loss, stats = policy_loss(logp, old, adv, mask, spec, Totals(2, 5))
    assert loss.item() == pytest.approx((-1.1 + 0.9) / 2, rel=1e-6)
    assert stats["clip_high_tokens"] == 2 and stats["clip_low_tokens"] == 3     # every valid token, by sequence
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))


def test_kl_gradient_and_sum_with_the_policy_term():
    # k3 = exp(ref - logp) - (ref - logp) - 1; d k3 / d logp = 1 - exp(ref - logp)
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[math.log(2.0), math.log(0.5)]])
    spec = LossSpec(loss_type="grpo", beta=0.04)
    loss, stats = policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), spec, Totals(1, 2), ref)
    kl = [2 - math.log(2) - 1, 0.5 + math.log(2) - 1]
    assert stats["kl_sum"] == pytest.approx(sum(kl), rel=1e-6)
    assert loss.item() == pytest.approx((-1 + 0.04 * kl[0] - 1 + 0.04 * kl[1]) / 2, rel=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[(-1 + 0.04 * (1 - 2)) / 2, (-1 + 0.04 * (1 - 0.5)) / 2]]))
