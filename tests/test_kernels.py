"""The decode kernels against torch references: F.linear, gathered masked softmax attention, per-slot LoRA."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from rftkit import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.status()}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 16, 21, 32])
@pytest.mark.parametrize("N,K", [(7, 16), (64, 40), (203, 96), (37, 1544)])   # K > 768: columns in blocks
def test_gemv_equals_f_linear(M, N, K):
    g = _gen(M * 1000 + N)
    x, W, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    for bias in (None, b):
        got = kernels.linear(x[:, None], W, bias)                   # [M, 1, N]: leading dims kept
        want = F.linear(x[:, None], W, bias)
        assert got.shape == want.shape
        tol = 1e-5 if K < 1000 else 1e-4                            # sums of K products, in another order
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


_LANES = (8, 16) if " avx512f" in kernels.build._cpuinfo() else (8,)


@contextlib.contextmanager
def _at_lanes(lanes: int):
    """The GEMV kernel at 8 or 16 lanes for the block, then back to this CPU's default."""
    default16 = kernels.lanes() == 16
    try:
        kernels.set_lanes16(lanes == 16)
        yield
    finally:
        kernels.set_lanes16(default16)


@pytest.mark.parametrize("lanes", _LANES)
def test_gemv_rows_do_not_depend_on_their_batch(lanes):
    """Each output is one FMA chain whatever tile the row lands in: row i of an M-row call is bit-equal to the
    one-row call, at every M the tiles split differently (8 and, on AVX-512 CPUs, 16 lanes)."""
    with _at_lanes(lanes):
        g = _gen(lanes)
        for K in (40, 96, 1544):        # not multiples of 16 take 8 lanes always; 1544: columns in three blocks
            W, b = torch.randn(37, K, generator=g), torch.randn(37, generator=g)
            x = torch.randn(64, K, generator=g)
            alone = torch.cat([kernels.linear(x[i:i + 1], W, b) for i in range(64)])
            tol = 1e-5 if K < 1000 else 1e-4
            torch.testing.assert_close(alone, F.linear(x, W, b), rtol=tol, atol=tol)
            for M in (2, 3, 4, 5, 6, 7, 13, 64):
                assert torch.equal(kernels.linear(x[:M], W, b), alone[:M]), (lanes, K, M)


@pytest.mark.parametrize("lanes", _LANES)
def test_gemv_takes_many_rows_in_chunks(lanes, monkeypatch):
    """Where the kernel takes every row count (AMD Zen 5), more than 64 rows run in chunks of 64: each row's
    result equals F.linear and is bit-equal to the same row in a one-row call."""
    with _at_lanes(lanes):
        monkeypatch.setattr(kernels.build, "_all_rows", True)
        g = _gen(100 + lanes)
        W, b = torch.randn(45, 96, generator=g), torch.randn(45, generator=g)
        x = torch.randn(150, 96, generator=g)
        got = kernels.linear(x, W, b)
        torch.testing.assert_close(got, F.linear(x, W, b), rtol=1e-5, atol=1e-5)
        for i in (0, 63, 64, 127, 128, 149):
            assert torch.equal(got[i], kernels.linear(x[i:i + 1], W, b)[0]), (lanes, i)
        ys = kernels.linear_many(x, [W, W[:7]], [None, b[:7]])
        torch.testing.assert_close(ys[0], F.linear(x, W), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ys[1], F.linear(x, W[:7], b[:7]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lanes", _LANES)
def test_frozen_linear_under_autograd_takes_the_kernel_and_its_gradient(lanes, monkeypatch):
    """A frozen weight (a LoRA base in training) where the kernel takes every row count: the kernel's forward,
    and the input's gradient (gemm_nn at 16 lanes, with row and column tails) equal F.linear's."""
    g = _gen(7)
    W, b = torch.randn(40, 112, generator=g), torch.randn(40, generator=g)     # 112 = 3 x 32 + 16 columns
    x = torch.randn(3, 71, 112, generator=g, requires_grad=True)               # 213 rows = 35 x 6 + 3
    dy = torch.randn(3, 71, 40, generator=g)
    with _at_lanes(lanes):
        monkeypatch.setattr(kernels.build, "_all_rows", True)
        for bias in (None, b):
            y = kernels.linear(x, W, bias)
            assert y.grad_fn is not None and "FrozenLinear" in type(y.grad_fn).__name__
            (gx,) = torch.autograd.grad(y, x, dy)
            x_ref = x.detach().clone().requires_grad_()
            y_ref = F.linear(x_ref, W, bias)
            (gx_ref,) = torch.autograd.grad(y_ref, x_ref, dy)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
        W.requires_grad_(True)                               # a trained weight keeps torch's path
        assert "FrozenLinear" not in type(kernels.linear(x, W).grad_fn).__name__


@pytest.mark.parametrize("lanes", _LANES)
def test_matmul_nn_and_linear_into_equal_torch(lanes, monkeypatch):
    """g @ W without transposing W (the reduction over 2100 rows crosses gemm_nn's slices of 2048; 7 rows and
    48 columns leave tails), and x W^T into a given buffer, equal torch's."""
    g_ = _gen(11)
    W = torch.randn(2100, 48, generator=g_)
    g, x = torch.randn(7, 2100, generator=g_), torch.randn(9, 48, generator=g_)
    with _at_lanes(lanes):
        monkeypatch.setattr(kernels.build, "_all_rows", True)
        torch.testing.assert_close(kernels.matmul_nn(g, W), g @ W, rtol=1e-5, atol=1e-4)
        out = torch.empty(9, 2100)
        assert kernels.linear_into(x, W, out) is out
        torch.testing.assert_close(out, x @ W.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cpuinfo,want", [
    ("vendor_id : GenuineIntel\ncpu family : 6\nflags : avx2 avx512f", True),
    ("vendor_id : AuthenticAMD\ncpu family : 26\nflags : avx2 avx512f", True),     # Zen 5
    ("vendor_id : AuthenticAMD\ncpu family : 25\nflags : avx2 avx512f", False),    # Zen 4: unmeasured
    ("vendor_id : GenuineIntel\ncpu family : 6\nflags : avx2 fma", False),
])
def test_default_lanes(cpuinfo, want):
    assert kernels.build._default_lanes16(cpuinfo) is want


def test_set_lanes16_refuses_a_cpu_without_avx512(monkeypatch):
    monkeypatch.setattr(kernels.build, "_cpuinfo", lambda: "flags : fpu avx2 fma")
    with pytest.raises(ValueError, match="no AVX-512"):
        kernels.set_lanes16(True)


def test_linear_falls_back_where_the_kernel_does_not_apply():
    g = _gen(0)
    W = torch.randn(10, 12, generator=g, requires_grad=True)         # K % 8 != 0, and autograd
    x = torch.randn(2, 12, generator=g)
    y = kernels.linear(x, W)
    assert y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(W.grad, x.sum(0).expand(10, 12))
    x16 = torch.randn(kernels.GEMV_MAX_ROWS + 1, 16, generator=g)    # more rows than the GEMV kernel takes
    W16 = torch.randn(5, 16, generator=g)
    torch.testing.assert_close(kernels.linear(x16, W16), F.linear(x16, W16))
    assert not kernels.gemv._gemv_rows_ok(kernels.GEMV_MAX_ROWS + 1, 16, 5) or kernels.build._all_rows


def _paged_case(seed, B, H, Hkv, hd, bs, lengths):
    g = _gen(seed)
    nb = max(-(-L // bs) for L in lengths)
    n_blocks = B * nb + 3
    kc = torch.randn(n_blocks * bs, Hkv, hd, generator=g)
    vc = torch.randn(n_blocks * bs, Hkv, hd, generator=g)
    perm = torch.randperm(n_blocks - 1, generator=g) + 1             # blocks scattered over the pool
    table = torch.zeros(B, nb, dtype=torch.int64)
    for b, L in enumerate(lengths):
        used = -(-L // bs)
        table[b, :used] = perm[b * nb:b * nb + used]
    q = torch.randn(B, H, hd, generator=g)
    qpos = torch.tensor([L - 1 for L in lengths])
    return q, kc, vc, table, qpos


@pytest.mark.parametrize("H,Hkv,hd,bs", [(4, 2, 8, 4), (9, 3, 64, 16), (6, 6, 16, 16)])
@pytest.mark.parametrize("window", [None, 5, 70])
def test_paged_attention_kernel_equals_gathered_reference(H, Hkv, hd, bs, window):
    lengths = [1, 5, 64, 65, 150, 17]                                # one and several 64-key chunks
    q, kc, vc, table, qpos = _paged_case(H + hd, len(lengths), H, Hkv, hd, bs, lengths)
    got = kernels.paged_attention(q, kc, vc, table, qpos, bs, window)
    want = kernels.paged_attention_reference(q, kc, vc, table, qpos, bs, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and an independent check of one row by hand: row 4 (150 keys), head 1
    b, h = 4, 1
    kv_head = h // (H // Hkv)
    rows = [int(table[b, t // bs]) * bs + t % bs for t in range(150)]
    start = 0 if window is None else 150 - window
    keys, vals = kc[rows[start:], kv_head], vc[rows[start:], kv_head]
    p = torch.softmax(keys @ q[b, h] / hd ** 0.5, 0)
    torch.testing.assert_close(got[b, h], p @ vals, rtol=1e-5, atol=1e-5)


def test_paged_attention_rows_claimed_ahead_padding_rows_and_threads():
    """Rows are claimed one ahead by whichever thread is free (and prefetch the next row's keys): a padding row
    (qpos -1) in the middle comes out zero, every other row as the reference, and the bits do not depend on
    the thread count."""
    if not kernels.available():
        pytest.skip("no kernels on this machine")
    lengths = [40, 101, 3, 77, 150, 16, 64, 9, 120]
    q, kc, vc, table, qpos = _paged_case(7, len(lengths), 9, 3, 64, 16, lengths)
    qpos[2] = -1
    got = kernels.paged_attention(q, kc, vc, table, qpos, 16, None)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    keep = [b for b in range(len(lengths)) if b != 2]
    want = kernels.paged_attention_reference(q[keep], kc, vc, table[keep], qpos[keep], 16, None)
    torch.testing.assert_close(got[keep], want, rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.paged_attention(q, kc, vc, table, qpos, 16, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, got)


def _slot_table(seed, ranks, K, N, n_slots=5, live=()):
    g = _gen(seed)
    table = kernels.SlotTable(n_slots)
    for slot, r in ranks.items():
        table.set(slot, torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), 0.5 + slot, slot in live)
    return table


@pytest.mark.parametrize("live", [(), (2,)])
def test_lora_bgmv_kernel_equals_per_slot_matmuls(live):
    K, N = 24, 301                                                   # > one 256-output run, odd tail
    table = _slot_table(0, {1: 2, 2: 16, 4: 5}, K, N, live=live)    # slot 3 empty, mixed ranks
    g = _gen(1)
    rows = torch.tensor([0, 1, 2, 4, 2, 3, 1, 0, 4], dtype=torch.int32)
    x, y = torch.randn(len(rows), K, generator=g), torch.randn(len(rows), N, generator=g)
    want = y.clone()
    for m, k in enumerate(rows.tolist()):                            # the formula, row by row
        if table.tensors[k] is not None:
            A, B, s = table.tensors[k]
            want[m] += s * (B @ (A @ x[m]))
    torch.testing.assert_close(kernels.lora_bgmv_reference(x, y, rows, table), want, rtol=1e-5, atol=1e-4)
    got = kernels.lora_bgmv(x, y.clone(), rows, table)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    table.clear(2)                                                   # an evicted slot adds nothing
    want2 = y.clone()
    for m, k in enumerate(rows.tolist()):
        if k in (1, 4):
            A, B, s = table.tensors[k]
            want2[m] += s * (B @ (A @ x[m]))
    torch.testing.assert_close(kernels.lora_bgmv(x, y.clone(), rows, table), want2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lanes", _LANES)
def test_lora_bgmv_many_rows_per_slot(lanes):
    """Rows grouped by slot in blocks of 3 (8 lanes) or 6 (16 lanes) and expanded four at a time: short tails, a
    slot with > 64 rows (a prefill), interleaved slots; and a row's result does not depend on its batch."""
    with _at_lanes(lanes):
        K, N = 32, 40
        table = _slot_table(0, {1: 3, 2: 16, 3: 8}, K, N)
        g = _gen(3)
        for rows in (torch.randint(0, 4, (150,), generator=g), torch.tensor([2] * 70 + [1] * 5 + [3, 0, 2])):
            rows = rows.to(torch.int32)
            x, y = torch.randn(len(rows), K, generator=g), torch.randn(len(rows), N, generator=g)
            want = y.clone()
            for m, k in enumerate(rows.tolist()):
                if table.tensors[k] is not None:
                    A, B, s = table.tensors[k]
                    want[m] += s * (B @ (A @ x[m]))
            got = kernels.lora_bgmv(x, y.clone(), rows, table)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            alone = torch.cat([kernels.lora_bgmv(x[m:m + 1], y[m:m + 1].clone(), rows[m:m + 1], table)
                               for m in range(len(rows))])
            assert torch.equal(got, alone), lanes


def test_lora_bgmv_reads_live_tensors_updated_in_place():
    K, N = 16, 40
    table = _slot_table(3, {1: 4}, K, N, live=(1,))
    A, B, s = table.tensors[1]
    x, y, rows = torch.randn(3, K), torch.zeros(3, N), torch.tensor([1, 1, 0], dtype=torch.int32)
    before = kernels.lora_bgmv(x, y.clone(), rows, table)
    with torch.no_grad():
        B.mul_(-2.0)                                                 # an optimizer step, in place
    after = kernels.lora_bgmv(x, y.clone(), rows, table)
    torch.testing.assert_close(after, -2.0 * before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[:2], s * (x[:2] @ A.t() @ B.t()), rtol=1e-5, atol=1e-5)


def test_disabled_kernels_take_the_reference_path():
    table = _slot_table(0, {1: 4}, 8, 8)
    x, y, rows = torch.randn(2, 8), torch.randn(2, 8), torch.tensor([1, 0], dtype=torch.int32)
    kernels.set_enabled(False)
    try:
        assert not kernels.available()
        assert kernels.lora_bgmv(x, y, rows, table) is None          # caller falls back to its torch path
        assert "disabled" in kernels.status()
    finally:
        kernels.set_enabled(True)
    assert kernels.lora_bgmv(x, y, rows, table) is y


def test_sample_rows_kernel_equals_the_torch_sampler():
    from rftkit.sampling import SamplingParams, _sample_reference
    g = _gen(5)
    B, V = 12, 1001                                                  # V not a multiple of 8
    logits = torch.randn(B, V, generator=g) * 3
    logits[3, 17] = 50.0                                             # a row with one dominant token
    temps = torch.tensor([1.0, 0.7, 1.3] * 4)
    params = [SamplingParams(temperature=0 if i % 4 == 0 else float(temps[i])) for i in range(B)]
    temps = torch.tensor([p.temperature or 1.0 for p in params])
    u = torch.rand(B, generator=g)
    u[[i for i, p in enumerate(params) if p.temperature == 0]] = -1.0
    u[5] = 0.0                                                       # the first token whose CDF reaches 0
    tok, logp = kernels.sample_rows(logits, temps, u)
    want_tok, want_logp, _ = _sample_reference(logits, temps, params, u)
    assert tok.tolist() == want_tok.tolist()
    assert tok[0] == logits[0].argmax() and tok[3] == 17
    torch.testing.assert_close(logp, torch.log_softmax(logits / temps[:, None], -1)[torch.arange(B), tok],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7])
def test_softmax_rows_kernel_equals_log_softmax_and_entropy(inv_t):
    """Log-probs, log-normaliser, entropy and the unnormalised probabilities left in place, on rows spread far
    below their maximum (where exp underflows) and V not a multiple of 8."""
    g = _gen(11)
    B, V = 9, 1003
    z = torch.randn(B, V, generator=g) * 3
    z[0, :500] = -150.0                                              # far below the top: floored, weight ~0
    z[1, 7] = 60.0                                                   # one dominant token
    z[2] = torch.linspace(-200, 0, V)
    t = torch.randint(0, V, (B,), generator=g)
    t[0] = 3                                                         # a target among the floored ones
    ref = torch.log_softmax(z.double() * inv_t, -1)
    work = z.clone()
    logp, lse, ent, s = kernels.softmax_rows(work, t, inv_t, with_entropy=True)
    torch.testing.assert_close(logp.double(), ref[torch.arange(B), t], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z.double() * inv_t, -1), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close((work / s[:, None]).double(), ref.exp(), rtol=1e-5, atol=1e-7)
    assert kernels.softmax_rows(z.clone(), t, inv_t, with_entropy=False)[2] is None


def test_rms_norm_and_rope_kernels_equal_their_torch_formulas():
    from rftkit.model import rotate_half
    g = _gen(9)
    x, w = torch.randn(3, 1, 40, generator=g), torch.randn(40, generator=g)
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), want, rtol=1e-5, atol=1e-5)
    q = torch.randn(2, 3, 4, 16, generator=g)                        # [B, T, n, hd]
    ang = torch.randn(2, 3, 1, 8, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    torch.testing.assert_close(kernels.rope(q, cos, sin), q * cos + rotate_half(q) * sin, rtol=1e-6, atol=1e-6)
    assert kernels.rope(q.transpose(1, 2), cos, sin) is None          # another layout: the caller's torch path
    assert kernels.rms_norm(torch.randn(65, 8), torch.ones(8), 1e-5) is None   # many rows: torch


@pytest.mark.parametrize("shape", [(3, 7), (2, 33, 130), (4099,)])    # tails of 8 and of a thread's chunk
def test_swiglu_kernel_and_its_gradient_equal_silu_times_up(shape):
    g = _gen(11)
    gate, up = (torch.randn(shape, generator=g) * 6).requires_grad_(), torch.randn(shape, generator=g).requires_grad_()
    gate2, up2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    h, want = kernels.swiglu(gate, up), F.silu(gate2) * up2
    assert h.grad_fn is not None and "SwiGLU" in type(h.grad_fn).__name__       # the kernel's autograd node
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-6)
    dh = torch.randn(shape, generator=g)
    h.backward(dh)
    want.backward(dh)
    torch.testing.assert_close(gate.grad, gate2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up.grad, up2.grad, rtol=1e-5, atol=1e-5)
    only_up = kernels.swiglu(gate.detach(), up)                      # one input frozen: its gradient is skipped
    only_up.sum().backward()
    with torch.no_grad():                                            # outside autograd: the forward kernel alone
        torch.testing.assert_close(kernels.swiglu(gate, up), want, rtol=1e-5, atol=1e-6)
    strided = torch.randn(4, 16, generator=g)[:, ::2]                # not contiguous: torch's ops
    torch.testing.assert_close(kernels.swiglu(strided, strided), F.silu(strided) * strided)


def _sdpa_per_sequence(q, k, v, lens):
    return torch.cat([F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=b.shape[1] != a.shape[1])
                      for a, b, c in zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))], 2)


@pytest.mark.parametrize("H,Hkv,hd,lens", [(4, 2, 16, [5, 1, 9, 17]), (9, 3, 64, [40, 3, 33]), (2, 2, 32, [64])])
def test_packed_attention_kernel_and_gradients_equal_sdpa_per_sequence(H, Hkv, hd, lens):
    g = _gen(12)
    N = sum(lens)
    # the model's layout: [1, N, heads, hd] memory seen as [1, heads, N, hd]
    q, k, v = (torch.randn(1, N, n, hd, generator=g).transpose(1, 2).requires_grad_() for n in (H, Hkv, Hkv))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, want = kernels.packed_attention(q, k, v, lens), _sdpa_per_sequence(q2, k2, v2, lens)
    assert out.shape == want.shape and "PackedAttention" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
    dout = torch.randn(want.shape, generator=g)
    out.backward(dout)
    want.backward(dout)
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    # a sequence's result does not depend on what it is packed with, nor on the thread count
    first = lens[0]
    alone = kernels.packed_attention(q[:, :, :first].detach(), k[:, :, :first].detach(), v[:, :, :first].detach(),
                                     [first])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = kernels.packed_attention(q.detach(), k.detach(), v.detach(), lens)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, out[:, :, :first].detach()) and torch.equal(one_thread, out.detach())


def test_packed_attention_declines_what_it_does_not_handle():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    assert kernels.packed_attention(q, k, k, [6]) is None                        # head_dim not a multiple of 16
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    assert kernels.packed_attention(q, k, k, [6]) is None                        # more than one row
    q, k = torch.randn(1, 4, 6, 16, dtype=torch.float64), torch.randn(1, 2, 6, 16, dtype=torch.float64)
    assert kernels.packed_attention(q, k, k, [6]) is None                        # not fp32


def test_without_a_compiler_everything_runs_on_the_reference_path(tmp_path):
    import os
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from rftkit import kernels\n"
        "from rftkit.engine import Engine\n"
        "from rftkit.sampling import SamplingParams\n"
        "from tests.conftest import reference_greedy, tiny_model\n"
        "assert not kernels.available(), kernels.status()\n"
        "print(kernels.status())\n"
        "model = tiny_model()\n"
        "got = Engine(model, max_seq_len=64).generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=6))\n"
        "assert got[0][0].token_ids == reference_greedy(model, [3, 4, 5], 6)\n"
        "gate = torch.randn(4, 8, requires_grad=True)\n"
        "kernels.swiglu(gate, gate.detach()).sum().backward()\n"
        "assert gate.grad is not None\n"
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), RFTKIT_CACHE=str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "could not compile the decode kernels" in out.stdout


@pytest.mark.parametrize("M", [1, 3, 8, 13, 32])
def test_linear_many_equals_one_f_linear_each(M, monkeypatch):
    g = _gen(M)
    K = 32
    ws = [torch.randn(n, K, generator=g) for n in (12, 5, 37)]      # row counts not multiples of 4
    bs = [torch.randn(12, generator=g), None, torch.randn(37, generator=g)]
    x = torch.randn(M, 1, K, generator=g)
    got = kernels.linear_many(x, ws, bs)
    for y, w, b in zip(got, ws, bs):
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # rows go three at a time, the last one, two or four in pairs (13 = 3 + 3 + 3 + 2 + 2, 8 = 3 + 3 + 2); past
    # GEMV_MAX_ROWS (or GEMV_MAX_ROWS_LONG_K at K > 1024) the caller runs them one by one (except on AMD Zen 5)
    monkeypatch.setattr(kernels.build, "_all_rows", False)
    assert kernels.linear_many(torch.randn(kernels.GEMV_MAX_ROWS + 1, K), ws, bs) is None
    long_k = [torch.randn(12, 1032, generator=g)]
    assert kernels.linear_many(torch.randn(kernels.GEMV_MAX_ROWS_LONG_K + 1, 1032), long_k, [None]) is None


def test_sampling_at_the_top_of_the_cdf_stays_in_the_vocabulary():
    # u near 1: float rounding can leave the running sum just short of u * total after the last token; the pick
    # must then be the last token (the reference clamps the same way), never V (an id out of range: rft demo crashed)
    if not kernels.available():
        pytest.skip("no compiler: the kernel is not built")
    g = torch.Generator().manual_seed(0)
    for V in (64, 49152):
        logits = torch.randn(256, V, generator=g) * 3
        for u in (1.0 - 2 ** -24, 1.0):
            tok, logp = kernels.sample_rows(logits, torch.ones(256), torch.full((256,), u))
            assert int(tok.max()) < V and int(tok.min()) >= 0
            assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1), atol=1e-4)


@pytest.mark.parametrize("name", ["dlayer", "qlayer", "qblock"])
def test_the_ctypes_structs_match_the_c_layout(name):
    """Each ctypes mirror (DecodeLayer, QLayer, QBlock) has the size and field offsets the compiler gave its C
    struct in kernels.h (the library reports them): one field out of step would be silent memory corruption."""
    import ctypes
    mirror = kernels.decode.STRUCTS[name][1]
    want = [ctypes.sizeof(mirror)] + [getattr(mirror, f).offset for f, _ in mirror._fields_]
    assert kernels.struct_layout(name) == want
    with pytest.raises(ValueError, match="unknown kernel struct"):
        kernels.struct_layout("dlayers")


def test_every_entry_point_of_the_header_has_one_ctypes_signature():
    """kernels.h declares each exported function once; each has its argtypes declared once, in its family's
    Python module (set_wide by the loader), with as many arguments as the C declaration."""
    import re
    from pathlib import Path
    header = (Path(kernels.__file__).parent / "kernels.h").read_text()
    decls = dict(re.findall(r"^(?:void|int) (\w+)\(([^)]*)\);", header, re.M))
    assert "decode_layers" in decls and "qlinear_many" in decls
    sigs = kernels.build._signatures
    assert set(decls) == set(sigs) | {"set_wide"}
    for name, (argtypes, _) in sigs.items():
        assert len(argtypes) == len(decls[name].split(",")), name


def test_the_kernels_import_nothing_from_rftkit_and_no_c_hides_in_python():
    import ast
    from pathlib import Path
    root = Path(kernels.__file__).parent.parent
    for f in (root / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert not n.startswith("rftkit") or n.startswith("rftkit.kernels"), (f.name, n)
    for f in root.rglob("*.py"):
        assert "#include <" not in f.read_text(), f"C source inside a Python string in {f}"
