"""Guess a number in 1-100 from "higher" / "lower" answers: a genuinely multi-turn environment (docs/agents.md).

    rft train --config recipes/guess_number.yaml          # --env recipes/guess_env.py:GuessNumber

The sample's `answer` is the number. A turn whose last integer is the number ends the conversation; any other
turn is answered "Higher." or "Lower." (or asked again for a number). The run's task reward (last_integer on the
model's last turn) is 1 on success; this environment's final reward takes 0.1 per extra turn off a success, so
fewer turns score more: 1.0 in one turn, 0.4 in seven, 0 on failure.
"""
import re

from rftkit.environments import Environment


class GuessNumber(Environment):
    def reset(self, sample: dict) -> list[dict]:
        self.target, self.turns, self.solved = int(sample["answer"]), 0, False
        return [dict(m) for m in sample["messages"]]

    def step(self, text: str) -> tuple[list[dict], bool, float | None]:
        self.turns += 1
        found = re.findall(r"-?\d+", text)
        if not found:
            return [{"role": "user", "content": "Reply with just a number between 1 and 100."}], False, None
        guess = int(found[-1])
        if guess == self.target:
            self.solved = True
            return [], True, None
        return [{"role": "user", "content": "Higher." if guess < self.target else "Lower."}], False, None

    def reward(self, messages: list[dict]) -> float:
        return -0.1 * (self.turns - 1) if self.solved else 0.0
