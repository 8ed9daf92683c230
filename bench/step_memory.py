"""One GRPO step's time and the process's peak memory, by model size and precision (rft train's --dtype,
--base-bits, --grad-checkpointing), each configuration in its own process so that ru_maxrss is its own.

    python bench/step_memory.py                                   # the table in docs/benchmarks.md (CPU)
    python bench/step_memory.py --configs qwen0.5b:qlora --steps 3
    python bench/step_memory.py --configs tiny:fp32,tiny:qlora:ckpt --steps 2     # a smoke run (seconds)

Models: `embedded` (SmolLM2-135M-Instruct as shipped), `qwen0.5b` (Qwen2.5-0.5B's shape, 494M parameters,
random weights built in-process: nothing is downloaded; its tokenizer is the embedded model's, whose ids are
all below Qwen's vocabulary), `tiny` (a smoke shape). Precisions: fp32, bf16, qlora (int4 base + fp32 LoRA);
`:ckpt` adds gradient checkpointing. A step is rft train's: 2 prompts x G=8 completions forced to --tokens
tokens (ignore_eos), LoRA r=16 all-linear, loss dapo, beta 0; its time is the median `step_s` of steps 2..N
and its split the trainer's own timers. Memory: ru_maxrss after the model is built in the given dtype, and
after the steps (the peak over the whole process). QLoRA quantizes inside train() as --base-bits 4 does, after
the fp32 model was built, so its peak includes the fp32 weights it started from unless the steps need more;
"RSS after load" is the fp32 model then. On CUDA also torch's peak allocation.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu  # noqa: E402

DEFAULT = "embedded:fp32,embedded:qlora,embedded:fp32:ckpt,qwen0.5b:fp32,qwen0.5b:qlora,qwen0.5b:fp32:ckpt"
# Qwen2.5-0.5B's config.json, as our ModelConfig
QWEN05 = dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64, ffn_dim=4864,
              norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, tie_embeddings=True, qkv_bias=True,
              model_type="qwen2")
TINY = dict(vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # Linux: KiB


def build(shape: str, dtype):
    """(model, tokenizer) of a shape: the embedded model loaded, or a random one of that config."""
    import torch
    from rftkit.loading import load, load_tokenizer
    from rftkit.model import ModelConfig, Transformer
    if shape == "embedded":
        return load(None, dtype=dtype)
    torch.manual_seed(0)
    cfg = ModelConfig(**(QWEN05 if shape == "qwen0.5b" else TINY))
    with torch.device("cpu"):
        model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)                      # a usual init scale: finite, spread-out logits
    return model.to(dtype).eval(), load_tokenizer(None)


def one(spec: str, args) -> dict:
    """Run one configuration in this process; returns its row."""
    import torch
    import rftkit.compress.quantize  # noqa: F401  registers the base quantizer (as the rft command does)
    from rftkit.grpo import GRPOConfig, train
    from rftkit.precision import resolve_dtype
    shape, precision, *rest = spec.split(":")
    ckpt = rest == ["ckpt"]
    if precision not in ("fp32", "bf16", "qlora") or rest not in ([], ["ckpt"]):
        raise ValueError(f"config {spec!r}: expected SHAPE:fp32|bf16|qlora[:ckpt]")
    dtype = resolve_dtype("bf16" if precision == "bf16" else "fp32")
    t0 = time.perf_counter()
    model, tok = build(shape, dtype)
    load_s, rss_loaded = time.perf_counter() - t0, rss_mib()
    n_params = model.parameter_count()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(task="arithmetic", output=out, steps=args.steps, prompts_per_step=2, group_size=8,
                         max_tokens=args.tokens, ignore_eos=True, lr=2e-4, warmup_steps=1, lora_r=16, lora_alpha=32.0,
                         loss_type="dapo", beta=0.0, dynamic_sampling=False, micro_batch_groups=2,
                         checkpoint_every=10**6, seed=0, log_samples=0, device="cpu",
                         base_bits=4 if precision == "qlora" else 0, grad_checkpointing=ckpt)
        train(cfg, model, tok, progress=False, summary=False, on_step=lambda s, row: rows.append(row))
    timed = rows[1:] or rows
    med = lambda k: statistics.median(r[k] for r in timed)               # noqa: E731
    row = {"config": spec, "params_M": round(n_params / 1e6, 1), "load_s": round(load_s, 1),
           "rss_loaded_MiB": round(rss_loaded), "rss_peak_MiB": round(rss_mib()), "steps": len(rows),
           "step_s": round(med("step_s"), 2), "gen_s": round(med("gen_s"), 2),
           "forward_s": round(med("forward_s"), 2), "backward_s": round(med("backward_s"), 2)}
    if torch.cuda.is_available():
        row["cuda_peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=DEFAULT, help="SHAPE:PRECISION[:ckpt],... (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps per configuration (median of 2..N)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per completion")
    ap.add_argument("--one", help=argparse.SUPPRESS)        # the child process: one configuration, JSON out
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.one, args)), flush=True)
        return
    print(f"# {cpu()}; load average {os.getloadavg()[0]:.2f} at the start; "
          f"{args.steps} steps of 2 x 8 completions x {args.tokens} tokens")
    print("| config | params (M) | RSS after load (MiB) | peak RSS (MiB) | step (s) | "
          "generation / forward / backward (s) |")
    print("|---|---|---|---|---|---|")
    for spec in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", spec, "--steps", str(args.steps), "--tokens", str(args.tokens)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not found:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            print(f"| {spec} | failed (exit {done.returncode}): {tail[0][:120]} |||||", flush=True)
            continue
        r = json.loads(found[0])
        print(f"| {spec} | {r['params_M']} | {r['rss_loaded_MiB']:,} | {r['rss_peak_MiB']:,} | {r['step_s']} | "
              f"{r['gen_s']} / {r['forward_s']} / {r['backward_s']} |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
