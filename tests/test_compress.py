"""Compression: each method does its job on tiny models (against an independent reference or a property)."""
import json

import pytest
import torch
import torch.nn as nn

from rftkit.compress.folder import load_compressed, save_compressed
from rftkit.compress.transforms import CompressConfig, compress, count_params, validate
from rftkit.compress.quantize import (QuantLinear, kernel_available, pack_int4, quantize, quantize_int4, quantize_int8,
                                      unpack_int4)
from tests.conftest import tiny_model

torch.set_num_threads(1)


def test_int8_int4_match_independent_dequantization():
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    q, s = quantize_int8(w)
    ref = torch.round(w / (w.abs().amax(1, keepdim=True) / 127)) * (w.abs().amax(1, keepdim=True) / 127)
    torch.testing.assert_close(q.float() * s[:, None], ref)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6       # RTN: half a step at most
    packed, d, m = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 48)
    g = w.view(48, 3, 32)
    lo, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    ref4 = (torch.round((g - lo) / step) * step + lo).view(48, 96)
    lin = QuantLinear.from_linear(nn.Linear(96, 48, bias=False).requires_grad_(False), 4, 32)
    lin.set_weight(w)
    torch.testing.assert_close(lin.dequantize(), ref4)


def test_int4_pack_roundtrip_and_grid_exact():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    # a matrix already on a Q4_1 grid (as the embedded model's linears are) comes back exactly
    d, m = torch.rand(8, 2, 1) + 0.1, torch.randn(8, 2, 1)
    q[:, ::32] = 0
    q[:, 1::32] = 15                                  # every block uses its min and max level, as Q4_1's does
    w = (q.view(8, 2, 32).float() * d + m).view(8, 64)
    lin = QuantLinear(64, 8, bits=4, group_size=32)
    lin.set_weight(w)
    torch.testing.assert_close(lin.dequantize(), w, rtol=0, atol=1e-5)


def _int8_activations(x):
    """x rounded as the decode kernel rounds it: int8 per block of 32 inputs, scale absmax / 127."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(x.shape)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 8, 20, 64, 65])
def test_kernel_equals_reference_path(bits, rows):
    """Up to 64 rows (decode, batched decode) the kernel multiplies int8-rounded activations (llama.cpp's Q8 blocks of 32) by
    the low-bit weights; the int4 min term uses the exact sums of x. More rows: the dequantized weight in
    fp32. Both against the formula written out in torch, and within 8-bit activation error of fp32."""
    torch.manual_seed(1)
    lin = nn.Linear(128, 40, bias=True)
    q = QuantLinear.from_linear(lin, bits, 64 if bits == 4 else 32)
    x = torch.randn(rows, 128)
    w = q.dequantize()
    exact = x @ w.T + q.bias                            # the dequantized weight, multiplied by hand
    with torch.no_grad():
        y = q(x)
    if rows > 64:
        torch.testing.assert_close(y, exact, rtol=1e-4, atol=1e-4)
        return
    assert kernel_available()                           # the fast path was really taken on this machine
    xh = _int8_activations(x)
    if bits == 8:
        formula = xh @ w.T + q.bias
    else:
        G = 128 // 64
        mins = q.mins.repeat_interleave(64, dim=1)      # [N, K]: each group's min
        formula = xh @ (w - mins).T + x.reshape(rows, G, 64).sum(-1) @ q.mins.T + q.bias
    torch.testing.assert_close(y, formula, rtol=1e-4, atol=1e-4)
    assert (y - exact).norm() / exact.norm() < 2e-2     # 8-bit activations: ~0.5% relative
    assert not torch.allclose(y, exact, rtol=1e-6, atol=1e-6)   # (and the rounding is really there)
    with torch.enable_grad():                           # training sees the exact fp32 path
        xg = x.clone().requires_grad_()
        torch.testing.assert_close(q(xg), exact, rtol=1e-4, atol=1e-4)


def test_int4_kernel_layout_is_the_stored_bytes_in_tiles_of_8_rows():
    """repack_int4 (the int4 kernel's layout): per tile of 8 rows and block of 32 inputs, word j * 8 + i = row
    i's stored bytes 4j .. 4j + 3 of the block; scales and mins [tiles, G, 8]; N = 13 pads to 16 with zeros."""
    from rftkit.compress.quantize import repack_int4
    torch.manual_seed(5)
    q, d, mn = quantize_int4(torch.randn(13, 128), 64)
    qp, dp, mp = repack_int4(q, d, mn)
    qp = qp.reshape(2, 4, 4, 8, 4)                       # tile, block, word j, row i, byte
    for n in range(16):
        for b in range(4):
            for j in range(4):
                want = q[n, b * 16 + 4 * j: b * 16 + 4 * j + 4] if n < 13 else torch.zeros(4, dtype=torch.uint8)
                assert torch.equal(qp[n // 8, b, j, n % 8], want)
    assert dp.shape == mp.shape == (2, 2, 8)
    assert torch.equal(dp[0, :, 3], d[3]) and torch.equal(mp[1, :, 4], mn[12]) and not dp[1, :, 5:].any()


def test_int4_kernel_copy_follows_load_state_dict_in_place():
    """The int4 kernel reads a repacked copy made on first use; load_state_dict (in place) refreshes it in place,
    so the layer and a whole decode stack planned before the load both compute with the loaded weights."""
    torch.manual_seed(6)
    a = QuantLinear.from_linear(nn.Linear(64, 24, bias=True), 4, 32)
    b = QuantLinear.from_linear(nn.Linear(64, 24, bias=True), 4, 32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = a(x)
        kept = a.kernel_tensors()[0]
        a.load_state_dict(b.state_dict())
        assert a.kernel_tensors()[0] is kept                       # same tensor, same address: plans stay valid
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        assert not torch.allclose(a(x), before)
    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    model, other = tiny_model(), tiny_model(seed=1)
    for m in (model, other):
        quantize(m, bits=4, group_size=32, head_bits=None)
    engine = Engine(model, max_seq_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    engine.generate([[1, 2, 3, 4]], params, progress=False)          # the decode stack is planned on model
    model.load_state_dict(other.state_dict())
    prompt = [5, 6, 7]                                               # not a cached prefix
    got = engine.generate([prompt], params, progress=False)[0][0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(other(torch.tensor([ids]))[0][0, -1].argmax()))
    assert got == ids[len(prompt):]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_kernel_rows_are_batch_invariant(bits, group):
    """A row's output is bit for bit the same whichever rows share its call (1 to 64 rows: tiles of 1-4 x rows
    against 1, 2 or 4 int8 weight rows, or 8 int4 rows), and with a fused LoRA (r = 8, and r = 5 with a tail of
    ranks); N = 43 leaves tails of weight rows."""
    torch.manual_seed(3)
    q = QuantLinear.from_linear(nn.Linear(192, 43, bias=True), bits, group if bits == 4 else 32)
    x = torch.randn(64, 192)
    A, B = torch.randn(8, 192) * 0.1, torch.randn(43, 8) * 0.1
    with torch.no_grad():
        for lora in (None, (A, B, 0.5), (A[:5].contiguous(), B[:, :5].contiguous(), 0.5)):
            full = q(x, lora)
            for rows in (1, 2, 3, 4, 5, 7, 8, 13, 33, 63):
                torch.testing.assert_close(q(x[:rows], lora), full[:rows], rtol=0, atol=0)
                torch.testing.assert_close(q(x[-rows:], lora), full[-rows:], rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_many_rows_dequantize_in_chunks(bits, monkeypatch):
    """Prefill / large batches dequantize CHUNK_BYTES of weight rows at a time: chunks that do not divide the
    rows give the same product as the whole dequantized weight."""
    import rftkit.compress.quantize as qmod
    torch.manual_seed(2)
    q = QuantLinear.from_linear(nn.Linear(128, 40, bias=False), bits, 32)
    x = torch.randn(80, 128)                                       # more rows than the integer kernel takes
    monkeypatch.setattr(qmod, "CHUNK_BYTES", 4 * 128 * 7)          # 7 rows per chunk: 6 chunks, the last of 5
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ q.dequantize().T, rtol=1e-5, atol=1e-5)


def test_bad_settings_fail_before_work():
    with pytest.raises(ValueError, match="bit width 3"):
        QuantLinear(64, 8, bits=3)
    with pytest.raises(ValueError, match="bit width 5"):
        quantize(tiny_model(), bits=5)
    for kw, match in [(dict(method="magnitude", sparsity=1.0), "sparsity .* got 1.0"),
                      (dict(method="wanda", sparsity=0.0), "got 0.0"),
                      (dict(method="structured", ratio=1.5), "ratio .* got 1.5"),
                      (dict(method="svd", energy=1.2), "energy .* got 1.2"),
                      (dict(method="int4", group_size=48), "group_size .* 48"),
                      (dict(method="nope"), "nope")]:
        with pytest.raises(ValueError, match=match):
            CompressConfig(**kw)
    with pytest.raises(ValueError, match=r"rank must be >= 0 .*got -1"):
        CompressConfig(method="svd", rank=-1)
    with pytest.raises(ValueError, match=r"rank 600 .* \(at most 16\)"):
        validate("svd", rank=600, model_cfg=tiny_model().cfg)
    with pytest.raises(ValueError, match="head_ratio .* 1.0"):
        CompressConfig(method="structured", head_ratio=1.0)
    with pytest.raises(ValueError, match="unknown compression method 'zip'"):
        CompressConfig(sweep=True, sweep_methods="int8,zip")
    with pytest.raises(ValueError, match="N:M"):
        validate("magnitude", pattern="4:2")


def _quant_model(bits):
    model = tiny_model(vocab_size=96, dim=64, head_dim=16, ffn_dim=128)
    model, record = compress(model, f"int{bits}", head_bits=8)
    return model, record


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_close_saves_small_reloads_identical(bits, tmp_path):
    ref = tiny_model(vocab_size=96, dim=64, head_dim=16, ffn_dim=128)
    model, record = _quant_model(bits)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        a, b = ref(ids)[0], model(ids)[0]
    assert (a - b).abs().max() < (0.05 if bits == 8 else 0.3) * a.abs().max()
    save_compressed(model, record, tmp_path / "m")
    save_compressed(ref, {"modules": {}}, tmp_path / "fp32")
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    full = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    # int8: 1 byte + per-row scale; int4: half a byte + two fp32 per group of 32 (+ the int8 tied embedding)
    n_lin = sum(m.in_features * m.out_features for n, m in model.named_modules()
                if isinstance(m, QuantLinear) and n != "lm_head")
    n_emb = 96 * 64
    expect = n_emb * 1 + (n_lin * (1 if bits == 8 else 0.5 + 8 / 32))
    assert size < expect * 1.15 + 4096 and size < full * (0.3 if bits == 8 else 0.25)
    back = load_compressed(tmp_path / "m")
    from rftkit.loading import load_model
    again = load_model(str(tmp_path / "m"))             # what the engine, rft generate/eval and the server load
    with torch.no_grad():
        assert torch.equal(back(ids)[0], b)
        assert torch.equal(again(ids)[0], b)
    assert type(again.lm_head).__name__ == "QuantLinear"
    assert json.loads((tmp_path / "m" / "compress.json").read_text())["method"] == f"int{bits}"
    assert back.model.embed_tokens.qweight.data_ptr() == back.lm_head.qweight.data_ptr()   # tied, stored once


def test_quantized_model_runs_in_engine():
    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    model, _ = _quant_model(4)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    outs = Engine(model, max_seq_len=64).generate(prompts, params, progress=False)
    for p, o in zip(prompts, outs):                     # engine (kernel, cache) == plain greedy full forwards
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        assert o[0].token_ids == ids[len(p):]


def _adapter(tmp_path, **kw):
    """A PEFT adapter with non-zero B, trained-looking, for the tiny model of `kw`."""
    from rftkit.lora import LoRAConfig, apply_lora, lora_modules, save_lora
    src = tiny_model(**kw)
    apply_lora(src, LoRAConfig(r=4))
    for m in lora_modules(src).values():
        nn.init.normal_(m.lora_B, std=0.1)
    save_lora(src, tmp_path / "ad")
    return tmp_path / "ad"


COMPRESSED = [("int4", {}), ("int8", {}), ("wanda", {}), ("svd", {"rank": 8}), ("kmeans", {})]


@pytest.mark.parametrize("method,kw", COMPRESSED)
def test_lora_applies_unmerged_on_compressed_layers(method, kw, tmp_path):
    from rftkit.lora import load_lora, lora_modules, merge_lora
    from rftkit.peft_format import read_adapter
    shape = dict(vocab_size=96, dim=64, head_dim=16, ffn_dim=128)
    model, _ = compress(tiny_model(**shape), method, calib=torch.randint(0, 96, (2, 16)), **kw)
    kinds = {p: type(m) for p, m in model.named_modules() if p.endswith("gate_proj")}
    ad = _adapter(tmp_path, **shape)
    load_lora(model, ad)
    mods = lora_modules(model)
    assert mods and all(type(m.base) is kinds[p] for p, m in mods.items() if p in kinds)
    # reference by hand: the compressed base's own output + s * x A^T B^T from the adapter file
    _, weights = read_adapter(ad)
    x = torch.randn(3, 64)
    for path in ("model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.v_proj"):
        m = mods[path]
        A, B = weights[path]
        with torch.no_grad():
            torch.testing.assert_close(m(x), m.base(x) + (x @ A.T @ B.T) * (32 / 4), rtol=1e-4, atol=1e-4)
    if method in ("int4", "int8"):
        with pytest.raises(ValueError, match="read-only"):
            merge_lora(model)


@pytest.mark.parametrize("method,kw", COMPRESSED + [("structured", {"ratio": 0.5})])
def test_compressed_models_run_in_engine(method, kw, tmp_path):
    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    model, rec = compress(tiny_model(vocab_size=96, dim=64, head_dim=16, ffn_dim=128), method,
                          calib=torch.randint(0, 96, (2, 16)), **kw)
    save_compressed(model, rec, tmp_path / "m")
    model = load_compressed(tmp_path / "m")
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    outs = Engine(model, max_seq_len=64).generate(prompts, SamplingParams(temperature=0.0, max_tokens=6),
                                                  progress=False)
    for p, o in zip(prompts, outs):                     # engine (cache, kernels) == plain greedy full forwards
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        assert o[0].token_ids == ids[len(p):]


def test_count_params_counts_tied_once():
    model, _ = _quant_model(8)
    ref = tiny_model(vocab_size=96, dim=64, head_dim=16, ffn_dim=128)
    assert count_params(model)[0] == ref.parameter_count()


def _folder_with_tokenizer(tmp_path):
    """A tiny model folder with a byte-level tokenizer and a chat template, as `rft compress --model` takes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from rftkit.loading.weights import save_model_folder
    d = tmp_path / "base"
    vocab = {c: i for i, c in enumerate(sorted(set(pre_tokenizers.ByteLevel.alphabet())))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    save_model_folder(tiny_model(vocab_size=264, dim=64, head_dim=16, ffn_dim=128, eos_token_id=[257]), d)
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "chat_template":
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}<|im_start|>"}))
    return d


def test_rft_compress_and_sweep_report_what_was_written(tmp_path):
    from rftkit.cli import main
    from rftkit.compress.transforms import perplexity, text_tokens
    from rftkit.tokenizer import Tokenizer
    base = _folder_with_tokenizer(tmp_path)
    ad = _adapter(tmp_path, vocab_size=264, dim=64, head_dim=16, ffn_dim=128, eos_token_id=[257])
    small = ["--model", str(base), "--adapter", str(ad), "--n", "4", "--calib-tokens", "128", "--ppl-tokens", "128",
             "--speed-tokens", "4", "--batch", "2", "--distill-steps", "2", "--distill-samples", "2"]
    assert main(["compress", "--method", "wanda", "--out", str(tmp_path / "w"), *small]) == 0
    r = json.loads((tmp_path / "w" / "report.json").read_text())
    assert r["bytes"]["compressed"] < 0.7 * r["bytes"]["original"]
    assert set(r["compressed"]) >= {"perplexity", "accuracy", "accuracy_adapter", "perplexity_adapter"}
    assert r["compressed"]["nonzero"] < 0.6 * r["original"]["nonzero"]
    tok = Tokenizer.from_dir(base)
    with torch.no_grad():      # the reported perplexity is that of the folder on disk, on the held-out tokens
        ppl = perplexity(load_compressed(tmp_path / "w"), text_tokens(tok, 128, 128))
    assert r["compressed"]["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert set(r["speed"]["compressed"]) == {"single", "batched"}
    assert main(["compress", "--sweep", "--sweep-methods", "int8,distill", "--out", str(tmp_path / "s"), *small]) == 0
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [x["name"] for x in rows] == ["original", "int8", "distill-ratio0.3"]
    assert rows[2]["adapter_merged"] and rows[2]["accuracy"] is None and rows[2]["accuracy_adapter"] is not None
    assert (tmp_path / "s" / "sweep.csv").read_text().count("\n") == 4
    assert (tmp_path / "s" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["compress", "--method", "svd", "--rank", "1000", "--out", str(tmp_path / "x"), *small]) == 2
    assert not (tmp_path / "x").exists()                                     # refused before any work


def test_a_sweep_setting_the_model_does_not_take_is_skipped_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    from rftkit.compress import report as compress_report
    from rftkit.cli import main
    base = _folder_with_tokenizer(tmp_path)
    monkeypatch.setitem(compress_report.GRID, "int4", [{"group_size": 96}, {"group_size": 32}])   # 96 ∤ 64
    small = ["--model", str(base), "--n", "2", "--calib-tokens", "128", "--ppl-tokens", "128", "--speed-tokens",
             "2", "--batch", "2"]
    assert main(["compress", "--sweep", "--sweep-methods", "int4,int8", "--out", str(tmp_path / "s"), *small]) == 0
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [x["name"] for x in rows] == ["original", "int4-group_size32", "int8"]
    assert "skipped int4-group_size96" in capsys.readouterr().err
    assert (tmp_path / "s" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_pareto_front():
    from rftkit.compress.report import pareto
    pts = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.9), (3.0, 0.8), (0.5, 0.1)]
    assert pareto(pts) == [4, 0, 2]


def test_int4_with_unmerged_adapter_in_engine_equals_full_forward(tmp_path):
    from rftkit.engine import Engine
    from rftkit.lora import load_lora
    from rftkit.sampling import SamplingParams
    shape = dict(vocab_size=96, dim=64, head_dim=16, ffn_dim=128)
    model, _ = compress(tiny_model(**shape), "int4")
    load_lora(model, _adapter(tmp_path, **shape))
    plain, _ = compress(tiny_model(**shape), "int4")
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    outs = Engine(model, max_seq_len=64).generate(prompts, SamplingParams(temperature=0.0, max_tokens=6),
                                                  progress=False)
    differs = False
    for p, o in zip(prompts, outs):
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
            base = plain(torch.tensor([ids[:-1]]))[0][0].argmax(-1).tolist()
        assert o[0].token_ids == ids[len(p):]
        differs |= base[len(p) - 1:] != ids[len(p):]
    assert differs                       # the adapter changed what was decoded: it was really applied


def test_bank_serves_adapters_on_a_quantized_model(tmp_path):
    """The server's path: an int4 model reloaded from disk, an adapter registered in the engine's bank; each
    request's greedy tokens equal those of the same model with the adapter applied unmerged (LoRALinear)."""
    from rftkit.engine import Engine
    from rftkit.loading import load_model
    from rftkit.lora import load_lora
    from rftkit.sampling import SamplingParams
    shape = dict(vocab_size=96, dim=64, head_dim=16, ffn_dim=128)
    model, rec = compress(tiny_model(**shape), "int4")
    save_compressed(model, rec, tmp_path / "m")
    ad = _adapter(tmp_path, **shape)
    served = load_model(str(tmp_path / "m"))
    engine = Engine(served, max_seq_len=64, adapter_slots=2)
    engine.adapters.register("ad", ad)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    names = ["ad", None, "ad"]
    rids = [engine.add_request(p, greedy, adapter=n) for p, n in zip(prompts, names)]
    got = {r: [] for r in rids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
    ref = {None: load_model(str(tmp_path / "m")), "ad": load_model(str(tmp_path / "m"))}
    load_lora(ref["ad"], ad)
    for rid, p, n in zip(rids, prompts, names):
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(ref[n](torch.tensor([ids]))[0][0, -1].argmax()))
        assert got[rid] == ids[len(p):], (n, got[rid], ids[len(p):])
    base0 = list(prompts[0])
    with torch.no_grad():
        for _ in range(6):
            base0.append(int(ref[None](torch.tensor([base0]))[0][0, -1].argmax()))
    assert got[rids[0]] != base0[len(prompts[0]):]      # the adapter really changed what was generated
    assert engine.adapters.stats["loads"] == 1


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("r", [4, 5, 16])
def test_quantized_layer_adds_a_lora_in_the_same_call(bits, r):
    """forward(x, lora=(A, B, s)) = the layer's own output + s * x A^T B^T, at decode rows (the fused kernel,
    r = 16 vectorised, r = 4 not, r = 5 leaves a tail of ranks) and at many rows (torch)."""
    torch.manual_seed(3)
    q = QuantLinear.from_linear(nn.Linear(96, 40, bias=True), bits, 32)
    A, B = torch.randn(r, 96), torch.randn(40, r)
    for rows in (1, 5, 12):
        x = torch.randn(rows, 96)
        with torch.no_grad():
            torch.testing.assert_close(q(x, lora=(A, B, 0.5)), q(x) + (x @ A.T @ B.T) * 0.5, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_layers_sharing_an_input_run_in_one_call_as_they_would_alone(bits):
    """quantize.linear_many (q/k/v, gate/up of a quantized model: x rounded once, one parallel loop over every
    layer's rows) gives each layer exactly its own output, with its own bias and LoRA; a LoRA switched off adds
    nothing; a mixed group (a plain layer among them) is left to the caller."""
    from rftkit.lora import LoRALinear
    from rftkit.compress.quantize import linear_many
    torch.manual_seed(4)
    mods = [LoRALinear(QuantLinear.from_linear(nn.Linear(96, n, bias=b), bits, 32), r, 0.5)
            for n, b, r in ((40, True, 16), (24, False, 4), (56, True, 8))]
    for m in mods:
        nn.init.normal_(m.lora_B)
    mods[1].enabled = False
    for rows in (1, 3, 8, 64):
        x = torch.randn(rows, 96)
        with torch.no_grad():
            got = linear_many(mods, x)
            assert [g.shape for g in got] == [(rows, m.base.out_features) for m in mods]
            for g, m in zip(got, mods):
                assert torch.equal(g, m(x))
            torch.testing.assert_close(got[1], mods[1].base(x))
            assert not torch.allclose(got[0], mods[0].base(x), atol=1e-3)     # the LoRA really is in it
            assert linear_many(mods, torch.randn(65, 96)) is None              # past 64 rows: one by one
    assert linear_many([mods[0], nn.Linear(96, 8)], torch.randn(1, 96)) is None


def test_a_fresh_lora_on_a_quantized_model_wraps_every_quantized_layer_and_trains():
    """apply_lora's all-linear takes QuantLinear layers (QLoRA-style training on the low-bit base): every one
    but the lm_head gets a LoRA, a decode step's grouped kernel call gives the same logits as the layers one
    by one, and a backward pass reaches the LoRA weights only."""
    from rftkit.lora import LoRAConfig, apply_lora, lora_modules, lora_parameters
    model, _ = _quant_model(4)
    apply_lora(model, LoRAConfig(r=4))
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"]
    assert sorted(f"{n}.base" for n in lora_modules(model)) == sorted(quant) and len(quant) == 7 * model.cfg.n_layers
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B, std=0.1)
    ids = torch.randint(0, 96, (1, 1))
    with torch.no_grad():
        grouped = model(ids)[0]
        import rftkit.compress.quantize as rq
        alone = rq.linear_many
        rq.linear_many = lambda mods, x: None                   # every layer on its own
        try:
            separate = model(ids)[0]
        finally:
            rq.linear_many = alone
    assert torch.equal(grouped, separate)
    loss = model(torch.randint(0, 96, (2, 8)))[0].logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
