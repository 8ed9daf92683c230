"""The adapter bank against independent references: per row, a model with W + (alpha/r) B A merged."""
import copy

import pytest
import torch

from rftkit.peft_format import AdapterConfig, write_adapter
from rftkit.engine import Engine
from rftkit.lora import LoRAConfig, apply_lora, lora_modules
from rftkit.sampling import SamplingParams
from tests.conftest import reference_greedy, tiny_model

TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"],
           ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]


def make_adapters(model, root, ranks=(2, 4, 8, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    paths = {}
    for i, (r, targets) in enumerate(zip(ranks, TARGETS)):
        cfg = AdapterConfig(r=r, lora_alpha=2 * r + i, target_modules=targets, use_rslora=i == 3)
        weights = {}
        for path, m in model.named_modules():
            if path.rsplit(".", 1)[-1] in targets:
                weights[path] = (torch.randn(r, m.in_features, generator=g) * 0.3,
                                 torch.randn(m.out_features, r, generator=g) * 0.3)
        write_adapter(root / f"a{i}", cfg, weights)
        paths[f"a{i}"] = (root / f"a{i}", cfg, weights)
    return paths


def merged(model, cfg, weights):
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for path, (A, B) in weights.items():
            mods[path].weight.add_(cfg.scaling(path) * (B @ A))
    return m


def test_mixed_batch_of_four_adapters_equals_merged_models_row_for_row(tmp_path):
    model = tiny_model()
    adapters = make_adapters(model, tmp_path)
    refs = [model] + [merged(model, cfg, w) for _, cfg, w in adapters.values()]
    engine = Engine(model, max_seq_len=64, adapter_slots=4)
    for name, (path, _, _) in adapters.items():
        engine.adapters.register(name, path)
    slots = [engine.adapters.acquire(n) for n in adapters]
    # rows: base, a0..a3, a2 again, base — one forward through the bank
    row_slots = [0] + slots + [slots[2], 0]
    row_refs = [refs[0]] + refs[1:] + [refs[3], refs[0]]
    ids = torch.randint(0, 97, (len(row_slots), 7), generator=torch.Generator().manual_seed(1))
    engine.adapters.set_rows(row_slots)
    with torch.no_grad():
        got, _ = model(ids)
    engine.adapters.set_rows(None)
    for i, ref in enumerate(row_refs):
        with torch.no_grad():
            want, _ = ref(ids[i:i + 1])
        assert torch.allclose(got[i], want[0], atol=1e-4), i
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], refs[0](ids)[0], atol=1e-6)      # no rows set: the base model


def test_engine_greedy_per_row_adapter_equals_merged_reference(tmp_path):
    model = tiny_model()
    adapters = make_adapters(model, tmp_path)
    refs = {n: merged(model, cfg, w) for n, (_, cfg, w) in adapters.items()} | {None: copy.deepcopy(model)}
    engine = Engine(model, max_seq_len=64, adapter_slots=2)           # fewer slots than adapters: LRU at work
    for name, (path, _, _) in adapters.items():
        engine.adapters.register(name, path)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [1, 2], [3, 4, 5]]
    names = ["a0", "a1", None, "a3", "a2"]
    rids = [engine.add_request(p, greedy, adapter=n) for p, n in zip(prompts, names)]
    got = {r: [] for r in rids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
        assert sum(engine.adapters.pins) <= engine.num_running
    for rid, p, n in zip(rids, prompts, names):
        assert got[rid] == reference_greedy(refs[n], p, 6), n
    assert engine.adapters.stats["loads"] >= 4 and engine.adapters.stats["evictions"] >= 2


def test_adapter_errors_and_live_binding(tmp_path):
    model = tiny_model()
    trainer = apply_lora(copy.deepcopy(model), LoRAConfig(r=4, targets=["all-linear"]))
    engine = Engine(model, max_seq_len=64, adapter_slots=2)
    with pytest.raises(KeyError, match="'nope' is not registered"):
        engine.add_request([1, 2], adapter="nope")
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        engine.adapters.register("x", tmp_path)
    wrong = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 5), torch.zeros(32, 2))}
    write_adapter(tmp_path / "bad", AdapterConfig(r=2, target_modules=["q_proj"]), wrong)
    with pytest.raises(ValueError, match="is 32x32 in the model but the adapter has lora_A"):
        engine.adapters.register("bad", tmp_path / "bad")
    # a slot bound to a trainer's live LoRA tensors follows their updates, with no copy
    live = lora_modules(trainer)
    slot = engine.adapters.bind_live("live", live)
    with torch.no_grad():
        for m in live.values():
            m.lora_B.normal_()
    ids = torch.tensor([[3, 4, 5, 6]])
    engine.adapters.set_rows([slot])
    with torch.no_grad():
        got, _ = model(ids)
        want, _ = trainer(ids)
    engine.adapters.set_rows(None)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, model(ids)[0], atol=1e-3)


def test_live_adapter_updated_in_place_invalidates_the_prefix_cache():
    model = tiny_model()
    trainer = apply_lora(copy.deepcopy(model), LoRAConfig(r=4, targets=["all-linear"]))
    live = lora_modules(trainer)
    with torch.no_grad():
        for m in live.values():
            m.lora_B.normal_(std=0.3)
    engine = Engine(model, max_seq_len=64, block_size=4, adapter_slots=2)
    engine.adapters.bind_live("live", live)
    prompt = list(range(20, 30)) + [1]
    greedy = SamplingParams(temperature=0, max_tokens=6)

    def run():
        engine.add_request(prompt, greedy, adapter="live")
        got = []
        while engine.has_unfinished():
            for out in engine.step():
                got += out.token_ids
        return got

    assert run() == reference_greedy(trainer, prompt, 6)
    assert run() == reference_greedy(trainer, prompt, 6) and engine.stats["prefix_cache_hit_tokens"] == 8
    with torch.no_grad():                                  # an optimizer step on the trainer's tensors
        for m in live.values():
            m.lora_B.mul_(-1.0)
    assert run() == reference_greedy(trainer, prompt, 6)   # recomputed, not served from stale blocks
    assert engine.stats["prefix_cache_hit_tokens"] == 8


def test_adapter_that_fails_to_load_fails_only_its_request(tmp_path):
    """An adapter whose files vanished after registration: its request finishes with finish_reason "error"
    and the reason, the request beside it completes, and nothing stays pinned or allocated."""
    import shutil
    model = tiny_model()
    adapters = make_adapters(model, tmp_path)
    engine = Engine(model, max_seq_len=64, adapter_slots=2)
    engine.adapters.register("gone", adapters["a0"][0])
    shutil.rmtree(adapters["a0"][0])
    greedy = SamplingParams(temperature=0, max_tokens=4)
    bad = engine.add_request([1, 2, 3], greedy, adapter="gone")
    good = engine.add_request([4, 5], greedy)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    failed = [o for o in outs if o.request_id == bad]
    assert len(failed) == 1 and failed[0].finished and failed[0].finish_reason == "error"
    assert "adapter 'gone' could not be loaded" in failed[0].error
    assert [t for o in outs if o.request_id == good for t in o.token_ids] == reference_greedy(model, [4, 5], 4)
    assert sum(engine.adapters.pins) == 0 and engine.kv_blocks_used == 0


def test_a_decode_step_with_bank_adapters_runs_in_one_call_as_op_by_op(tmp_path, monkeypatch):
    """Rows on four adapters of different ranks and targets, and on none, decode through the one-call stack
    (kernels.decode_layers with the bank's slot tables) with the logits of the blocks run op by op."""
    from rftkit import decode_stack
    from rftkit import kernels
    if not kernels.available():
        pytest.skip(kernels.status())
    base = tiny_model()
    adapters = make_adapters(base, tmp_path)

    def run(fused: bool):
        model = copy.deepcopy(base)
        calls, seen = [], []
        real, orig = kernels.decode_layers, model.forward

        def counted(*a, **k):
            calls.append(real(*a, **k))
            return calls[-1]

        def spy(*a, **k):
            out = orig(*a, **k)
            seen.append(out[0].clone())
            return out
        monkeypatch.setattr(kernels, "decode_layers", counted)
        monkeypatch.setattr(model, "forward", spy)
        if not fused:
            monkeypatch.setattr(decode_stack, "run", lambda *a: False)
        engine = Engine(model, max_seq_len=64, adapter_slots=4)
        for name, (path, _, _) in adapters.items():
            engine.adapters.register(name, path)
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [1, 2], [3, 4, 5], [7]]
        for p, n in zip(prompts, ["a0", "a1", None, "a3", "a2", "a1"]):
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=4), adapter=n)
        while engine.has_unfinished():
            engine.step()
        monkeypatch.undo()
        return seen, calls
    fused, calls = run(True)
    plain, none = run(False)
    assert calls and all(calls) and not none
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _slot_is_empty(bank, slot) -> bool:
    return all(layer.slots.tensors[slot] is None for layer in bank.layers.values())


def test_a_load_that_fails_half_way_leaves_nothing_in_the_slot(tmp_path, monkeypatch):
    """The slot a failed load was writing is emptied: the next adapter placed there answers as itself, not with
    the failed one's weights in the modules it does not adapt."""
    model = tiny_model()
    adapters = make_adapters(model, tmp_path)
    engine = Engine(model, max_seq_len=64, adapter_slots=1)
    bank = engine.adapters
    for name, (path, _, _) in adapters.items():
        bank.register(name, path)
    q0, v0 = bank.layers["model.layers.0.self_attn.q_proj"], bank.layers["model.layers.0.self_attn.v_proj"]
    real, calls = q0.slots.set, []

    def counted(slot, A, B, scale, live=False):
        calls.append(slot)
        real(slot, A, B, scale, live)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory for this module's copy")
    monkeypatch.setattr(q0.slots, "set", counted)
    monkeypatch.setattr(v0.slots, "set", out_of_memory)
    with pytest.raises(MemoryError):
        bank.acquire("a3")                    # all-linear, modules in key order: q_proj is set, v_proj fails
    monkeypatch.undo()
    assert calls and _slot_is_empty(bank, 1) and bank.owner[1] is None
    greedy = SamplingParams(temperature=0, max_tokens=6)
    rid = engine.add_request([5, 6, 7], greedy, adapter="a2")          # gate/up/down only, in slot 1
    got = [t for _ in range(20) if engine.has_unfinished() for o in engine.step() if o.request_id == rid
           for t in o.token_ids]
    _, cfg, w = adapters["a2"]
    assert got == reference_greedy(merged(model, cfg, w), [5, 6, 7], 6)


def test_files_that_gained_modules_after_registration_do_not_leak_into_the_next_adapter(tmp_path):
    """An adapter registered with q/v whose files are replaced by an all-linear one before its slot load: that
    request fails (the files are not the version it was accepted for), and the slot stays clean for the next."""
    model = tiny_model()
    adapters = make_adapters(model, tmp_path)
    engine = Engine(model, max_seq_len=64, adapter_slots=1)
    engine.adapters.register("a0", adapters["a0"][0])
    engine.adapters.register("a2", adapters["a2"][0])
    import shutil
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapters["a3"][0] / f, adapters["a0"][0] / f)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    bad = engine.add_request([1, 2, 3], greedy, adapter="a0")
    outs = [o for _ in range(20) if engine.has_unfinished() for o in engine.step()]
    assert [o.finish_reason for o in outs if o.request_id == bad] == ["error"]
    assert "changed after the adapter was registered" in outs[0].error
    assert _slot_is_empty(engine.adapters, 1)
    rid = engine.add_request([5, 6, 7], greedy, adapter="a2")
    got = [t for _ in range(20) if engine.has_unfinished() for o in engine.step() if o.request_id == rid
           for t in o.token_ids]
    _, cfg, w = adapters["a2"]
    assert got == reference_greedy(merged(model, cfg, w), [5, 6, 7], 6)
    assert engine.adapters.stats["loads"] == 1


def test_any_exception_loading_an_adapter_at_admission_fails_only_its_request(tmp_path, monkeypatch):
    """Not only OSError / ValueError: a TypeError (what a string lora_alpha raised inside scaling()) while a
    request's adapter is loaded at admission fails that request; the engine steps on."""
    from rftkit.peft_format import AdapterConfig as Cfg
    model = tiny_model()
    adapters = make_adapters(model, tmp_path)
    engine = Engine(model, max_seq_len=64, adapter_slots=2)
    engine.adapters.register("a0", adapters["a0"][0])
    monkeypatch.setattr(Cfg, "scaling", lambda self, module: "16" / self.r)
    greedy = SamplingParams(temperature=0, max_tokens=4)
    bad = engine.add_request([1, 2, 3], greedy, adapter="a0")
    good = engine.add_request([4, 5], greedy)
    outs = [o for _ in range(20) if engine.has_unfinished() for o in engine.step()]
    assert [o.finish_reason for o in outs if o.request_id == bad] == ["error"]
    assert [t for o in outs if o.request_id == good for t in o.token_ids] == reference_greedy(model, [4, 5], 4)
    assert _slot_is_empty(engine.adapters, 1) and _slot_is_empty(engine.adapters, 2)
    assert sum(engine.adapters.pins) == 0 and engine.kv_blocks_used == 0


def test_aborting_thousands_of_requests_is_one_pass():
    """An abort drops all of a request's prompts in one pass over the queue (it was one rebuild per prompt:
    quadratic in a 64-prompt x thousands-queued server)."""
    import time
    model = tiny_model()
    engine = Engine(model, max_seq_len=64, max_batch=4)
    rids = [engine.add_request([1, 2, 3], SamplingParams(max_tokens=2)) for _ in range(20000)]
    engine.step()                                                   # some running, most waiting
    t = time.perf_counter()
    engine.abort(rids[::2])
    engine.abort(rids[1::2])
    assert time.perf_counter() - t < 1.0
    assert not engine.has_unfinished()
    assert engine.kv_blocks_used == 0
