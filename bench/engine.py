"""Decode throughput: our engine vs `transformers.generate` (and llama.cpp) on the embedded SmolLM2-135M, one run.

    python bench/engine.py                      # full: 64 x 128 batched, 128 single-stream, 3 repeats
    python bench/engine.py --quick              # smoke test: 8 x 16 batched, 16 single-stream, 1 repeat

Fixed lengths (EOS ignored), T=1, fp32, tok/s = generated tokens / wall time including prefill. Cases:
  single-stream    one request: ours vs transformers (vs llama-cpp-python on the very GGUF, when installed);
                   also the fraction of the bandwidth roofline measured in this run;
  batched          --batch requests of the same prompt: ours vs transformers;
  1 adapter        the batched case with every request on one LoRA adapter (r=16, all-linear, random PEFT
                   files in a temp dir, served through engine.adapters, loaded into their slots before
                   timing), vs the base model;
  16 adapters      the batched case with request i on adapter i % 16, vs 1 adapter.
The three engine cases alternate within each repeat (medians reported), so machine noise hits them alike.
Roofline: a decode step reads every weight once; memory bandwidth is measured here as the faster of a
read-only stream (sum of a 512 MB tensor) and a copy (read + write counted), both over initialised memory.
Every result line carries the load average: on a shared machine compare ratios, not absolute numbers.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu, load_avg  # noqa: E402

N_ADAPTERS = 16


def bandwidth_gbs() -> tuple[float, float]:
    """(read-only GB/s, copy GB/s counting read + write) over 512 MB of initialised memory, best of 5."""
    x = torch.ones(512 * 2**20 // 4)
    y = torch.zeros_like(x)
    read, cp = [], []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        y.copy_(x)
        cp.append(time.perf_counter() - t)
    nbytes = x.numel() * 4
    return nbytes / min(read) / 1e9, 2 * nbytes / min(cp) / 1e9


def make_adapters(model, root: Path, n: int, rank: int = 16) -> list[Path]:
    """n random PEFT-format adapters (rank r, all linear layers of the decoder) under root."""
    from rftkit.peft_format import AdapterConfig, write_adapter
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        weights = {}
        for path, m in model.named_modules():
            if path.rsplit(".", 1)[-1] in targets and isinstance(m, torch.nn.Linear):
                weights[path] = (torch.randn(rank, m.in_features, generator=g) * 0.02,
                                 torch.randn(m.out_features, rank, generator=g) * 0.02)
        cfg = AdapterConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
        write_adapter(root / f"a{i}", cfg, weights)
        paths.append(root / f"a{i}")
    return paths


def ours(engine, prompt, batch, tokens, adapters=None) -> float:
    from rftkit.sampling import SamplingParams
    sp = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True)
    engine.clear_prefix_cache()                  # every run starts cold (its own requests may share blocks)
    t = time.perf_counter()
    rids = [engine.add_request(prompt, sp, adapter=None if adapters is None else adapters[i % len(adapters)])
            for i in range(batch)]
    counts = dict.fromkeys(rids, 0)
    while engine.has_unfinished():
        for out in engine.step():
            counts[out.request_id] += len(out.token_ids)
    dt = time.perf_counter() - t
    assert all(c == tokens for c in counts.values()), counts
    return batch * tokens / dt


def hf(ref, prompt, batch, tokens) -> float:
    ids = torch.tensor([prompt] * batch)
    t = time.perf_counter()
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                       top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == tokens
    return batch * tokens / dt


def llama_cpp_runner(prompt):
    """A single-stream runner over llama-cpp-python on the embedded GGUF (4-bit weights), or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from rftkit.loading.embedded import _find_embedded_gguf
    llm = llama_cpp.Llama(model_path=str(_find_embedded_gguf()), n_ctx=1024, n_threads=torch.get_num_threads(),
                          n_batch=512, verbose=False, seed=0)

    def run(tokens):
        llm.reset()
        t = time.perf_counter()
        n = 0
        for _ in llm.generate(prompt, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, reset=True):  # never stops on EOS
            n += 1
            if n == tokens:
                break
        return tokens / (time.perf_counter() - t)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--single-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 x 16 batched, 16 single-stream, 1 repeat")
    ap.add_argument("--no-kernels", action="store_true", help="torch reference paths only (rftkit.kernels off)")
    ap.add_argument("--skip-hf", action="store_true", help="ours only (no transformers runs)")
    ap.add_argument("--per-op", action="store_true",
                    help="decode steps block by block, op by op (not the one-call stack of kernels.decode_layers)")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.tokens, args.single_tokens, args.repeats = 8, 16, 16, 1
    import transformers
    from rftkit import kernels
    from rftkit.engine import Engine
    from rftkit.loading import load
    from rftkit.loading.embedded import ensure_embedded
    kernels.set_enabled(not args.no_kernels)
    if args.per_op:
        import rftkit.decode_stack
        rftkit.decode_stack.run = lambda *a: False        # an A/B switch: the model's per-op path
    torch.manual_seed(0)
    model, tok = load(None)
    prompt = tok.encode_chat([{"role": "user", "content": "Write a story about a robot."}])
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    read_bw, copy_bw = bandwidth_gbs()
    bw = max(read_bw, copy_bw)
    roofline = bw * 1e9 / weight_bytes
    print(f"machine: {cpu()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, kernels: {kernels.status()}, {load_avg()}")
    print(f"memory bandwidth: read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB "
          f"-> single-stream roofline {roofline:.1f} tok/s; prompt {len(prompt)} tokens")
    max_len = len(prompt) + max(args.tokens, args.single_tokens) + 8
    base = Engine(model, max_seq_len=max_len, max_batch=args.batch)
    adapted_model = copy.deepcopy(model)         # the bank wraps its model's linears: keep the base run untouched
    lora = Engine(adapted_model, max_seq_len=max_len, max_batch=args.batch, adapter_slots=N_ADAPTERS)
    tmp = tempfile.TemporaryDirectory()
    names = []
    for i, path in enumerate(make_adapters(adapted_model, Path(tmp.name), N_ADAPTERS)):
        lora.adapters.register(f"a{i}", path)
        names.append(f"a{i}")
    for name in names:                           # load every adapter into its slot once: timed runs serve them
        lora.adapters.acquire(name)              # warm, as a server does after the first request
        lora.adapters.release(name)
    ref = None if args.skip_hf else \
        transformers.AutoModelForCausalLM.from_pretrained(str(ensure_embedded()), dtype=torch.float32).eval()
    cpp = llama_cpp_runner(prompt)

    # single stream
    s_ours, s_hf, s_cpp = [], [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            s_ours.append(ours(base, prompt, 1, args.single_tokens))
            if ref is not None:
                s_hf.append(hf(ref, prompt, 1, args.single_tokens))
            if cpp is not None:
                s_cpp.append(cpp(args.single_tokens))
    a = statistics.median(s_ours)
    line = f"single-stream   ours {a:7.1f} tok/s ({a / roofline:.0%} of roofline)"
    if s_hf:
        b = statistics.median(s_hf)
        line += f"  transformers {b:7.1f} tok/s  ratio {a / b:5.2f}x"
    line += f"  llama.cpp (Q4_1) {statistics.median(s_cpp):7.1f} tok/s  ratio {a / statistics.median(s_cpp):5.2f}x" \
        if s_cpp else "  llama.cpp: not installed"
    print(f"{line}  [{load_avg()}]", flush=True)

    # batched: base, 1 adapter, 16 adapters interleaved; transformers once per repeat
    runs = {"base": [], "one": [], "sixteen": [], "hf": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            runs["base"].append(ours(base, prompt, args.batch, args.tokens))
            runs["one"].append(ours(lora, prompt, args.batch, args.tokens, adapters=names[:1]))
            runs["sixteen"].append(ours(lora, prompt, args.batch, args.tokens, adapters=names))
            if ref is not None:
                runs["hf"].append(hf(ref, prompt, args.batch, args.tokens))
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    line = f"batch {args.batch:<3d}x{args.tokens:<4d} ours {med['base']:7.1f} tok/s"
    if "hf" in med:
        line += f"  transformers {med['hf']:7.1f} tok/s  ratio {med['base'] / med['hf']:5.2f}x"
    print(f"{line}  [{load_avg()}]")
    print(f"1 adapter (r=16, all-linear)  {med['one']:7.1f} tok/s  vs base {med['one'] / med['base']:5.2f}x")
    print(f"{N_ADAPTERS} distinct adapters          {med['sixteen']:7.1f} tok/s  vs 1 adapter "
          f"{med['sixteen'] / med['one']:5.2f}x  [{load_avg()}]")
    print("raw tok/s per repeat: " + "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v) for k, v in runs.items()
                                               if v))
    tmp.cleanup()


if __name__ == "__main__":
    main()
