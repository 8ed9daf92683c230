"""The engine against plain references: argmax over a full forward, log_softmax of full logits."""
import pytest
import torch

from rftkit.engine import Engine
from rftkit.sampling import SamplingParams
from tests.conftest import reference_greedy, tiny_model


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


def test_a_request_waiting_for_a_prefix_in_flight_does_not_hold_up_the_queue():
    model = tiny_model()
    engine = Engine(model, max_seq_len=64, block_size=4, prefill_chunk=64)
    system = list(range(40, 50))                                                  # 2 full blocks + 2 tokens
    prompts = [system + [1], system + [2], [7, 8, 9, 10, 11], system + [3], [12, 13, 14, 15, 16, 17]]
    greedy = SamplingParams(temperature=0, max_tokens=4)
    rids = [engine.add_request(p, greedy) for p in prompts]
    got = {r: [] for r in rids}
    for out in engine.step():
        got[out.request_id] += out.token_ids
    # step 1 computes the first prompt and the two that share nothing with it; the two that share its prefix
    # keep their place at the head of the queue and start next step from the cache
    assert engine.stats["prefill_tokens"] == 11 + 5 + 6
    assert sorted(s.request_id for s in engine.running) == [rids[0], rids[2], rids[4]]
    assert [g[0].request_id for g in engine.waiting] == [rids[1], rids[3]]
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
    for rid, p in zip(rids, prompts):
        assert got[rid] == reference_greedy(model, p, 4)
    assert engine.stats["prefix_cache_hit_tokens"] == 2 * 8
    assert engine.stats["prefill_tokens"] == 11 + 5 + 6 + 2 * 3


def test_a_prefill_of_mixed_lengths_is_not_padded_to_the_longest(monkeypatch):
    from rftkit.engine import _padding_groups
    model = tiny_model()
    prompts = [list(range(1, 31)), list(range(2, 32))] + [[i, i + 1, i + 2] for i in range(3, 13)]
    shapes = []
    orig = model.forward

    def spy(ids, *a, **k):
        shapes.append(tuple(ids.shape))
        return orig(ids, *a, **k)
    monkeypatch.setattr(model, "forward", spy)
    outs = Engine(model, max_seq_len=64, prefill_chunk=512).generate(prompts, SamplingParams(temperature=0, max_tokens=3))
    monkeypatch.undo()
    for p, (c,) in zip(prompts, outs):
        assert c.token_ids == reference_greedy(model, p, 3)
    prefill = [b * t for b, t in shapes if t > 1]                 # one step prefills all 12, in two forwards
    assert len(prefill) == 2 and sum(prefill) == 4 * 30 + 8 * 3, shapes       # not 12 x 30 = 360
    for lengths in ([37, 37] + [5] * 15, [5, 37, 5, 37], [100, 80, 64, 51, 40, 30, 20, 10, 5], [7]):
        groups = _padding_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            real = sum(lengths[i] for i in g)
            assert max(lengths[i] for i in g) * len(g) - real <= max(0.25 * real, 64)


def _randomise_lora(model, std: float) -> None:
    """Draw the trainable (LoRA) parameters from N(0, std): B starts at zero, and the adapter must matter."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, std)


def _decode_logits(model, prompts, fused: bool, monkeypatch, max_batch: int = 8, every_step: bool = False):
    """Logits of the second decode step of each prompt (a batch of mixed lengths; every step's with every_step),
    with the block stack in one kernel call or op by op; and the rows of each fused call (0: it declined)."""
    from rftkit import decode_stack, kernels
    calls = []
    real = kernels.decode_layers

    def counted(*a, **k):
        ok = real(*a, **k)
        calls.append(a[0].shape[0] if ok else 0)         # the rows of each fused call; 0 = it declined
        return ok
    monkeypatch.setattr(kernels, "decode_layers", counted)
    if not fused:
        monkeypatch.setattr(decode_stack, "run", lambda *a: False)
    seen = []
    orig = model.forward

    def spy(*a, **k):
        out = orig(*a, **k)
        seen.append(out[0].clone())
        return out
    monkeypatch.setattr(model, "forward", spy)
    Engine(model, max_seq_len=128, max_batch=max_batch).generate(prompts, SamplingParams(temperature=0, max_tokens=3))
    monkeypatch.undo()
    return (seen if every_step else seen[-1]), calls


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "sliding_window": 4}])
def test_a_decode_step_in_one_kernel_call_equals_the_blocks_op_by_op(overrides, monkeypatch):
    from rftkit import kernels
    if not kernels.available():
        pytest.skip(kernels.status())
    model = tiny_model(seed=3, **overrides)
    prompts = [[3, 4, 5], list(range(10, 31)), [7]]
    fused, calls = _decode_logits(model, prompts, True, monkeypatch)
    plain, none = _decode_logits(model, prompts, False, monkeypatch)
    assert calls and all(calls) and not none
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # a parameter replaced (not written in place) is picked up: the kept plan is rebuilt
    with torch.no_grad():
        blk = model.model.layers[1]
        blk.mlp.up_proj.weight = torch.nn.Parameter(blk.mlp.up_proj.weight * 2)
    fused2, calls2 = _decode_logits(model, prompts, True, monkeypatch)
    plain2, _ = _decode_logits(model, prompts, False, monkeypatch)
    assert all(calls2) and not torch.allclose(fused2, fused)
    torch.testing.assert_close(fused2, plain2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [4, 16])            # 16: the expand's eight-outputs-at-once path
def test_unmerged_lora_rides_the_one_call_stack_and_what_it_cannot_take_goes_op_by_op(r, monkeypatch):
    from rftkit import kernels
    from rftkit.lora import LoRAConfig, apply_lora
    if not kernels.available():
        pytest.skip(kernels.status())
    model = tiny_model(seed=3, qkv_bias=True)
    apply_lora(model, LoRAConfig(r=r, targets=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]))
    _randomise_lora(model, 0.5)
    prompts = [[3, 4, 5], list(range(10, 31)), [7, 8]]
    fused, calls = _decode_logits(model, prompts, True, monkeypatch)
    plain, _ = _decode_logits(model, prompts, False, monkeypatch)
    assert calls and all(calls)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    outs = Engine(model, max_seq_len=128, max_batch=8).generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [o[0].token_ids for o in outs] == [reference_greedy(model, p, 6) for p in prompts]
    # a rank above the kernel's 64 is left to the per-op path, which still adds it
    big = tiny_model(seed=3)
    apply_lora(big, LoRAConfig(r=65, targets=["v_proj"]))
    _randomise_lora(big, 0.05)
    _, calls = _decode_logits(big, prompts, True, monkeypatch)
    assert not calls
    outs = Engine(big, max_seq_len=128, max_batch=8).generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [o[0].token_ids for o in outs] == [reference_greedy(big, p, 6) for p in prompts]


def test_a_large_batch_with_lora_decodes_in_one_call_as_op_by_op(monkeypatch):
    """Up to decode_max_rows() rows (64 where MKL does not win from 2 rows): 40 rows of mixed lengths through
    the one-call stack with a rank-16 LoRA equal the op-by-op blocks."""
    from rftkit import kernels
    from rftkit.lora import LoRAConfig, apply_lora
    if not kernels.available():
        pytest.skip(kernels.status())
    model = tiny_model(seed=4)
    apply_lora(model, LoRAConfig(r=16, targets=["all-linear"]))
    _randomise_lora(model, 0.3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (40,), generator=g)]
    fused, calls = _decode_logits(model, prompts, True, monkeypatch, max_batch=64, every_step=True)
    plain, _ = _decode_logits(model, prompts, False, monkeypatch, max_batch=64, every_step=True)
    widest = max(f.shape[0] for f in fused if f.shape[1] == 1)           # rows of the largest decode step
    assert widest > 16 and calls and all(calls)
    if kernels.decode_max_rows() >= widest:
        assert max(calls) == widest                                      # the widest step ran in one call
    else:                                                                # Intel AVX-512: wider steps op by op
        assert max(calls) <= kernels.decode_max_rows()
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_decode_stack_plan_is_built_once_and_kept_over_the_steps(monkeypatch):
    """The one-call stack's pointer tables are built at the first decode step and kept while nothing they were
    built from changes (later steps only check them); a module swapped in rebuilds them, and the new plan runs."""
    from rftkit import decode_stack, kernels
    from rftkit.lora import LoRAConfig, apply_lora
    if not kernels.available():
        pytest.skip(kernels.status())
    model = tiny_model(seed=3)
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj", "down_proj"]))
    builds, real = [], decode_stack._build
    monkeypatch.setattr(decode_stack, "_build", lambda *a: builds.append(real(*a)) or builds[-1])
    engine = Engine(model, max_seq_len=64, max_batch=4)
    prompts = [[3, 4, 5], [7, 8]]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert len(builds) == 1 and builds[0] is not None and builds[0][0] is None      # plain blocks with LoRA
    assert [o[0].token_ids for o in outs] == [reference_greedy(model, p, 6) for p in prompts]
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(32, 64)                      # a module swapped in
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert len(builds) == 2 and builds[1] is not None
    assert [o[0].token_ids for o in outs] == [reference_greedy(model, p, 6) for p in prompts]


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_model_with_lora_decodes_its_stack_in_one_call_as_op_by_op(bits, monkeypatch):
    from rftkit import kernels
    from rftkit.compress import quantize
    from rftkit.lora import LoRAConfig, apply_lora
    if not quantize.kernel_available():
        pytest.skip(quantize.kernel_status())
    model = tiny_model(seed=4, qkv_bias=True)
    quantize.quantize(model, bits=bits, group_size=32)
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
    _randomise_lora(model, 0.3)
    prompts = [[3, 4, 5], list(range(10, 31)), [7]]
    fused, calls = _decode_logits(model, prompts, True, monkeypatch)
    plain, none = _decode_logits(model, prompts, False, monkeypatch)
    assert calls == [] and none == []        # the quantized stack is not kernels.decode_layers
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    ran = []
    real = kernels.decode_layers_q
    monkeypatch.setattr(kernels, "decode_layers_q", lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    outs = Engine(model, max_seq_len=128, max_batch=8).generate(prompts, SamplingParams(temperature=0, max_tokens=5))
    assert ran and all(ran)
    assert [o[0].token_ids for o in outs] == [reference_greedy(model, p, 5) for p in prompts]
    # switching the adapter off is seen at once: the kept plan is rebuilt without it
    for m in model.modules():
        if hasattr(m, "enabled"):
            m.enabled = False
    off, _ = _decode_logits(model, prompts, True, monkeypatch)
    assert not torch.allclose(off, fused)
    plain_off, _ = _decode_logits(model, prompts, False, monkeypatch)
    torch.testing.assert_close(off, plain_off, rtol=1e-5, atol=1e-5)
