"""Writes the data of the two agent recipes (docs/agents.md) into recipes/data/:

    python recipes/agent_data.py

multiply_{train,test}.jsonl   "What is A * B?" for 3-digit A, B (test pairs never in train), answer A*B
multiply_sft.jsonl            demonstrations for the warm start: call the calculator, then answer with its result,
                              in the exact messages the rollouts show the model (tools as system text)
guess_{train,test}.jsonl      guess a number in 1-100 (answer: the number); test: each number once
"""
import json
import random
from pathlib import Path

from rftkit.tool_calls import chat_messages
from rftkit.tools import calculator, tool_schema

OUT = Path(__file__).resolve().parent / "data"
MULTIPLY = "What is {a} * {b}? Answer with just the number."
GUESS = ("I am thinking of a whole number between 1 and 100. Guess it: reply with just a number. After each "
         "guess I say whether my number is higher or lower.")


def write(name: str, rows: list[dict]) -> None:
    (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(n_train: int = 4000, n_test: int = 200, n_sft: int = 32) -> None:
    rng = random.Random(0)
    pairs = list(dict.fromkeys((rng.randint(100, 999), rng.randint(100, 999)) for _ in range(3 * (n_train + n_test))))
    test, train = pairs[:n_test], pairs[n_test:n_test + n_train]
    row = lambda a, b: {"prompt": MULTIPLY.format(a=a, b=b), "answer": str(a * b)}
    write("multiply_test.jsonl", [row(a, b) for a, b in test])
    write("multiply_train.jsonl", [row(a, b) for a, b in train])
    demos = []
    for a, b in train[:n_sft]:
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}}]}
        msgs = [{"role": "user", "content": MULTIPLY.format(a=a, b=b)}, call,
                {"role": "tool", "content": calculator(f"{a} * {b}")},
                {"role": "assistant", "content": str(a * b)}]
        demos.append({"messages": chat_messages(msgs, [tool_schema(calculator)], False)[0]})
    write("multiply_sft.jsonl", demos)
    write("guess_train.jsonl", [{"prompt": GUESS, "answer": str(rng.randint(1, 100))} for _ in range(n_train)])
    write("guess_test.jsonl", [{"prompt": GUESS, "answer": str(n)} for n in range(1, 101)])


if __name__ == "__main__":
    main()
