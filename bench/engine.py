"""Decode throughput: our engine vs `transformers.generate` on the embedded SmolLM2-135M, in one run.

    python bench/engine.py [--batch 64] [--tokens 128] [--repeats 3]

Fixed lengths (EOS ignored), T=1, fp32, tok/s = generated tokens / wall time including prefill. Also
measures this machine's memory bandwidth (a large tensor copy) in the same run and prints the single-stream
roofline it implies: one decode step must read every weight once.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def bandwidth_gbs() -> float:
    x = torch.empty(256 * 2**20 // 4)
    y = torch.empty_like(x)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * 4 / min(times) / 1e9      # read + write


def ours(model, prompt, batch, tokens):
    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    engine = Engine(model, max_seq_len=len(prompt) + tokens + 8, max_batch=batch)
    t = time.perf_counter()
    outs = engine.generate([prompt] * batch, SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True))
    dt = time.perf_counter() - t
    assert all(len(g[0].token_ids) == tokens for g in outs)
    return batch * tokens / dt


def hf(ref, prompt, batch, tokens):
    ids = torch.tensor([prompt] * batch)
    t = time.perf_counter()
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                       max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == tokens
    return batch * tokens / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--single-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers
    from rftkit.loading import ensure_embedded, load
    torch.manual_seed(0)
    model, tok = load(None)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(ensure_embedded()), dtype=torch.float32).eval()
    prompt = tok.encode_chat([{"role": "user", "content": "Write a story about a robot."}])
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    bw = bandwidth_gbs()
    roofline = bw * 1e9 / weight_bytes
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"memory bandwidth {bw:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB -> single-stream roofline "
          f"{roofline:.1f} tok/s")
    rows = []
    for name, batch, n in (("single-stream", 1, args.single_tokens), (f"batch {args.batch}", args.batch, args.tokens)):
        with torch.inference_mode():
            a = statistics.median(ours(model, prompt, batch, n) for _ in range(args.repeats))
            b = statistics.median(hf(ref, prompt, batch, n) for _ in range(args.repeats))
        rows.append((name, a, b))
        extra = f", {a / roofline:.0%} of roofline" if batch == 1 else ""
        print(f"{name:14s} ours {a:7.1f} tok/s  transformers {b:7.1f} tok/s  ratio {a / b:5.2f}x{extra}")


if __name__ == "__main__":
    main()
