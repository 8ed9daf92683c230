"""Shared training maths against plain references: log-probs, masked reductions, schedule, RNG state and
checkpoints (an optimizer restored from one continues exactly like the one that never stopped)."""
import json
import math
import random

import numpy as np
import pytest
import torch

from rftkit.loading.checkpoint import (get_rng_state, latest_checkpoint, load_checkpoint, save_checkpoint,
                                       set_rng_state, set_seed)
from rftkit.logprobs import hidden_logprobs, masked_mean, masked_sum, token_logprobs
from rftkit.lr_schedule import lr_at
from rftkit.metrics import MetricsLog, plot_curves


def test_token_logprobs_equal_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(3, 7, 50, generator=g) * 4, torch.randint(0, 50, (3, 7), generator=g)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets, chunk=4).double(), ref, atol=1e-5)


@pytest.fixture(params=["kernel", "torch"])
def kernel_or_torch(request):
    """hidden_logprobs on the CPU softmax kernel (when it builds) and on the torch path."""
    from rftkit import kernels
    kernels.set_enabled(request.param == "kernel")
    yield request.param
    kernels.set_enabled(True)


@pytest.mark.parametrize("recompute", [False, True])
def test_hidden_logprobs_values_and_gradients(recompute, kernel_or_torch):
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 40, bias=False)
    h = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (2, 9), generator=g)
    w = torch.randn(2, 9, generator=g)
    ref = torch.log_softmax(head(h) / 0.7, -1).gather(-1, t[..., None]).squeeze(-1)
    ref_grads = torch.autograd.grad((ref * w).sum(), [h, head.weight])
    got = hidden_logprobs(h, t, head, chunk=5, temperature=0.7, recompute=recompute)
    grads = torch.autograd.grad((got * w).sum(), [h, head.weight], retain_graph=True)
    again = torch.autograd.grad((got * w).sum(), [h, head.weight])          # a second backward of one graph
    assert torch.allclose(got, ref, atol=1e-6)
    for a, b, c in zip(grads, ref_grads, again):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(c, b, atol=1e-6)


@pytest.mark.parametrize("recompute", [False, True])
def test_hidden_logprobs_entropy_equals_the_distributions_entropy(recompute, kernel_or_torch):
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(16, 40, bias=False)
    h = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (2, 9), generator=g)
    logp, ent = hidden_logprobs(h, t, head, chunk=5, temperature=0.7, recompute=recompute, with_entropy=True)
    dist = torch.softmax(head(h).double() / 0.7, -1)
    assert torch.allclose(ent.double(), -(dist * dist.log()).sum(-1), atol=1e-5) and not ent.requires_grad
    assert torch.allclose(logp, hidden_logprobs(h, t, head, chunk=5, temperature=0.7), atol=1e-6)
    logp.sum().backward()                                        # the log-probs keep their gradient path
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_hidden_logprobs_workspace_is_not_reused_while_a_graph_keeps_it(kernel_or_torch):
    """The logits workspace kept with the lm_head: a second graph built before the first one's backward, and a
    no-grad call in between, must not overwrite what the first keeps; after the backwards it is reused."""
    import rftkit.logprobs as tu
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 40, bias=False)
    h1, h2 = (torch.randn(11, 16, generator=g, requires_grad=True) for _ in range(2))
    t1, t2 = (torch.randint(0, 40, (11,), generator=g) for _ in range(2))

    def ref_grad(h, t):
        return torch.autograd.grad(torch.log_softmax(head(h), -1).gather(-1, t[:, None]).sum(), h)[0]
    a = hidden_logprobs(h1, t1, head, chunk=4)
    b = hidden_logprobs(h2, t2, head, chunk=4)
    with torch.no_grad():
        hidden_logprobs(h2 * 3, t1, head, chunk=4)
    a.sum().backward()
    b.sum().backward()
    assert torch.allclose(h1.grad, ref_grad(h1, t1), atol=1e-6) and torch.allclose(h2.grad, ref_grad(h2, t2), atol=1e-6)
    ws = tu._workspaces[head]
    before = ws.buf.data_ptr()
    hidden_logprobs(h1, t1, head, chunk=4).sum().backward()
    assert ws.buf.data_ptr() == before                       # free again: the same buffer, no new allocation


def test_keep_freed_memory_takes_on_glibc():
    import platform
    from rftkit.memory import keep_freed_memory
    ok = keep_freed_memory()
    assert keep_freed_memory() is ok                         # once per process
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert ok


def test_hidden_logprobs_recomputes_by_default_only_above_the_byte_limit(monkeypatch):
    """Default: keep the chunk logits for backward while N·V·4 bytes <= RECOMPUTE_BYTES (each chunk computed
    once), recompute them in backward above it (each chunk computed twice)."""
    import rftkit.logprobs as tu
    calls = {"n": 0}
    real = tu._chunk_logits

    def counted(*args):
        calls["n"] += 1
        return real(*args)
    monkeypatch.setattr(tu, "_chunk_logits", counted)
    head = torch.nn.Linear(8, 40, bias=False)
    h, t = torch.randn(12, 8, requires_grad=True), torch.randint(0, 40, (12,))
    for limit, expected in ((12 * 40 * 4, 3), (12 * 40 * 4 - 1, 6)):      # 3 chunks of 5, 5, 2 rows
        monkeypatch.setattr(tu, "RECOMPUTE_BYTES", limit)
        calls["n"] = 0
        hidden_logprobs(h, t, head, chunk=5).sum().backward()
        assert calls["n"] == expected, (limit, calls["n"])


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert masked_sum(x, m) == 1 + 2 + 6 and masked_mean(x, m) == pytest.approx(9 / 3)
    assert masked_mean(x, m, dim=1).tolist() == [1.5, 6.0] and masked_sum(x, m, dim=0).tolist() == [1, 2, 6]
    assert masked_mean(x, torch.zeros_like(m)) == 0            # empty mask: 0, not nan


def test_lr_schedule():
    assert [lr_at(s, 1.0, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 1.0, 4, 20) == pytest.approx(1.0)
    assert lr_at(12, 1.0, 4, 20, min_ratio=0.0) == pytest.approx(0.5)           # half-way down the cosine
    assert lr_at(20, 1.0, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(9, 2.0, 4, None) == 2.0


def _draw():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randn(1).item())


def test_rng_state_round_trips_through_json():
    set_seed(5)
    _draw()
    state = json.loads(json.dumps(get_rng_state()))
    expected = _draw()
    set_seed(99)
    _draw()
    set_rng_state(state)
    assert _draw() == expected
    set_seed(5)
    a = _draw()
    set_seed(5)
    assert _draw() == a


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)                                       # frozen: not in the checkpoint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    return model, opt


def _steps(model, opt, start, n):
    for s in range(start, start + n):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()


def test_checkpoint_resume_is_exact(tmp_path):
    model, opt = _model_and_opt()
    _steps(model, opt, 0, 3)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {"offset": 12 * step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002", "step-0000003"]   # last 2, no temp dirs
    files = sorted(p.name for p in latest_checkpoint(tmp_path).iterdir())
    assert files == ["optimizer.safetensors", "state.json", "weights.safetensors"]
    after_save = torch.rand(2)
    _steps(model, opt, 3, 4)

    fresh, fresh_opt = _model_and_opt()
    torch.manual_seed(123)
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert state["step"] == 3 and state["offset"] == 36
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(2), after_save)
    assert not torch.equal(fresh[2].weight, model[2].weight)
    _steps(fresh, fresh_opt, 3, 4)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_metrics_log_and_curve(tmp_path):
    log = MetricsLog(tmp_path / "m" / "metrics.jsonl")
    for s in range(1, 4):
        log.write({"step": s, "loss": 1 / s})
    rows = MetricsLog(tmp_path / "m" / "metrics.jsonl").read()
    assert [r["loss"] for r in rows] == [1, 0.5, 1 / 3]
    png = plot_curves(rows, "step", ["loss"], tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_asked_for_without_the_package_fails_naming_the_install(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tensorboard", None)        # as if not installed
    with pytest.raises(ValueError, match="pip install tensorboard"):
        MetricsLog(tmp_path / "metrics.jsonl", report_to=["tensorboard"])
