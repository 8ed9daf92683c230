"""The kill test: `rft train` and `rft sft` SIGKILLed at random moments (checkpoints written every step, so
many kills land inside a save), resumed each time with --resume; every resume must succeed and the final
adapter must equal an uninterrupted run's with the same seed.

    python -m pytest -m slow tests/test_kill_resume.py -s      # prints where each kill landed
"""
import json
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file


KILLS = 10


def _rft(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rftkit.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _adapter(out) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _logged_step(out) -> int:
    """The newest step in out/metrics.jsonl (a torn last line ignored)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps)


def _kill_and_resume(args: list[str], out, steps: int, rng: random.Random) -> list[str]:
    """Start `args --resume` into `out` and SIGKILL it KILLS times, each time a random moment after it logged a
    randomly chosen step (its checkpoint is written right after: many kills land inside the save); then let it
    finish. Returns where each kill landed."""
    landed = []
    for target in sorted(rng.sample(range(1, steps), KILLS)):
        proc = _rft([*args, "--output", str(out), "--resume"])
        while _logged_step(out) < target and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = out / "checkpoints"
        saving = ck.is_dir() and any(p.name.startswith((".tmp-", ".old-")) for p in ck.iterdir())
        newest = max((p.name for p in ck.glob("step-*")), default=None) if ck.is_dir() else None
        landed.append(f"after step {target}: {'inside a save' if saving else 'between saves'}, newest {newest}")
    proc = _rft([*args, "--output", str(out), "--resume"])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), "duplicate metric rows after resumes"
    return landed


def _same(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "sft"])
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_folder, command):
    if command == "train":
        steps = 14
        args = ["train", "--model", str(tiny_folder), "--steps", str(steps), "--prompts-per-step", "2", "--group-size",
                "4", "--max-tokens", "8", "--lr", "0.05", "--lora-r", "4", "--checkpoint-every", "1", "--seed", "3"]
    else:
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "completion": str(2 * i)}) + "\n"
                                for i in range(64)))
        steps = 14
        args = ["sft", "--model", str(tiny_folder), "--data", str(data), "--steps", str(steps), "--batch-size", "4",
                "--micro-batch", "2", "--lr", "0.01", "--lora-r", "4", "--checkpoint-every", "1", "--seed", "3"]
    t0 = time.perf_counter()
    ref = _rft([*args, "--output", str(tmp_path / "ref")])
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    seconds = time.perf_counter() - t0
    landed = _kill_and_resume(args, tmp_path / "killed", steps, random.Random(command))
    diff = _same(_adapter(tmp_path / "ref"), _adapter(tmp_path / "killed"))
    print(f"\nrft {command}: uninterrupted run {seconds:.1f} s; {KILLS} SIGKILLs, " + "; ".join(landed) +
          f"; final adapter max |diff| {diff:.2e}")
    assert diff < 1e-5
