"""The drift loop, measured: an adapter trained on 2-digit additions serves traffic that shifts to 3-digit
additions; one `rft train --from-logs` run on the logged traffic (verifier reward, warm start from the serving
adapter) makes v2, served next to v1; both are measured on the new and the old traffic.

    python bench/drift.py --output drift-run                # ~40 min on 2 cores; rerun the same line to resume
    python bench/drift.py --output /tmp/d --model TINY_DIR --v1-budget 20 --v2-budget 20 --traffic-old 10 \
        --traffic-new 20 --eval-n 10                        # a smoke test of the script on a small model folder

Phases (each one's result goes to OUTPUT/results.json as it ends; a rerun skips finished phases, and the two
training runs continue from their checkpoints):
  1. v1   `rft train --task arithmetic` (2-digit, as `rft demo`) for --v1-budget s; adapter-best/ is v1.
  2. serve `rft serve --adapters OUTPUT/adapters --log-requests OUTPUT/logs` in its own process, v1 as add-v1.
  3. traffic: --traffic-old 2-digit then --traffic-new 3-digit questions (the tasks' train splits) to add-v1,
     greedy, 8 at a time, through the openai client; the served accuracy is read back from the request log.
  4. v2   `rft train --from-logs OUTPUT/logs --logs-adapter add-v1 --task-reward arithmetic_verifier
     --eval-fraction 0.2` for --v2-budget s (warm start: the adapter that served the traffic; the best on the
     held-out logged prompts is kept), copied into the adapters folder as add-v2: served without a restart.
  5. measure add-v1 and add-v2 through the server: 2-digit and 3-digit test splits (never trained on, never in
     the traffic) and the held-out logged prompts (`rft eval --from-logs ... --split validation`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def rft(*args: str, log: Path) -> None:
    """One `rft` command in its own process (this checkout's), its output appended to `log`."""
    cmd = [sys.executable, "-m", "rftkit.cli", *args]
    print(f"$ rft {' '.join(args)}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ rft {' '.join(args)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    if rc != 0:
        sys.exit(f"drift: rft {args[0]} failed ({rc}); see {log}")


def load_results(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(out: Path, results: dict) -> None:
    (out / "results.json.tmp").write_text(json.dumps(results, indent=1))
    os.replace(out / "results.json.tmp", out / "results.json")


def publish(adapter: Path, adapters: Path, name: str) -> None:
    """Copy an adapter into the served folder atomically (the server hot-loads a folder once it is complete)."""
    if (adapters / name).exists():
        return
    tmp = adapters / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter, tmp)
    os.rename(tmp, adapters / name)


def start_server(out: Path, log: Path, model: list[str]):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    f = open(log, "a")
    proc = subprocess.Popen([sys.executable, "-m", "rftkit.cli", "serve", "--adapters", str(out / "adapters"),
                             "--log-requests", str(out / "logs"), "--port", str(port), "--max-batch", "32", *model],
                            stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"drift: rft serve exited ({proc.returncode}); see {log}")
        time.sleep(0.5)
    sys.exit("drift: rft serve did not start in 5 minutes")


def send_traffic(url: str, model: str, problems: list[dict]) -> None:
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=2, timeout=300)

    def ask(p):
        client.chat.completions.create(model=model, messages=p["messages"], temperature=0, max_tokens=32)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, problems))


def iso(t: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def served_accuracy(out: Path, since: float, until: float) -> tuple[float, int]:
    """The verifier's score of what the server answered between two times, read from its request log."""
    from rftkit.rewards import arithmetic_verifier
    with sqlite3.connect(out / "logs" / "requests.db") as con:
        rows = con.execute("SELECT messages, completions FROM requests WHERE created >= ? AND created < ?",
                           (since, until)).fetchall()
    scores = [arithmetic_verifier(json.loads(c)[0], {"messages": json.loads(m)}) for m, c in rows]
    return sum(scores) / max(len(scores), 1), len(scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", default="drift-run")
    ap.add_argument("--v1-budget", type=float, default=540.0, help="seconds of GRPO for v1 (2-digit)")
    ap.add_argument("--v2-budget", type=float, default=720.0, help="seconds of GRPO for v2 (from the logs)")
    ap.add_argument("--traffic-old", type=int, default=150, help="2-digit requests before the shift")
    ap.add_argument("--traffic-new", type=int, default=400, help="3-digit requests after it")
    ap.add_argument("--eval-n", type=int, default=200, help="test problems per measurement")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    model = ["--model", args.model] if args.model else []
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters").mkdir(exist_ok=True)
    log = out / "drift.log"
    results = load_results(out)
    results.setdefault("args", vars(args))
    t_all = time.time()

    # 1. v1 on 2-digit additions
    if "v1" not in results:
        t = time.time()
        rft("train", "--task", "arithmetic", "--time-budget", str(args.v1_budget), "--steps", "0",
            "--eval-every", "20", "--eval-n", "100", "--output", str(out / "v1"), "--resume", *model, log=log)
        best = out / "v1" / "adapter-best"
        results["v1"] = {"seconds": time.time() - t, "adapter": str(best if best.is_dir() else out / "v1" / "adapter")}
        save_results(out, results)
    publish(Path(results["v1"]["adapter"]), out / "adapters", "add-v1")

    # 2. serve, with request logging
    from rftkit.evaluate import evaluate_remote
    from rftkit.tasks import arithmetic
    old, new = arithmetic(digits=2), arithmetic(digits=3)
    proc, url = start_server(out, log, model)
    try:
        # 3. traffic: 2-digit, then the shift to 3-digit
        if "traffic" not in results:
            t0 = time.time()
            send_traffic(url, "add-v1", old.samples("train", args.traffic_old, seed=7))
            t1 = time.time()
            send_traffic(url, "add-v1", new.samples("train", args.traffic_new, seed=7))
            t2 = time.time()
            time.sleep(1.0)                         # the log's writer thread is a moment behind the answers
            acc_old, n_old = served_accuracy(out, t0, t1)
            acc_new, n_new = served_accuracy(out, t1, t2 + 1.0)
            results["traffic"] = {"seconds": t2 - t0, "since": t0, "until": t2 + 1.0, "served_old": acc_old,
                                  "n_old": n_old,
                                  "served_new": acc_new, "n_new": n_new}
            save_results(out, results)
            print(f"drift: add-v1 answered {acc_old:.1%} of {n_old} 2-digit and {acc_new:.1%} of {n_new} 3-digit "
                  f"requests correctly", flush=True)

        # 4. v2 from the logs of the traffic window (the evaluations below go through the server, and are logged too)
        window = ["--logs-since", iso(results["traffic"]["since"]), "--logs-until", iso(results["traffic"]["until"])]
        if "v2" not in results:
            t = time.time()
            rft("train", "--from-logs", str(out / "logs"), "--logs-adapter", "add-v1", *window, "--task-reward",
                "arithmetic_verifier", "--eval-fraction", "0.2", "--time-budget", str(args.v2_budget), "--steps", "0",
                "--eval-every", "20", "--eval-n", "60", "--output", str(out / "v2"), "--resume", *model, log=log)
            best = out / "v2" / "adapter-best"
            results["v2"] = {"seconds": time.time() - t,
                             "adapter": str(best if best.is_dir() else out / "v2" / "adapter")}
            save_results(out, results)
        publish(Path(results["v2"]["adapter"]), out / "adapters", "add-v2")
        models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        assert "add-v2" in models, models

        # 5. measure both versions through the server
        for name in ("add-v1", "add-v2"):
            key = f"eval {name}"
            if key in results:
                continue
            t = time.time()
            row = {}
            for label, task in (("old", old), ("new", new)):
                r = evaluate_remote(url + "/v1", name, task, "test", args.eval_n, max_tokens=32)
                row[label] = r["accuracy"]
            held = out / f"heldout-{name}.jsonl"
            rft("eval", "--from-logs", str(out / "logs"), "--logs-adapter", "add-v1", *window, "--eval-fraction", "0.2",
                "--split", "validation", "--reward", "arithmetic_verifier", "--base-url", url + "/v1",
                "--served-model", name, "--output", str(held), log=log)
            scores = [json.loads(line)["scores"][0] for line in held.read_text().splitlines()]
            row.update(heldout=sum(s >= 1 for s in scores) / len(scores), n_heldout=len(scores),
                       seconds=time.time() - t)
            results[key] = row
            save_results(out, results)
            print(f"drift: {name}: 2-digit {row['old']:.1%}, 3-digit {row['new']:.1%}, held-out logged prompts "
                  f"{row['heldout']:.1%} ({len(scores)})", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    results.setdefault("total_seconds_last_run", time.time() - t_all)
    save_results(out, results)
    v1, v2, tr = results["eval add-v1"], results["eval add-v2"], results["traffic"]
    n = args.eval_n
    table = [
        f"| adapter | 2-digit test ({n}) | 3-digit test ({n}) | held-out logged prompts ({v1['n_heldout']}) |",
        "|---|---|---|---|",
        f"| v1 (add-v1: {args.v1_budget:.0f} s GRPO on 2-digit) | {v1['old']:.1%} | {v1['new']:.1%} | "
        f"{v1['heldout']:.1%} |",
        f"| v2 (add-v2: + {args.v2_budget:.0f} s GRPO from the logs) | {v2['old']:.1%} | {v2['new']:.1%} | "
        f"{v2['heldout']:.1%} |",
        "",
        f"Served by v1 (read from the request log): {tr['served_old']:.1%} of {tr['n_old']} 2-digit requests, "
        f"{tr['served_new']:.1%} of {tr['n_new']} 3-digit requests.",
        "",
        "| phase | wall time |", "|---|---|",
        f"| v1 training (rft train, incl. its evaluations) | {results['v1']['seconds']:.0f} s |",
        f"| traffic ({tr['n_old'] + tr['n_new']} requests) | {tr['seconds']:.0f} s |",
        f"| v2 training (rft train --from-logs, incl. its evaluations) | {results['v2']['seconds']:.0f} s |",
        f"| measuring v1 / v2 (3 evaluations each, through the server) | {v1['seconds']:.0f} s / "
        f"{v2['seconds']:.0f} s |",
    ]
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
