"""MoE layer: fast dispatch vs the reference loop, logits vs `transformers` (Mixtral, Qwen2-MoE, Qwen3-MoE) from
both checkpoint layouts, the LLaMA-4 MoE block vs transformers', balancing losses by hand, bias balancing,
upcycling."""
from dataclasses import asdict, replace

import pytest
import torch
import transformers

from rftkit.loading import load_model
from rftkit.loading.weights import build_model, read_weights, save_model_folder
from rftkit.model import MLP, KVCache, ModelConfig, Transformer
from rftkit.loading.hf import config_from_hf, config_to_hf, convert_hf_state_dict
from rftkit.moe import (MOE_PRESETS, MoEConfig, MoEFeedForward, balance_loss, experts_fast, experts_loop, expert_load,
                        moe_modules, route, update_router_bias, z_loss)
from rftkit.upcycle import upcycle_dense

SMALL = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=256)


def _moe_cfg(**moe) -> ModelConfig:
    return ModelConfig(model_type="rftkit_moe", **SMALL, moe=asdict(MoEConfig(**({"expert_ffn_dim": 48} | moe))))


# ----------------------------------------------------------------------------------------------------------
# fast dispatch == reference loop

DISPATCH_CASES = {
    "softmax-top2": dict(K=2, scale_input=False, capacity=None),
    "sigmoid-top1-scaled-input": dict(K=1, scale_input=True, capacity=None),
    "capacity-drops": dict(K=2, scale_input=False, capacity=5),
}


@pytest.mark.parametrize("case", list(DISPATCH_CASES))
def test_fast_dispatch_equals_loop_in_outputs_and_gradients(case):
    K, scale_input, capacity = DISPATCH_CASES[case].values()
    E, N, D, Fd = 6, 24, 16, 12
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    gate_up = (torch.randn(E, 2 * Fd, D, generator=g) * 0.3).requires_grad_()
    down = (torch.randn(E, D, Fd, generator=g) * 0.3).requires_grad_()
    used = torch.tensor([0, 1, 3, 4])                          # experts 2 and 5 get no tokens
    experts = used[torch.rand(N, 4, generator=g).argsort(-1)[:, :K]]            # K distinct experts per token
    weights = torch.rand(N, K, generator=g).requires_grad_()
    grad_out = torch.randn(N, D, generator=g)
    results = []
    for run in (experts_loop, experts_fast):
        out = run(x, weights, experts, gate_up, down, capacity, scale_input)
        grads = torch.autograd.grad((out * grad_out).sum(), [x, weights, gate_up, down])
        results.append((out, *grads))
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-5
    gu_grad = results[1][3]
    assert gu_grad[[2, 5]].abs().max() == 0 and gu_grad[[0, 1, 3, 4]].abs().min(-1).values.max() > 0
    if capacity is not None:       # assignments past the capacity really are dropped: no-capacity output differs
        counts = torch.bincount(experts.reshape(-1), minlength=E)
        assert counts.max() > capacity
        full = experts_loop(x, weights, experts, gate_up, down, None, scale_input)
        assert (full - results[0][0]).abs().max() > 1e-3


def test_module_dispatch_modes_agree_and_count_drops():
    torch.manual_seed(0)
    cfg = _moe_cfg(n_experts=4, top_k=2, shared_ffn_dim=24, shared_gate=True, capacity_factor=0.75)
    ffn = MoEFeedForward(cfg, MoEConfig(**cfg.moe))
    x = torch.randn(2, 10, 32)
    out_fast, aux_fast = ffn(x)
    ffn.mc = replace(ffn.mc, dispatch="loop")
    out_loop, aux_loop = ffn(x)
    assert (out_fast - out_loop).abs().max() < 1e-5 and aux_fast.keys() == {"moe_balance", "moe_z"}
    cap = -(-0.75 * 20 * 2 // 4)                          # ceil(c * N * K / E) = 8
    assert ffn.expert_counts.sum() == 40 and ffn.dropped == int((ffn.expert_counts - cap).clamp(min=0).sum())


# ----------------------------------------------------------------------------------------------------------
# logits equal transformers', from the fused (transformers 5 state_dict) and per-expert (hub) layouts

HF_CASES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=80, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=3,
                      mlp_only_layers=[1]),
    "qwen3_moe": dict(intermediate_size=80, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                      norm_topk_prob=True, head_dim=16),
}


def _reference(model_type: str):
    torch.manual_seed(0)
    extra = {"num_hidden_layers": 2} | HF_CASES[model_type]
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=64, **extra)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():   # spread the router logits (init std 0.02 leaves near-ties) and the biases (init 0)
        for name, p in ref.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "bias")):
                p.normal_(0, 0.5)
    return ref


def _hub_layout(model_type: str, fused: dict) -> dict:
    """The per-expert layout of the hub, synthesised from the fused tensors."""
    out = {}
    for k, v in fused.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            prefix, tensor = k.rsplit(".", 1)
            if model_type == "mixtral":
                prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
            names = (("w1", "w3") if model_type == "mixtral" else ("gate_proj", "up_proj")) \
                if tensor == "gate_up_proj" else (("w2",) if model_type == "mixtral" else ("down_proj",))
            for e in range(v.shape[0]):
                for name, block in zip(names, v[e].chunk(len(names))):
                    out[f"{prefix}.{e}.{name}.weight"] = block.clone()
        elif model_type == "mixtral" and ".mlp.gate." in k:
            out[k.replace(".mlp.", ".block_sparse_moe.")] = v
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("model_type", list(HF_CASES))
def test_logits_match_transformers_from_both_layouts(model_type, tmp_path):
    ref = _reference(model_type)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    ref.save_pretrained(tmp_path)
    cfg = config_from_hf(ref.config.to_dict())
    fused = {k: v.clone() for k, v in ref.state_dict().items()}
    hub = _hub_layout(model_type, fused)
    saved, _ = read_weights(tmp_path)                     # what transformers 5.24 writes: the hub layout
    assert saved.keys() == hub.keys() and all(torch.equal(saved[k], hub[k]) for k in hub)
    assert not any(k.endswith("gate_up_proj") for k in hub)
    for layout in (fused, saved):
        ours = build_model(cfg, convert_hf_state_dict(cfg, layout), "test")
        for dispatch in ("fast", "loop"):
            for m in moe_modules(ours).values():
                m.mc = replace(m.mc, dispatch=dispatch)
            with torch.no_grad():
                logits, aux = ours(ids)
                cache = KVCache(cfg.n_layers)
                first, _ = ours(ids[:, :7], cache=cache)
                second, _ = ours(ids[:, 7:], cache=cache)
            assert (logits - expected).abs().max() < 1e-4
            assert (torch.cat([first, second], 1) - expected).abs().max() < 1e-4
            assert set(aux) == {"moe_balance"}             # HF configs: z-loss off, balance from its coef
    if model_type == "qwen2_moe":                             # the dense layer and the shared gate are real
        assert isinstance(ours.model.layers[1].mlp, MLP) and len(moe_modules(ours)) == 2
        gate = ours.model.layers[0].mlp.shared_expert_gate.weight
        with torch.no_grad():
            gate.zero_()
            assert (ours(ids)[0] - expected).abs().max() > 1e-3
    if model_type == "mixtral":                               # no attention overrides needed: the loader works
        assert (load_model(str(tmp_path))(ids)[0] - expected).abs().max() < 1e-4


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_transformers_loads_what_we_save(model_type, tmp_path):
    ref = _reference(model_type)
    cfg = config_from_hf(ref.config.to_dict())
    ours = build_model(cfg, convert_hf_state_dict(cfg, ref.state_dict()), "test")
    save_model_folder(ours, tmp_path)                     # our layout = transformers' fused names
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)[0]).abs().max() < 1e-4


def test_our_moe_checkpoint_round_trips_through_the_loader(tmp_path):
    torch.manual_seed(0)
    cfg = _moe_cfg(**(MOE_PRESETS["llama4"] | dict(n_experts=4, shared_ffn_dim=24, bias_balancing=True)))
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    save_model_folder(model, tmp_path)
    back = load_model(str(tmp_path))
    ids = torch.randint(0, 97, (2, 9))
    assert back.cfg == config_from_hf(config_to_hf(cfg))
    assert torch.equal(back.model.layers[1].mlp.gate.e_score_correction_bias, torch.tensor([0.5, -0.5, 0.0, 1.0]))
    with torch.no_grad():
        assert torch.equal(back(ids)[0], model(ids)[0])


def test_configs_round_trip_through_hf_dicts():
    for model_type in HF_CASES:
        cfg = config_from_hf(_reference(model_type).config.to_dict())
        assert config_from_hf(config_to_hf(cfg)) == cfg
    cfg = replace(_moe_cfg(**MOE_PRESETS["llama4"]), qk_norm=True, qkv_bias=True)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(_reference("qwen2_moe").config.to_dict()).qkv_bias
    qwen3 = config_from_hf(_reference("qwen3_moe").config.to_dict())
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.moe["renormalize"]
    with pytest.raises(ValueError, match="llama4_text"):
        config_from_hf(transformers.AutoConfig.for_model("llama4_text").to_dict())


# ----------------------------------------------------------------------------------------------------------
# LLaMA 4: sigmoid top-1 scaling the expert input, ungated shared expert, interleaved dense layers

def test_llama4_moe_block_matches_transformers():
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model("llama4_text", hidden_size=32, intermediate_size=24,
                                               num_local_experts=4, num_experts_per_tok=1)
    block = Llama4TextMoe(hf_cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    cfg = _moe_cfg(**(MOE_PRESETS["llama4"] | dict(n_experts=4, expert_ffn_dim=24, shared_ffn_dim=24)))
    prefixed = {f"model.layers.1.feed_forward.{k}": v for k, v in block.state_dict().items()}
    ours = MoEFeedForward(cfg, MoEConfig(**cfg.moe))
    ours.load_state_dict({k.removeprefix("model.layers.1.mlp."): v
                          for k, v in convert_hf_state_dict(cfg, prefixed).items()})
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        expected, _ = block(x)
        assert (ours(x)[0] - expected.reshape(2, 10, 32)).abs().max() < 1e-5
    model = Transformer(cfg)                                              # moe_layers=[1, 3], 2 layers
    assert isinstance(model.model.layers[0].mlp, MLP) and list(moe_modules(model)) == [1]


# ----------------------------------------------------------------------------------------------------------
# balancing

def test_balance_loss_is_alpha_at_perfect_balance_and_matches_hand_and_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    E, K, alpha = 4, 2, 0.01
    base = torch.tensor([3.0, 2.0, -1.0, 0.5])
    logits = torch.stack([base.roll(t) for t in range(8)])      # each expert equally often, P uniform by symmetry
    _, experts = route(logits, MoEConfig(n_experts=E, top_k=K))
    assert torch.bincount(experts.reshape(-1)).tolist() == [4, 4, 4, 4]
    assert abs(balance_loss(logits, experts, alpha).item() - alpha) < 1e-7

    logits = torch.randn(7, E, generator=torch.Generator().manual_seed(0)) * 2
    _, experts = route(logits, MoEConfig(n_experts=E, top_k=K))
    f, P = [0.0] * E, [0.0] * E
    for t in range(7):
        probs = [float(v) for v in torch.exp(logits[t]) / torch.exp(logits[t]).sum()]
        for i in range(E):
            P[i] += probs[i] / 7
        for i in experts[t].tolist():
            f[i] += 1 / (7 * K)
    hand = alpha * E * sum(fi * pi for fi, pi in zip(f, P))
    assert abs(balance_loss(logits, experts, alpha).item() - hand) < 1e-7
    assert abs(load_balancing_loss_func((logits,), E, K).item() * alpha / K - hand) < 1e-7   # HF = k * ours
    lse = [float(torch.log(torch.exp(row).sum())) for row in logits]
    assert abs(z_loss(logits, 1e-3).item() - 1e-3 * sum(v * v for v in lse) / 7) < 1e-7


def test_aux_losses_sum_over_layers_and_reach_the_router():
    torch.manual_seed(0)
    model = Transformer(_moe_cfg(n_experts=4, top_k=2))
    ids = torch.randint(0, 97, (2, 8))
    _, aux = model(ids)
    per_layer = [m(torch.randn(1, 1, 32))[1] for m in moe_modules(model).values()]
    assert len(per_layer) == 2
    (aux["moe_balance"] + aux["moe_z"]).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().max() > 0
    assert {i: c.sum().item() for i, c in expert_load(model).items()} == {0: 2, 1: 2}   # last call: 1 token


def test_router_bias_update_moves_load_toward_balance():
    torch.manual_seed(0)
    cfg = _moe_cfg(n_experts=4, top_k=1, renormalize=False, bias_balancing=True)
    model = Transformer(cfg).train()
    ffn = model.model.layers[0].mlp
    x = torch.randn(1, 256, 32)
    with torch.no_grad():                                    # skew: expert 0 wins most tokens
        ffn.gate.weight[0] += 2 * x[0].mean(0) / x[0].mean(0).norm()
        ffn.gate.weight.mul_(3)
    spread = []
    for _ in range(60):
        with torch.no_grad():
            ffn(x)
        spread.append((ffn.expert_counts.max() - ffn.expert_counts.min()).item())
        update_router_bias(model, rate=0.01)
    assert spread[0] > 100 and max(spread[-10:]) < 0.2 * spread[0], spread      # sign steps end in a small cycle
    assert ffn.load_since_update.sum() == 0                 # counted per update, then reset
    weights, experts = route(ffn.gate(x[0]), ffn.mc, ffn.gate.e_score_correction_bias)
    assert torch.equal(weights, ffn.gate(x[0]).float().softmax(-1).gather(1, experts))   # bias: selection only
    assert "model.layers.0.mlp.gate.e_score_correction_bias" in model.state_dict()


# ----------------------------------------------------------------------------------------------------------
# sparse upcycling

@pytest.mark.parametrize("moe_layers", [None, [1]])
def test_upcycled_model_equals_dense_at_creation(moe_layers):
    torch.manual_seed(0)
    dense = Transformer(ModelConfig(**SMALL)).eval()
    moe = upcycle_dense(dense, n_experts=4, top_k=2, moe_layers=moe_layers)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected = dense(ids)[0]
        for dispatch in ("fast", "loop"):
            for m in moe_modules(moe).values():
                m.mc = replace(m.mc, dispatch=dispatch)
            assert (moe(ids)[0] - expected).abs().max() < 1e-4
    assert len(moe_modules(moe)) == (2 if moe_layers is None else 1)
    experts = moe.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(experts[0], experts[3]) and experts.stride(0) > 0        # copies, not a broadcast view
    assert moe.model.layers[1].mlp.gate.weight.std() > 0
