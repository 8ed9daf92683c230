"""Serving throughput while a fine-tuning job trains on the same box, against idle serving, in one run.

    python bench/serve_while_training.py                         # 60 s per phase, 4 clients, 1 job thread
    python bench/serve_while_training.py --seconds 20 --job-threads 2

`rft serve` runs in its own process on the embedded SmolLM2-135M (a real uvicorn on 127.0.0.1, --adapters in a
temporary folder, so fine-tuning jobs are on). C clients (httpx, one thread each) send chat completions of 2-digit
additions for exactly `--tokens` new tokens (EOS ignored: every answer has a known length). Two phases:

  idle:     no job;
  training: an RFT job (string_check grader: the answer in the completion; group size 8, 4 prompts per
            step, 32 new tokens as in rft demo) created through /v1/fine_tuning/jobs and trained in its worker
            process with `--job-threads` torch threads; the phase starts once the job has logged its first
            step, and the job is cancelled after it.

Throughput = generated tokens / the phase's wall time; the table also gives request latency (p50, p95) and the
job's steps during the phase. Run it on an otherwise idle machine: the two phases share the same cores.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.serve import free_port, wait_healthy  # noqa: E402  the server helpers of the other serving benchmark

KEY = "bench-key"


def start_server(adapters: Path, threads: int, log):
    import subprocess

    port = free_port()
    cmd = [sys.executable, "-m", "rftkit.cli", "serve", "--adapters", str(adapters), "--port", str(port),
           "--api-key", KEY, "--max-seq-len", "512", "--device", "cpu", "--job-threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    return wait_healthy(proc, url, log), url


def load(url: str, clients: int, seconds: float, tokens: int) -> dict:
    """C threads sending requests back to back for `seconds`; tokens/s, requests, latencies, errors."""
    import httpx
    stop = time.perf_counter() + seconds
    lat, errors, generated = [], [], [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            k = 0
            while time.perf_counter() < stop:
                a, b = 10 + (i * 37 + k * 11) % 90, 10 + (i * 53 + k * 7) % 90
                k += 1
                t = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json={
                    "model": "smollm2-135m-instruct", "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}]})
                with lock:
                    if r.status_code != 200:
                        errors.append(r.status_code)
                        continue
                    lat.append(time.perf_counter() - t)
                    generated[0] += r.json()["usage"]["completion_tokens"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"tok_s": generated[0] / wall, "requests": len(lat), "errors": len(errors), "wall": wall,
            "p50": statistics.median(lat), "p95": lat[int(0.95 * (len(lat) - 1))]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per answer (EOS ignored)")
    p.add_argument("--job-threads", type=int, default=1, help="torch threads of the job's worker process")
    p.add_argument("--screenshot", default=None, help="also save the console (/ui) as PNG here, after the "
                                                       "training phase (headless Chromium)")
    args = p.parse_args()
    from openai import OpenAI
    tmp = Path(tempfile.mkdtemp(prefix="rftkit-bench-jobs-"))
    (tmp / "adapters").mkdir()
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}],
             "answer": str(a + b)} for a in range(10, 100, 7) for b in range(10, 100, 9)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = open(tmp / "server.log", "w")
    proc, url = start_server(tmp / "adapters", args.job_threads, log)
    try:
        client = OpenAI(base_url=url + "/v1", api_key=KEY)
        load(url, args.clients, 5, args.tokens)                              # warm-up: first-call costs
        idle = load(url, args.clients, args.seconds, args.tokens)
        print(f"idle:     {idle['tok_s']:.1f} tok/s, {idle['requests']} requests, p50 {idle['p50']:.2f} s, "
              f"p95 {idle['p95']:.2f} s, errors {idle['errors']}", flush=True)
        f = client.files.create(file=open(tmp / "train.jsonl", "rb"), purpose="fine-tune")
        grader = {"type": "string_check", "name": "answer", "input": "{{ sample.output_text }}",
                  "reference": "{{ item.answer }}", "operation": "like"}
        job = client.fine_tuning.jobs.create(
            model="smollm2-135m-instruct", training_file=f.id,
            method={"type": "reinforcement", "reinforcement": {"grader": grader,
                                                               "hyperparameters": {"batch_size": 4}}},
            extra_body={"rftkit": {"steps": 10_000, "group_size": 8, "max_tokens": 32, "checkpoint_every": 1000}})
        t = time.perf_counter()
        while not [e for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data if e.type == "metrics"]:
            status = client.fine_tuning.jobs.retrieve(job.id)
            if status.status not in ("queued", "running"):
                raise RuntimeError(f"the job ended before its first step: {status.status} {status.error}")
            time.sleep(0.5)
        print(f"job {job.id}: first step after {time.perf_counter() - t:.1f} s", flush=True)

        def steps() -> list:
            return [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=10_000).data
                    if e.type == "metrics"]
        before = len(steps())
        busy = load(url, args.clients, args.seconds, args.tokens)
        done = steps()
        step_s = statistics.median(r["step_s"] for r in done[:len(done) - before]) if len(done) > before else float("nan")
        print(f"training: {busy['tok_s']:.1f} tok/s, {busy['requests']} requests, p50 {busy['p50']:.2f} s, "
              f"p95 {busy['p95']:.2f} s, errors {busy['errors']}; the job did {len(done) - before} steps "
              f"(median {step_s:.2f} s/step)", flush=True)
        if args.screenshot:
            import subprocess
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={tmp / 'chromium'}", "--window-size=1280,900",
                            "--virtual-time-budget=10000", f"--screenshot={Path(args.screenshot).resolve()}",
                            f"{url}/ui#key={KEY}"], check=True, timeout=180, capture_output=True)
        client.fine_tuning.jobs.cancel(job.id)
        print(f"\n| phase | tok/s | requests | p50 s | p95 s | errors | job steps |\n|---|---|---|---|---|---|---|\n"
              f"| idle | {idle['tok_s']:.1f} | {idle['requests']} | {idle['p50']:.2f} | {idle['p95']:.2f} | "
              f"{idle['errors']} | - |\n| training (job threads {args.job_threads}) | {busy['tok_s']:.1f} | "
              f"{busy['requests']} | {busy['p50']:.2f} | {busy['p95']:.2f} | {busy['errors']} | "
              f"{len(done) - before} ({step_s:.2f} s/step) |\n\nratio training / idle: "
              f"{busy['tok_s'] / idle['tok_s']:.2f}")
        for _ in range(60):
            if client.fine_tuning.jobs.retrieve(job.id).status == "cancelled":
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=90)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
