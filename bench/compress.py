"""The deployment pair against fp32 and llama.cpp, on the same prompts, in one run.

    python bench/compress.py --adapter rft-demo/adapter                   # full: 1000 problems, 128 tokens
    python bench/compress.py --adapter rft-demo/adapter --quick           # smoke: 20 problems, 16 tokens

Three ways to serve the specialist (embedded SmolLM2 + the `rft demo` adapter):
  fp32 pair    our engine, fp32 base + unmerged adapter
  int4 pair    our engine, int4 (group 32) base + unmerged adapter: what `rft compress --method int4` writes
  llama.cpp    llama-cpp-python on the merged specialist exported by `rft export --gguf --gguf-type q4_1`
               (llama.cpp's own 4-bit layout, the adapter folded in); skipped, with a note, where
               llama-cpp-python is not installed (docs/benchmarks.md says how to build it)
Accuracy: greedy, the same held-out problems and chat-formatted prompt ids for all three (max 32 tokens, stop
at EOS, the task's reward). Speed: single-stream decode of the same prompt for --tokens tokens (EOS ignored),
the three alternating, best of --repeats; our batched decode (--batch rows) for the two pairs. Sizes: bytes of
the safetensors folder / GGUF file. Prints a table and writes JSON + a PNG (accuracy and single-stream tok/s per
runtime); every line carries the load average: on a shared machine compare ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.machine import cpu, load_avg  # noqa: E402


def llama_cpp_answers(llm, prompts: list[list[int]], eos: set[int], max_tokens: int = 32) -> list[list[int]]:
    outs = []
    for ids in prompts:
        got = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if int(t) in eos:
                break
            got.append(int(t))
            if len(got) == max_tokens:
                break
        outs.append(got)
    return outs


def llama_cpp_speed(llm, ids: list[int], tokens: int) -> float:
    t0 = time.perf_counter()
    n = 0
    for _ in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        n += 1
        if n == tokens:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-compress")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.tokens, args.batch, args.repeats = 20, 16, 4, 1
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu()}, {args.threads} threads, {load_avg()}", flush=True)
    try:
        from llama_cpp import Llama
    except ImportError:
        Llama = None
        print("llama-cpp-python is not installed: the llama.cpp row is skipped (docs/benchmarks.md: how to build it)")
    from rftkit.compress.folder import folder_bytes, save_compressed, load_compressed
    from rftkit.compress.transforms import compress
    from rftkit.compress.report import decode_speed
    from rftkit.evaluate import _score
    from rftkit.loading.gguf_file import write_gguf
    from rftkit.loading import load, resolve
    from rftkit.lora import load_lora, merge_lora
    from rftkit.tasks import get_task
    folder = resolve(None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp32, tok = load(None)
    int4, _ = load(None)
    int4, rec = compress(int4, "int4", group_size=32, head_bits=8)
    tmp = Path(tempfile.mkdtemp(dir=out))
    save_compressed(int4, rec, tmp / "int4", folder)
    int4 = load_compressed(tmp / "int4")
    for m in (fp32, int4):
        load_lora(m, args.adapter)
    sizes = {"fp32 pair": folder_bytes(folder), "int4 pair": folder_bytes(tmp / "int4")}
    llm = None
    if Llama is not None:
        special, _ = load(None)
        load_lora(special, args.adapter)
        merge_lora(special)
        gguf = write_gguf(special, tmp / "specialist-q4_1.gguf", folder, dtype="q4_1")
        del special
        sizes["llama.cpp q4_1"] = gguf.stat().st_size
        llm = Llama(str(gguf), n_ctx=1024, n_threads=args.threads, verbose=False)

    task = get_task(args.task)
    problems = task.samples("test", args.n, seed=0)
    prompts = [tok.encode_chat(p["messages"]) for p in problems]
    from rftkit.evaluate import evaluate
    acc = {"fp32 pair": evaluate(fp32, tok, task, "test", args.n, progress=False)["accuracy"],
           "int4 pair": evaluate(int4, tok, task, "test", args.n, progress=False)["accuracy"]}
    if llm is not None:
        t0 = time.perf_counter()
        answers = llama_cpp_answers(llm, prompts, set(tok.eos_token_ids))
        acc["llama.cpp q4_1"] = _score(task, problems, [[tok.decode(a)] for a in answers], 1,
                                       time.perf_counter() - t0)["accuracy"]
    print(f"accuracy on {args.n} held-out {args.task} problems: {acc}  ({load_avg()})", flush=True)

    ids = tok.encode_chat([{"role": "user", "content": "Write a story about a robot."}])
    single = {k: [] for k in sizes}
    batched = {"fp32 pair": [], "int4 pair": []}
    if llm is not None:
        llama_cpp_speed(llm, ids, 8)                                      # warm-up
    for _ in range(args.repeats):
        single["fp32 pair"].append(decode_speed(fp32, tok, 1, args.tokens))
        single["int4 pair"].append(decode_speed(int4, tok, 1, args.tokens))
        if llm is not None:
            single["llama.cpp q4_1"].append(llama_cpp_speed(llm, ids, args.tokens))
        batched["fp32 pair"].append(decode_speed(fp32, tok, args.batch, args.tokens // 2))
        batched["int4 pair"].append(decode_speed(int4, tok, args.batch, args.tokens // 2))
        print(f"repeat: single {[round(v[-1], 1) for v in single.values()]} batched "
              f"{[round(v[-1], 1) for v in batched.values()]} ({load_avg()})", flush=True)
    if llm is not None:
        llm.close()
    res = {"cpu": cpu(), "n": args.n, "tokens": args.tokens, "batch": args.batch, "threads": args.threads, "load": os.getloadavg(),
           "rows": {k: {"bytes": sizes[k], "accuracy": acc[k], "single_tok_s": max(single[k]),
                        "batched_tok_s": max(batched[k]) if k in batched else None} for k in sizes}}
    base = res["rows"]["fp32 pair"]
    print("| runtime | bytes | size vs fp32 | accuracy | single tok/s | vs fp32 | batched tok/s | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in res["rows"].items():
        b = f"{r['batched_tok_s']:.1f} | {r['batched_tok_s'] / base['batched_tok_s']:.2f}" if r["batched_tok_s"] \
            else "- | -"
        print(f"| {k} | {r['bytes']:,} | {r['bytes'] / base['bytes']:.3f} | {r['accuracy']:.3f} | "
              f"{r['single_tok_s']:.1f} | {r['single_tok_s'] / base['single_tok_s']:.2f} | {b} |")
    print(f"({load_avg()}, {args.threads} threads)")
    (out / "compress.json").write_text(json.dumps(res, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res["rows"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.bar(names, [res["rows"][k]["accuracy"] for k in names])
    a1.set_ylabel(f"accuracy ({args.n} held-out)")
    a2.bar(names, [res["rows"][k]["single_tok_s"] for k in names])
    a2.set_ylabel("single-stream decode tok/s")
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=8)
    fig.suptitle("specialist deployment: fp32 pair vs int4 pair (ours) vs llama.cpp Q4_1")
    fig.tight_layout()
    fig.savefig(out / "compress.png", dpi=120)
    print(f"wrote {out / 'compress.json'} and {out / 'compress.png'}")


if __name__ == "__main__":
    main()
