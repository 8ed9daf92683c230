"""The trained calculator adapter behind `rft serve`, driven by the `openai` client: for each held-out problem the
model answers with a `tool_calls` entry, the client runs the calculator and sends the result back as a `tool`
message, and the model's next answer is scored (the last integer equals the product). This is the round trip a
user's agent loop makes; the prompt the server builds is the one the rollouts trained on (rftkit.tool_calls).

    python recipes/agent_serve.py --adapter runs/tool_multiply/adapter --n 50
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rftkit.tools import calculator, tool_schema


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="the trained calculator adapter folder")
    ap.add_argument("--data", default="recipes/data/multiply_test.jsonl")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--stream", action="store_true", help="stream both answers")
    args = ap.parse_args()
    from openai import OpenAI

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[:args.n]]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(args.adapter, Path(tmp) / "calculator")
        port, key = free_port(), "agent-serve-key"
        server = subprocess.Popen([sys.executable, "-m", "rftkit.cli", "serve", "--adapters", tmp, "--port", str(port),
                                   "--api-key", key, "--max-jobs", "0"], env={**os.environ, "OMP_NUM_THREADS": "2"})
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=300)
            for _ in range(600):
                try:
                    client.models.list()
                    break
                except Exception:                       # noqa: BLE001 - still starting
                    if server.poll() is not None:
                        raise SystemExit(f"rft serve exited with {server.returncode}")
                    time.sleep(0.5)
            tools = [tool_schema(calculator)]
            called = right = 0
            t0 = time.perf_counter()
            for row in rows:
                messages = [{"role": "user", "content": row["prompt"]}]

                def ask():
                    kw = dict(model="calculator", messages=messages, tools=tools, temperature=0, max_tokens=40)
                    if not args.stream:
                        return client.chat.completions.create(**kw).choices[0].message
                    content, calls = "", {}
                    for chunk in client.chat.completions.create(stream=True, **kw):
                        for c in chunk.choices:
                            content += c.delta.content or ""
                            for tc in c.delta.tool_calls or []:
                                calls.setdefault(tc.index, tc)
                    return type("M", (), {"content": content, "tool_calls": list(calls.values()) or None})()
                first = ask()
                if not first.tool_calls:
                    continue
                called += 1
                call = first.tool_calls[0]
                messages.append({"role": "assistant", "content": first.content or None, "tool_calls": [
                    {"id": call.id, "type": "function",
                     "function": {"name": call.function.name, "arguments": call.function.arguments}}]})
                result = calculator(**json.loads(call.function.arguments))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
                ints = re.findall(r"-?\d+", (ask().content or "").replace(",", ""))
                right += bool(ints) and ints[-1] == str(row["answer"])
            wall = time.perf_counter() - t0
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps({"n": len(rows), "tool_called": called, "correct": right, "accuracy": right / len(rows),
                      "stream": args.stream, "wall_s": round(wall, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
