"""Constrained decoding's cost to the free rows of a batch, on the embedded SmolLM2-135M, one run.

    python bench/constrained.py                 # 16 rows x 96 tokens, 3 repeats
    python bench/constrained.py --quick         # smoke test: 4 rows x 8 tokens, 1 repeat

Two batches of --batch rows decode --tokens tokens each (EOS ignored, T=1, seeded, fp32, prefill included):
  all free   every row free;
  mixed      the same rows, half of them constrained by a JSON schema (a long array of objects with strings,
             integers and enums, so every constrained row stays under its grammar for the whole run).
Free rows' throughput = the free rows' tokens / wall time; the acceptance is a loss < 10% in the mixed batch.
Also printed: the mask time per constrained row and step, and the share of the mixed batch's time spent on
masks. The two cases alternate, in the order ABBA... (the first run of a pair measured slower here whichever case it
was), medians reported; wall time and this process's CPU time (all threads: on a machine shared with other
jobs, the CPU time is the steadier measure of the work done) are both shown, with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import load_avg  # noqa: E402

ITEM = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "tags"],
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                           "maximum": 120},
                       "city": {"type": "string"}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}}}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 100}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.tokens, args.repeats = 4, 8, 1
    import torch

    from rftkit import constrained
    from rftkit.constrained import Grammars
    from rftkit.engine import Engine
    from rftkit.loading import load
    from rftkit.sampling import SamplingParams
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load(None)
    t = time.perf_counter()
    grammars = Grammars(tok, model.cfg.vocab_size)
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    grammar = grammars.json_schema(SCHEMA)
    t_compile = time.perf_counter() - t
    engine = Engine(model, max_seq_len=512, max_batch=args.batch)
    B, T = args.batch, args.tokens
    prompts = [tok.encode_chat([{"role": "user", "content": f"List {i + 3} people as JSON: name, age, city, tags."}])
               for i in range(B)]

    def params(i: int, constrained_row: bool) -> SamplingParams:
        return SamplingParams(temperature=1.0, max_tokens=T, seed=i, ignore_eos=True,
                              stop_token_ids=list(tok.eos_token_ids), grammar=grammar if constrained_row else None)

    mask_s = [0.0]
    inner = constrained.allowed

    def timed_allowed(*a, **kw):                    # the masks' share of the mixed run
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        mask_s[0] += time.perf_counter() - t0
        return out
    constrained.allowed = timed_allowed

    def run(mixed: bool) -> tuple[float, float, list]:
        engine.clear_prefix_cache()
        t0, c0 = time.perf_counter(), time.process_time()
        out = engine.generate(prompts, [params(i, mixed and i % 2 == 1) for i in range(B)])
        return time.perf_counter() - t0, time.process_time() - c0, out

    run(True)                                       # warm-up: kernels, caches, the allocator
    walls = {"all free": [], "mixed": []}
    cpus = {"all free": [], "mixed": []}
    mask_share = []
    for r in range(args.repeats):
        for case in (("all free", "mixed") if r % 2 == 0 else ("mixed", "all free")):
            mask_s[0] = 0.0
            wall, cpu, out = run(case == "mixed")
            walls[case].append(wall)
            cpus[case].append(cpu)
            if case == "mixed":
                mask_share.append(mask_s[0] / wall)
                texts = [tok.decode(out[i][0].token_ids) for i in range(1, B, 2)]
                assert all(t.startswith("[") for t in texts), texts[:2]
    free_tokens = (B // 2 + B % 2) * T
    med = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    for case in walls:
        print(f"{case:9s} {B} rows x {T} tokens: {med[case]:.2f} s, free rows {free_tokens / med[case]:.1f} tok/s "
              f"(runs {', '.join(f'{w:.2f}' for w in walls[case])}); CPU {cpu[case]:.2f} s, free rows "
              f"{free_tokens / cpu[case]:.1f} tok per CPU-s  [{load_avg()}]")
    steps = T                                       # one sample per row per step
    print(f"free rows' throughput loss in the mixed batch: {100 * (1 - med['all free'] / med['mixed']):.1f}% by wall "
          f"time, {100 * (1 - cpu['all free'] / cpu['mixed']):.1f}% by CPU time (acceptance < 10%)")
    print(f"masks: {100 * statistics.median(mask_share):.1f}% of the mixed run, "
          f"{1e3 * statistics.median(mask_share) * med['mixed'] / (steps * (B // 2)):.2f} ms per constrained row "
          f"and step; llguidance tokenizer {t_tok:.2f} s once, schema compiled in {1e3 * t_compile:.1f} ms")
    print("example constrained row:", json.dumps(tok.decode(engine.generate(
        prompts[:1], params(1, True))[0][0].token_ids))[:160])


if __name__ == "__main__":
    main()
