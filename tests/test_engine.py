"""The engine against plain references: argmax over a full forward, log_softmax of full logits."""
import pytest
import torch

from rftkit.engine import Engine
from rftkit.sampling import SamplingParams
from tests.conftest import tiny_model


def reference_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_full_forward_argmax_with_joins_and_chunked_prefill():
    model = tiny_model()
    engine = Engine(model, max_seq_len=128, prefill_chunk=5, max_batch=8)
    prompts = [[3, 4, 5], list(range(10, 31)), [7], [8, 9, 10, 11, 12, 13]]     # 21 tokens: 5 chunks
    greedy = SamplingParams(temperature=0, max_tokens=12)
    rids = [engine.add_request(p, greedy) for p in prompts[:2]]
    got = {r: [] for r in rids}
    for step in range(200):
        if step == 3:                      # requests join mid-generation
            rids += [engine.add_request(p, greedy) for p in prompts[2:]]
            got.update({r: [] for r in rids[2:]})
        for out in engine.step():
            got[out.request_id] += out.token_ids
        if not engine.has_unfinished():
            break
    for rid, p in zip(rids, prompts):
        assert got[rid] == reference_greedy(model, p, 12)
    assert engine.stats["prefill_tokens"] == sum(map(len, prompts))


def test_flood_beyond_the_budget_preempts_and_completes_within_it():
    model = tiny_model()
    cfg = model.cfg
    block = 2 * cfg.n_layers * 4 * cfg.n_kv_heads * cfg.head_dim * 4            # bytes of a 4-token block
    budget = 9 * block + 100                                                      # block 0 pads: 8 usable
    engine = Engine(model, kv_budget_bytes=budget, max_seq_len=64, block_size=4)
    assert engine.kv_bytes <= budget
    prompts = [[i + 1, i + 2, i + 3] for i in range(10)]                          # 3 + 12 tokens = 4 blocks
    greedy = SamplingParams(temperature=0, max_tokens=12)
    rids = [engine.add_request(p, greedy) for p in prompts]
    got = {r: [] for r in rids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
        assert engine.kv_blocks_used <= 8
    for rid, p in zip(rids, prompts):
        assert got[rid] == reference_greedy(model, p, 12)
    assert engine.stats["preemptions"] > 0                  # requests were preempted and resumed exactly
    assert sum(t.numel() * t.element_size() for t in engine.cache.k + engine.cache.v) <= budget
    with pytest.raises(ValueError, match="needs 9 KV blocks but the budget holds 8"):
        engine.add_request([1] * 30, SamplingParams(max_tokens=5))


def test_prefix_cache_hit_reuses_blocks_and_decodes_the_same():
    model = tiny_model()
    engine = Engine(model, max_seq_len=64, block_size=4)
    system = list(range(20, 30))                                                  # 10 shared tokens
    greedy = SamplingParams(temperature=0, max_tokens=8)
    a = engine.generate([system + [1, 2]], greedy)[0][0]
    assert engine.stats["prefix_cache_hit_tokens"] == 0
    b = engine.generate([system + [3]], greedy)[0][0]
    assert engine.stats["prefix_cache_hit_tokens"] == 8                         # two full blocks reused
    assert a.token_ids == reference_greedy(model, system + [1, 2], 8)
    assert b.token_ids == reference_greedy(model, system + [3], 8)
    c = engine.generate([system[:8]], greedy)[0][0]                               # a whole-prompt hit recomputes
    assert c.token_ids == reference_greedy(model, system[:8], 8)                 # its last block for logits


def test_weights_changed_in_place_invalidate_the_prefix_cache():
    # GRPO steps the live adapter between rollouts: keys cached under the old weights must not be reused
    model = tiny_model()
    engine = Engine(model, max_seq_len=64, block_size=4)
    prompt = list(range(20, 30)) + [1]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    engine.generate([prompt], greedy)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    after = engine.generate([prompt], greedy)[0][0]
    assert engine.stats["prefix_cache_hit_tokens"] == 0
    assert after.token_ids == reference_greedy(model, prompt, 8)
    again = engine.generate([prompt], greedy)[0][0]                  # unchanged weights: cached again
    assert engine.stats["prefix_cache_hit_tokens"] == 8 and again.token_ids == after.token_ids


def test_logprobs_equal_log_softmax_of_full_forward():
    model = tiny_model()
    engine = Engine(model, max_seq_len=64)
    prompt = [5, 6, 7, 8]
    T = 0.7
    (c,) = engine.generate([prompt], SamplingParams(temperature=T, max_tokens=8, seed=3, logprobs=2))[0:1][0]
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + c.token_ids]))
    lp = torch.log_softmax(logits[0, len(prompt) - 1:-1] / T, -1)
    expected = lp.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)
    top_ids = [t[0][0] for t in c.top_logprobs]
    assert top_ids == lp.argmax(-1).tolist()


def test_seeded_requests_are_batch_invariant_and_n_shares_prefill():
    model = tiny_model()
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=10, seed=11, n=3)
    alone = Engine(model, max_seq_len=64).generate([[1, 2, 3]], p)[0]
    engine = Engine(model, max_seq_len=64)
    mixed = engine.generate([[9, 9], [1, 2, 3], [4, 5, 6, 7]],
                            [SamplingParams(max_tokens=7), p, SamplingParams(max_tokens=12, seed=5)])[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in mixed]
    assert len({tuple(c.token_ids) for c in alone}) > 1           # the n samples differ (seed + i)
    assert engine.stats["shared_prefill_tokens"] == 2 * 3


def test_stop_tokens_abort_and_bad_requests():
    model = tiny_model()
    engine = Engine(model, max_seq_len=32)
    ref = reference_greedy(model, [1, 2], 10)
    stop = ref[-1]
    (c,) = engine.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]))[0]
    assert c.token_ids == ref[:ref.index(stop) + 1] and c.finish_reason == "stop"
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=20))
    engine.step()
    engine.step()
    engine.abort(rid)
    outs = engine.step()
    assert any(o.finish_reason == "abort" for o in outs) and engine.num_running == 0
    with pytest.raises(ValueError, match="exceeds the engine's context of 32"):
        engine.add_request([1] * 30, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match=r"out of range \[0, 97\): \[500\]"):
        engine.add_request([1, 500])
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)


def test_n_samples_continue_the_same_prompt_greedily():
    model = tiny_model()
    engine = Engine(model, max_seq_len=64)
    outs = engine.generate([[4, 5, 6], [7, 8]], SamplingParams(temperature=0, max_tokens=6, n=3))
    for prompt, group in zip([[4, 5, 6], [7, 8]], outs):
        for c in group:       # a sample whose prompt KV was copied, not computed, decodes the same
            assert c.token_ids == reference_greedy(model, prompt, 6)


def test_requests_sharing_a_prefix_added_together_compute_it_once():
    model = tiny_model()
    engine = Engine(model, max_seq_len=64, block_size=4, prefill_chunk=64)
    system = list(range(40, 50))                                                  # 2 full blocks + 2 tokens
    prompts = [system + [i] for i in range(1, 6)] + [[7, 8, 9, 10, 11]]           # the last shares nothing
    greedy = SamplingParams(temperature=0, max_tokens=5)
    outs = engine.generate(prompts, greedy)
    for p, (c,) in zip(prompts, outs):
        assert c.token_ids == reference_greedy(model, p, 5)
    # the first request computes all 11 tokens; the other four wait a step and reuse 8 of theirs
    assert engine.stats["prefix_cache_hit_tokens"] == 4 * 8
    assert engine.stats["prefill_tokens"] == 11 + 4 * 3 + 5
