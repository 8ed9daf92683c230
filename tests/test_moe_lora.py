"""MoE models with LoRA on attention and experts: the per-expert formula by hand, save/load/merge, PEFT's
target_parameters files both ways (Mixtral in transformers), the engine's cached decode vs full-forward argmax,
and a GRPO run on a tiny upcycled model."""
import copy
from dataclasses import asdict

import pytest
import torch

from rftkit.lora import (LoRAConfig, LoRAParam, apply_lora, load_lora, lora_disabled, lora_modules, lora_parameters,
                         merge_lora, save_lora)
from rftkit.model import ModelConfig, Transformer
from rftkit.moe import Experts, MoEConfig, expert_spread

SMALL = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48, max_seq_len=256)
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))


def _moe(model_type="rftkit_moe", seed=0, **moe):
    torch.manual_seed(seed)
    mc = MoEConfig(**({"n_experts": 4, "top_k": 2, "expert_ffn_dim": 48} | moe))
    model = Transformer(ModelConfig(model_type=model_type, **SMALL, moe=asdict(mc)))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.1)
    return model.eval()


def _randomise(model, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _by_hand(base: Transformer, lora_model: Transformer) -> Transformer:
    """`base` with every adapter folded in by the per-expert formula W_e += s * B[:, e::E] @ A[e*R:(e+1)*R]
    (PEFT's layout: A expert-major rows, B rank-major columns), written independently of LoRAParam.delta."""
    ref = copy.deepcopy(base)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for path, m in lora_modules(lora_model).items():
            if isinstance(m, LoRAParam):
                stripped = path.replace(".base_layer", "")
                W = params[f"{stripped}.{m.param_name}"]
                E, R = W.shape[0], m.r
                for e in range(E):
                    W[e] += m.scaling * m.lora_B[:, e::E] @ m.lora_A[e * R:(e + 1) * R]
            else:
                params[f"{path}.weight"] += m.scaling * m.lora_B @ m.lora_A
    return ref


def test_all_linear_covers_attention_and_experts_and_equals_the_formula():
    model = _moe()
    base = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(IDS)[0]
    apply_lora(model, LoRAConfig(r=2, alpha=6))
    mods = lora_modules(model)
    assert sorted(mods) == sorted([f"model.layers.{i}.self_attn.{n}" for i in (0, 1)
                                   for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
                                  + [f"model.layers.{i}.mlp.experts{s}" for i in (0, 1) for s in ("", ".base_layer")])
    inner, outer = mods["model.layers.0.mlp.experts.base_layer"], mods["model.layers.0.mlp.experts"]
    assert (inner.param_name, outer.param_name) == ("gate_up_proj", "down_proj")      # PEFT's nesting
    assert inner.lora_A.shape == (4 * 2, 32) and inner.lora_B.shape == (96, 4 * 2)      # [E*R, D], [2F, E*R]
    assert not any("gate.weight" in n for n, p in model.named_parameters() if p.requires_grad)   # routers stay
    with torch.no_grad():
        assert torch.equal(model(IDS)[0], expected)                                     # B = 0 at init
    _randomise(model)
    with torch.no_grad():
        got = model(IDS)[0]
        want = _by_hand(base, model)(IDS)[0]
        assert (got - want).abs().max() < 1e-5 and (got - expected).abs().max() > 1e-2
        with lora_disabled(model):
            assert torch.equal(model(IDS)[0], expected)
    loss = model(IDS)[0].logsumexp(-1).mean()                                          # gradients reach LoRA only
    loss.backward()
    assert inner.lora_A.grad.abs().sum() > 0 and outer.lora_B.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.experts.weight_param().grad is None


def test_save_load_merge_round_trip(tmp_path):
    model = _moe(seed=2)
    apply_lora(model, LoRAConfig(r=3, alpha=4, targets="q_proj,experts.down_proj"))
    assert sorted(lora_modules(model)) == [f"model.layers.{i}.{n}" for i in (0, 1)
                                           for n in ("mlp.experts", "self_attn.q_proj")]
    _randomise(model)
    save_lora(model, tmp_path / "ad")
    import json
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj"] and cfg["target_parameters"] == ["mlp.experts.down_proj"]
    fresh = _moe(seed=2)
    load_lora(fresh, tmp_path / "ad")
    with torch.no_grad():
        expected = model(IDS)[0]
        assert torch.equal(fresh(IDS)[0], expected)
        merge_lora(fresh)
        assert isinstance(fresh.model.layers[0].mlp.experts, Experts) and not lora_modules(fresh)
        assert (fresh(IDS)[0] - expected).abs().max() < 1e-5
    with pytest.raises(ValueError, match="dropout on expert tensors"):
        apply_lora(_moe(), LoRAConfig(dropout=0.1))
    with pytest.raises(ValueError, match="want E\\*r"):                   # an adapter for 4 experts on 3
        load_lora(_moe(n_experts=3), tmp_path / "ad")


def _mixtral_pair(tmp_path):
    import transformers
    from rftkit.loading import load_model
    cfg = transformers.MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                     num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    return hf, load_model(str(tmp_path / "base"))


def test_peft_reads_our_expert_adapter_and_we_read_peft_s(tmp_path):
    import peft
    hf, ours = _mixtral_pair(tmp_path)
    apply_lora(ours, LoRAConfig(r=2, alpha=4, targets="q_proj,v_proj,experts.gate_up_proj,experts.down_proj"))
    _randomise(ours)
    save_lora(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(IDS)[0]
        via_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()(IDS).logits
    assert (via_peft - expected).abs().max() < 1e-4 and (expected - _mixtral_pair(tmp_path)[1](IDS)[0]).abs().max() > 1e-2

    hf2, ours2 = _mixtral_pair(tmp_path)                   # PEFT's own file: gate_up_proj at rank 4, others 2
    lc = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"], init_lora_weights=False,
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                         rank_pattern={r".*\.gate_up_proj": 4}, alpha_pattern={r".*\.gate_up_proj": 3})
    pm = peft.get_peft_model(hf2, lc).eval()
    pm.save_pretrained(tmp_path / "theirs")
    load_lora(ours2, tmp_path / "theirs")
    assert lora_modules(ours2)["model.layers.1.mlp.experts.base_layer"].r == 4
    with torch.no_grad():
        assert (ours2(IDS)[0] - pm(IDS).logits).abs().max() < 1e-4


def test_engine_cached_decode_equals_full_forward_argmax_on_moe_with_lora():
    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    model = _moe(seed=4)
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    _randomise(model, std=0.3)
    prompts = [[3, 4, 5], list(range(10, 25)), [7]]
    outs = Engine(model, max_seq_len=128, max_batch=8).generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    for p, group in zip(prompts, outs):
        ids = list(p)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        assert group[0].token_ids == ids[len(p):]


@pytest.mark.slow
def test_grpo_on_a_tiny_upcycled_model_raises_reward_and_experts_diverge(tmp_path, tok_dir):
    import json
    from rftkit.grpo import GRPOConfig, train
    from rftkit.upcycle import upcycle_dense
    from rftkit.tasks import Task, arithmetic
    from rftkit.tokenizer import Tokenizer
    from tests.conftest import tiny_model

    def digit_share(completion: str, sample: dict) -> float:
        return sum(ch.isdigit() for ch in completion) / max(1, len(completion))

    task = Task("tiny", {k: v[:64] for k, v in arithmetic().problems.items()}, digit_share)
    model = upcycle_dense(tiny_model(vocab_size=258, max_seq_len=512), n_experts=4, top_k=2).eval()
    assert expert_spread(model) == 0.0
    cfg = GRPOConfig(output=str(tmp_path / "run"), steps=32, prompts_per_step=4, group_size=6, max_tokens=8, lr=3e-2,
                     lora_r=4, micro_batch_groups=4, seed=0, checkpoint_every=100, warmup_steps=1)
    train(cfg, model, Tokenizer.from_dir(tok_dir), task, progress=False)
    rewards = [json.loads(l)["reward"] for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    # a 258-byte vocabulary starts near 10/258 digits; seeds 0-2 reached 1.5-2.5x that in the last 16 of 32 steps
    first, last = sum(rewards[:8]) / 8, sum(rewards[-16:]) / 16
    assert last > 1.4 * first, rewards
    assert expert_spread(model) > 1e-2


def test_expert_lora_read_outside_autograd_follows_in_place_updates():
    from rftkit.lora import LoRAParam
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=32,
                                    moe=asdict(MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=16))))
    apply_lora(model, LoRAConfig(r=2, targets=["experts.gate_up_proj"]))
    wrap = next(m for m in model.modules() if isinstance(m, LoRAParam))
    with torch.no_grad():
        first = wrap.gate_up_proj
        assert wrap.gate_up_proj is first                       # kept while nothing changed
        wrap.lora_B.add_(0.5)                                   # an optimizer step is in place
        second = wrap.gate_up_proj
        torch.testing.assert_close(second, wrap.weight_param() + wrap.delta())
        assert not torch.equal(first, second)
    assert wrap.gate_up_proj.requires_grad                       # under autograd: recomputed, differentiable
