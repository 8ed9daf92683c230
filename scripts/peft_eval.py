"""Accuracy of an rftkit adapter loaded with PEFT onto `transformers` (the independent check of `rft demo`).

    python scripts/peft_eval.py rft-demo/adapter [--n 200]

Same held-out problems, same prompt through the same chat template, greedy, at most 32 new tokens, the same
last-integer rule — but the model, the adapter and the decoding are transformers' and PEFT's.
"""
import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    import peft
    import transformers
    from rftkit.loading.embedded import ensure_embedded
    from rftkit.rewards import last_integer
    from rftkit.tasks import arithmetic
    folder = str(ensure_embedded())
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, args.adapter).eval()
    problems = arithmetic().samples("test", args.n, seed=0)
    correct, t0 = 0, time.time()
    for i in range(0, len(problems), args.batch):
        chunk = problems[i:i + args.batch]
        texts = [tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True) for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        for p, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            correct += last_integer(tok.decode(row, skip_special_tokens=True), p) == 1.0
    print(f"PEFT + transformers: accuracy {correct / len(problems):.3f} on {len(problems)} held-out problems "
          f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
