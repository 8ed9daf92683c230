"""Does GRPO get a signal on a reasoning-gym task? Sample the embedded model on training problems as `rft train`
would (T = 1, G replies each) and count the replies in answer tags, the right ones (the task's exact score), and
the groups holding both a right and a wrong reply: the only groups GRPO learns from. Then greedy accuracy on
test problems. One line per task and number of worked examples (`reasoning_gym(..., shots=K)`).

    python bench/rg_signal.py                                  # the five tasks of the task table, 0, 1 and 2 shots
    python bench/rg_signal.py --tasks rg:gcd --shots 2 --problems 48
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TASKS = ["rg:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=2", "rg:letter_counting:min_words=1,max_words=3",
         "rg:leg_counting:min_animals=1,max_animals=2", "rg:spell_backward:max_word_len=4",
         "rg:basic_arithmetic:min_terms=2,max_terms=2,min_digits=1,max_digits=2"]


def main():
    from rftkit.engine import Engine
    from rftkit.loading import load
    from rftkit.sampling import SamplingParams
    from rftkit.tasks import get_task
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=";".join(TASKS), help="rg:NAME[:KEY=VALUE,...] task names, separated by \";\"")
    ap.add_argument("--shots", default="0,1,2", help="numbers of worked examples to try")
    ap.add_argument("--problems", type=int, default=24, help="training problems sampled")
    ap.add_argument("--group", type=int, default=8, help="replies per problem (G)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--test-n", type=int, default=50, help="test problems answered greedily")
    args = ap.parse_args()
    model, tok = load(None)
    engine, stop, t0 = Engine(model, max_seq_len=512, max_batch=64), list(tok.eos_token_ids), time.perf_counter()
    print("| task | shots | tagged | right (sampled) | groups with signal | reply tokens | greedy test accuracy |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for name in args.tasks.split(";"):
        for shots in map(int, args.shots.split(",")):
            task = get_task(name, size=2000, seed=0, shots=shots)
            probs = task.samples("train", args.problems, seed=0)
            groups = engine.generate([tok.encode_chat(p["messages"]) for p in probs], SamplingParams(
                temperature=1.0, max_tokens=args.max_tokens, n=args.group, seed=0, stop_token_ids=stop),
                progress=False)
            tagged, right, signal, lens = 0, 0, 0, []
            for p, group in zip(probs, groups):
                scores = []
                for c in group:
                    text = tok.decode(c.token_ids)
                    tagged += "<answer>" in text and "</answer>" in text
                    scores.append(task.default_reward(text, p) >= 1.0)
                    lens.append(len(c.token_ids))
                right, signal = right + sum(scores), signal + (len(set(scores)) > 1)
            test = task.samples("test", args.test_n, seed=0)
            greedy = engine.generate([tok.encode_chat(p["messages"]) for p in test], SamplingParams(
                temperature=0.0, max_tokens=args.max_tokens, n=1, stop_token_ids=stop), progress=False)
            acc = statistics.mean(task.default_reward(tok.decode(g[0].token_ids), p) >= 1.0
                                  for p, g in zip(test, greedy))
            n = args.problems * args.group
            print(f"| `{name}` | {shots} | {tagged / n:.2f} | {right / n:.3f} | {signal}/{args.problems} | "
                  f"{statistics.mean(lens):.1f} | {acc:.2f} |", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
