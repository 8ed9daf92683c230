"""SFT throughput: our `rftkit.sft` vs TRL's `SFTTrainer` on the embedded SmolLM2-135M, in one run.

    python bench/sft.py [--steps 8] [--batch 8] [--accum 1] [--max-length 512] [--warmup 2]
    python bench/sft.py --quick          # a smoke run: 3 steps of batch 2, max_length 128

Both sides: the same JSONL of prompt/completion chats (lengths vary), the same chat template, loss on the
completion tokens, LoRA r=16 alpha=32 on all linear layers (PEFT on the TRL side), AdamW lr 2e-4, fp32
(bf16=False), gradient checkpointing off, global batch = batch x accum examples, max_length the same.
tokens/s = non-padding tokens (prompt + completion) of the timed steps / their wall time; the first
`--warmup` steps of each side are not timed (TRL's step time excludes its data collation and logging,
which run outside its step callbacks; ours includes them). Prints both and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu  # noqa: E402

WORDS = ("the model reads a prompt and writes an answer that is short clear and correct about numbers words "
         "cities rivers planets colours animals tools recipes stories rules games history science music").split()


def make_data(path: Path, n: int, seed: int = 0) -> Path:
    """n chats: prompts of 8-60 words, completions of 16-200 words (so sequences differ in length)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60)))
            c = " ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 200)))
            f.write(json.dumps({"prompt": [{"role": "user", "content": p}],
                                "completion": [{"role": "assistant", "content": c}]}) + "\n")
    return path


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ours(data: Path, out: Path, args) -> tuple[float, int, float]:
    from rftkit.sft import SFTConfig, train
    times, tokens = [], []
    cfg = SFTConfig(data=str(data), output=str(out), eval_fraction=0.0, steps=args.steps,
                    batch_size=args.batch * args.accum, micro_batch=args.batch, max_length=args.max_length, lr=2e-4,
                    warmup_steps=1, lora_r=16, lora_alpha=32.0, checkpoint_every=10**6, seed=0)
    train(cfg, progress=False, on_step=lambda step, row: (times.append(row["step_s"]), tokens.append(row["tokens"])))
    t, n = sum(times[args.warmup:]), sum(tokens[args.warmup:])
    return n / t, n, t


def trl(data: Path, out: Path, args) -> tuple[float, int, float]:
    import datasets
    import peft
    import transformers
    import trl as trl_lib
    from rftkit.loading.embedded import ensure_embedded
    folder = str(ensure_embedded())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ds = datasets.load_dataset("json", data_files=str(data), split="train")
    marks: dict[str, list] = {"begin": [], "end": [], "tokens": []}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            marks["begin"].append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            sync()
            marks["end"].append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                marks["tokens"].append(float(logs["num_tokens"]))

    cfg = trl_lib.SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                            gradient_accumulation_steps=args.accum, learning_rate=2e-4, warmup_steps=1,
                            lr_scheduler_type="cosine", bf16=False, fp16=False, gradient_checkpointing=False,
                            logging_steps=1, report_to="none", save_strategy="no", max_length=args.max_length,
                            use_cpu=not torch.cuda.is_available(), seed=0, dataloader_num_workers=0,
                            disable_tqdm=True)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl_lib.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                                 callbacks=[Timer()])
    trainer.train()
    cum = marks["tokens"]                                   # cumulative non-padding tokens after each step
    per_step = [b - a for a, b in zip([0] + cum[:-1], cum)]
    steps = [e - b for b, e in zip(marks["begin"], marks["end"])]
    if len(per_step) != len(steps):
        raise RuntimeError(f"TRL logged {len(per_step)} token counts for {len(steps)} steps")
    t, n = sum(steps[args.warmup:]), sum(per_step[args.warmup:])
    return n / t, int(n), t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="examples per forward (micro-batch)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--only", choices=["ours", "trl"], default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps (1 untimed) of batch 2, max_length 128")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch, args.accum, args.max_length = 3, 1, 2, 1, 128
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu()
    print(f"machine: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"setting: SmolLM2-135M fp32, LoRA r16 all-linear, batch {args.batch} x accum {args.accum}, "
          f"max_length {args.max_length}, {args.steps} steps ({args.warmup} untimed)")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data.jsonl", n=max(64, args.steps * args.batch * args.accum))
        results = {}
        for name, fn in (("ours", ours), ("trl", trl)):
            if args.only in (None, name):
                torch.manual_seed(0)
                results[name] = fn(data, Path(tmp) / name, args)
                tps, n, t = results[name]
                print(f"{name:5s}: {tps:8.1f} tokens/s  ({n} non-padding tokens in {t:.1f} s)", flush=True)
    if len(results) == 2:
        print(f"ratio ours / TRL: {results['ours'][0] / results['trl'][0]:.2f}x (load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
