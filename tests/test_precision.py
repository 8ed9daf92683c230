"""--dtype bf16, --grad-checkpointing and --base-bits 4 (QLoRA), each against a reference: a bf16 base against
fp32 within tolerance, checkpointed gradients against plain ones, QLoRA's gradients against LoRA's over the
dequantized int4 base (an fp32 model built from the dequantized weights)."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import rftkit.compress.quantize  # noqa: F401  registers the base quantizer with rftkit.precision
from rftkit.cli import main
from rftkit.compress.quantize import QuantLinear
from rftkit.grpo import GRPOConfig, Rollouts, grpo_update, train
from rftkit.lora import LoRAConfig, apply_lora, lora_modules, lora_parameters
from rftkit.precision import adapter_to_fp32, prepare_base, resolve_device
from rftkit.sft import SFTConfig, batch_backward
from tests.conftest import grpo_config, grpo_setup, tiny_model

PROMPTS = [[5, 6, 7, 8], [1, 2], [9, 10, 11]]
COMPLETIONS = [[12, 13, 14], [15], [16, 17], [18, 19], [20], [21, 22, 23], [24, 25, 26, 27], [28, 29], [30]]
REWARDS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.5, 1.0]])


def _batch() -> Rollouts:
    return Rollouts(PROMPTS, COMPLETIONS, REWARDS, [[0.0] * len(c) for c in COMPLETIONS], [False] * 9)


def _with_lora(model: nn.Module) -> nn.Module:
    apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    adapter_to_fp32(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)                           # B != 0: the adapter changes the policy
    return model


def _update(model: nn.Module, beta: float = 0.0, micro: int = 2) -> tuple[float, list[torch.Tensor]]:
    """The GRPO loss of _batch() and the LoRA gradients (no optimizer step, no clipping)."""
    cfg = GRPOConfig(group_size=3, prompts_per_step=3, max_tokens=4, grad_clip=0.0, beta=beta,
                     micro_batch_groups=micro, loss_type="dapo")
    params = lora_parameters(model)
    st = grpo_update(model.train(), torch.optim.SGD(params, lr=0.0), _batch(), cfg, step_optimizer=False)
    return st["loss"], [p.grad.clone() for p in params]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_a_bf16_base_gives_the_fp32_loss_and_gradients_within_bf16_rounding(beta):
    ref = _with_lora(tiny_model(seed=1))
    low = copy.deepcopy(ref)
    for name, p in low.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    assert low.model.layers[0].self_attn.q_proj.base.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_parameters(low))      # the adapter stays fp32
    loss32, g32 = _update(ref, beta)
    loss16, g16 = _update(low, beta)
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32) + 1e-3      # (on-policy, its value is the advantages')
    assert any(not torch.equal(a, b) for a, b in zip(g16, g32))  # the bf16 path really ran in bf16
    assert len(g16) == len(g32) and all(g.dtype == torch.float32 for g in g16)
    errors = [_rel(a, b) for a, b in zip(g16, g32) if b.norm() > 0]
    assert max(errors) < 0.05, errors                  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_checkpointed_grpo_gradients_equal_the_plain_ones(beta):
    plain = _with_lora(tiny_model(seed=1))
    ckpt = copy.deepcopy(plain)
    prepare_base(ckpt, grad_checkpointing=True)
    calls = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        block = model.model.layers[1]
        block.forward = lambda *a, run=block.forward, name=name: calls.update({name: calls.get(name, 0) + 1}) or run(*a)
    loss_p, g_p = _update(plain, beta)
    loss_c, g_c = _update(ckpt, beta)
    # prompt and completion passes re-run in backward (through the KV cache); the KL reference (no grad) does not
    assert calls["ckpt"] - calls["plain"] == (calls["plain"] if beta == 0 else calls["plain"] // 2)
    assert loss_c == pytest.approx(loss_p, rel=1e-6)
    for a, b in zip(g_c, g_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_checkpointing_recomputes_the_blocks_instead_of_keeping_them():
    """The checkpointed forward runs each block twice (once more in backward) and gives the same SFT gradient
    over packed sequences (the path without a KV cache)."""
    plain = _with_lora(tiny_model(seed=3))
    ckpt = copy.deepcopy(plain)
    prepare_base(ckpt, grad_checkpointing=True)
    calls, block = [], ckpt.model.layers[0]
    block.forward = lambda *a, run=block.forward: calls.append(1) or run(*a)
    examples = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([6, 7, 8], [0, 1, 1]), ([9, 10, 11, 12], [0, 0, 0, 1])]
    grads = []
    for model in (plain, ckpt):
        model.train()
        st = batch_backward(model, examples, micro_batch=2)
        grads.append(([p.grad.clone() for p in lora_parameters(model)], st["nll_sum"]))
    assert len(calls) == 4                               # 2 micro-batches x (forward + recompute)
    assert grads[1][1] == pytest.approx(grads[0][1], rel=1e-6)
    for a, b in zip(grads[1][0], grads[0][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_qlora_gradients_equal_lora_over_the_dequantized_base():
    """Exact, as autograd multiplies the dequantized weight. (With beta > 0 the KL reference is computed without
    autograd, where a few rows take the int4 kernel with int8-rounded activations: ~0.5% off, not compared.)"""
    original = tiny_model(seed=4)
    q = copy.deepcopy(original)
    prepare_base(q, base_bits=4)
    quantized = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 2 * 7 and not isinstance(q.lm_head, QuantLinear)    # q,k,v,o,gate,up,down per layer
    assert all(m.bits == 4 for m in quantized.values())
    ref = copy.deepcopy(original)                        # fp32 nn.Linear layers holding the int4 grid's values
    with torch.no_grad():
        for name, m in quantized.items():
            lin = ref.get_submodule(name)
            assert not torch.equal(lin.weight, m.dequantize())     # int4 really changed the weights
            lin.weight.copy_(m.dequantize())
    _with_lora(q)
    _with_lora(ref)
    with torch.no_grad():
        for (nq, pq), (nr, pr) in zip(lora_modules(q).items(), lora_modules(ref).items()):
            assert nq == nr
            pr.lora_A.copy_(pq.lora_A)
            pr.lora_B.copy_(pq.lora_B)
    assert isinstance(lora_modules(q)["model.layers.0.mlp.up_proj"].base, QuantLinear)
    loss_q, g_q = _update(q)
    loss_r, g_r = _update(ref)
    assert loss_q == pytest.approx(loss_r, rel=1e-5)
    for a, b in zip(g_q, g_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_base_bits_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="base_bits must be one of .* got 3"):
        GRPOConfig(base_bits=3)
    with pytest.raises(ValueError, match="dtype fp32"):
        GRPOConfig(base_bits=4, dtype="bf16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        SFTConfig(data="x.jsonl", dtype="fp16")
    with pytest.raises(ValueError, match="--full"):
        SFTConfig(data="x.jsonl", base_bits=4, full=True)
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or auto, got 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device("cuda", local_rank=1)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_model()
    prepare_base(model, base_bits=4)
    with pytest.raises(ValueError, match="quantized already"):
        prepare_base(model, base_bits=4)


@pytest.mark.parametrize("flags", [dict(base_bits=4, grad_checkpointing=True), dict(dtype="bf16")])
def test_rft_train_runs_with_the_precision_flags(tmp_path, tok_dir, tiny_folder, flags):
    """Loaded from a folder (so the flags act on the load), rollouts through the engine, two steps."""
    _, tok, task = grpo_setup(tok_dir)
    seen = {}
    res = train(grpo_config(tmp_path / "run", steps=2, model=str(tiny_folder), **flags), None, tok, task,
                progress=False, summary=False, on_step=lambda s, row: seen.update({s: row}))
    assert res["steps"] == 2 and sorted(seen) == [1, 2]
    assert all(0 <= seen[s]["reward"] <= 1 for s in seen)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_rft_sft_and_train_take_the_flags_from_the_command_line(tmp_path, tiny_folder):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "completion": str(i + 1), "answer": str(i + 1)}) + "\n"
                            for i in range(6)))
    common = ["--model", str(tiny_folder), "--lora-r", "4", "--base-bits", "4", "--grad-checkpointing",
              "--device", "cpu", "--steps", "1"]
    assert main(["sft", "--data", str(data), "--output", str(tmp_path / "sft"), "--batch-size", "2", *common]) == 0
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "rft"), "--prompts-per-step", "2",
                 "--group-size", "2", "--max-tokens", "4", *common]) == 0
    for run in ("sft", "rft"):
        saved = json.loads((tmp_path / run / "config.json").read_text())
        assert (saved["base_bits"], saved["grad_checkpointing"], saved["device"]) == (4, True, "cpu"), run
        assert (tmp_path / run / "adapter" / "adapter_model.safetensors").is_file()


def _moe_model() -> nn.Module:
    from dataclasses import asdict

    from rftkit.model import ModelConfig, Transformer
    from rftkit.moe import MoEConfig
    torch.manual_seed(5)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                    ffn_dim=32, moe=asdict(MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=16))))
    apply_lora(model, LoRAConfig(r=2, targets=["all-linear", "experts.gate_up_proj"]))
    adapter_to_fp32(model)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("change", ["checkpointing", "bf16"])
def test_moe_with_expert_lora_under_checkpointing_and_bf16(change):
    """The MoE balancing losses survive checkpointing (taken from the first run of each block, not doubled by
    the re-run): loss and gradients equal. bf16: the expert LoRA (a parameter wrapper) adds its fp32 delta to
    bf16 expert weights and the loss stays within bf16 rounding; its gradients are NOT compared: on this MoE
    they differ from fp32 by 40-120% (even with top_k = n_experts), against 2-7% on the dense model: an open
    question about the MoE layer in bf16, reported, not hidden by a loose tolerance."""
    ref = _moe_model()
    other = copy.deepcopy(ref)
    if change == "checkpointing":
        prepare_base(other, grad_checkpointing=True)
    else:
        for name, p in other.named_parameters():
            if "lora_" not in name:
                p.data = p.data.to(torch.bfloat16)
    examples = [([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 1, 1]), ([7, 8, 9], [0, 1, 1])]
    out = []
    for model in (ref, other):
        model.train()
        _, aux = model(torch.tensor([[1, 2, 3, 4]]))
        st = batch_backward(model, examples, micro_batch=1)
        out.append((sorted(aux), float(sum(aux.values()).detach()), st["nll_sum"],
                    [p.grad for p in lora_parameters(model)]))
    (keys_r, aux_r, nll_r, g_r), (keys_o, aux_o, nll_o, g_o) = out
    assert keys_r == keys_o and keys_r                    # the model does report balancing losses
    tol = 1e-6 if change == "checkpointing" else 2e-2
    assert aux_o == pytest.approx(aux_r, rel=tol) and nll_o == pytest.approx(nll_r, rel=tol)
    assert all(g is not None for g in g_o) and len(g_o) == len(g_r)
    assert all(bool(torch.isfinite(g).all()) and g.dtype == torch.float32 for g in g_o)
    if change == "checkpointing":
        errors = [_rel(a, b) for a, b in zip(g_o, g_r) if b.norm() > 0]
        assert max(errors) < 1e-5, errors


def test_a_qlora_forward_keeps_no_fp32_copy_of_the_base_weights_for_backward():
    """Autograd saved each layer's dequantized fp32 weight until backward: a whole fp32 model per forward, and
    QLoRA's peak memory above LoRA's. Backward now dequantizes again; the graph keeps only activations."""
    model = _with_lora(prepare_base(tiny_model(seed=4), base_bits=4))
    weights = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantLinear)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        logits, _ = model.train()(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    assert saved and not [s for s, d in saved if s in weights and d == torch.float32]
    logits.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
