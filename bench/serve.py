"""Serving throughput: many adapters vs one adapter, through `rft serve` over real HTTP on loopback.

    python bench/serve.py                                   # 1,000 adapters on disk, 2,000 requests per phase
    python bench/serve.py --requests 200 --distinct 100     # smoke test
    python bench/serve.py --soak                            # + 10,000 requests, Zipf over all 1,000 adapters
    python bench/serve.py --soak-only --soak-requests 200 --adapters 50 --max-loaded-adapters 8 --model DIR
                                                            # the soak alone, small, on any model folder

The server is `rft serve` in its own process (a real uvicorn on 127.0.0.1) on the embedded SmolLM2-135M, with
`--adapters` pointing at N random PEFT-format adapters (r=8 on q_proj, v_proj; written once into the cache and
reused). C concurrent clients (httpx, one connection each) send short completion prompts for exactly
`--tokens` new tokens (EOS ignored, so every answer has a known length); every other request is streamed and
gives a time to first token. Two phases over the same server, same prompts, same request count:

  one:   every request on one adapter (already loaded);
  zipf:  each request's adapter drawn from `--distinct` adapters with Zipf(s) popularity (the first request
         for an adapter pays its registration and slot load, as in production).

Throughput = generated tokens / wall time of the phase (first send to last answer); the ratio zipf/one is the
number the issue asks for (target >= 0.8). Each phase checks zero errors (non-200, error events, exceptions)
and zero lost (every request answered with exactly `--tokens` tokens). Adapter registration and slot-load
latency, slot loads/evictions come from the server's /metrics, as deltas over each phase.

soak:  `--soak-requests` (10,000) requests at `--concurrency`, Zipf over all adapters on disk (1,000 against
       128 device slots: thousands of evictions). It first sends one request to every adapter (warm-up: each
       is registered once, its metadata part of the steady state), then reads the server's RSS, runs the soak,
       reads it again. It fails unless there are zero errors, zero lost answers, evictions happened (when there
       are more adapters than slots), nothing is left running, no request was counted 5xx by the server, and
       the RSS at the end is within `--soak-rss-tolerance` (5%) of the RSS after warm-up.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RANK, TARGETS = 8, ("q_proj", "v_proj")


# ----------------------------------------------------------------------------------------------------------
# adapters on disk

def make_adapters(root: Path, n: int, seed: int = 0, model: str | None = None) -> Path:
    """N random PEFT-format LoRA adapters (r=8, q_proj + v_proj) for the embedded model, `a0000`..; written once
    (a `.complete` marker records the recipe), reused on later runs."""
    import torch

    from rftkit.peft_format import AdapterConfig, write_adapter
    from rftkit.loading import EMBEDDED, load_config, resolve
    recipe = {"n": n, "rank": RANK, "targets": list(TARGETS), "seed": seed, "model": model or EMBEDDED}
    marker = root / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return root
    cfg = load_config(resolve(model))
    shapes = {"q_proj": (cfg.n_heads * cfg.head_dim, cfg.dim), "v_proj": (cfg.n_kv_heads * cfg.head_dim, cfg.dim)}
    acfg = AdapterConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS),
                         base_model_name_or_path=model or EMBEDDED)
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        weights = {}
        for layer in range(cfg.n_layers):
            for name in TARGETS:
                out, inp = shapes[name]
                A = torch.randn(RANK, inp, generator=gen) / inp ** 0.5           # [R, in]
                B = torch.randn(out, RANK, generator=gen) * 0.02                 # [out, R]
                weights[f"model.layers.{layer}.self_attn.{name}"] = (A, B)
        write_adapter(root / f"a{i:04d}", acfg, weights)
    marker.write_text(json.dumps(recipe))
    print(f"wrote {n} adapters to {root} in {time.perf_counter() - t:.1f} s", flush=True)
    return root


# ----------------------------------------------------------------------------------------------------------
# the server process

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, adapters: Path, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "rftkit.cli", "serve", "--adapters", str(adapters), "--port", str(port),
           "--max-loaded-adapters", str(args.max_loaded_adapters), "--max-batch", str(args.max_batch),
           "--max-seq-len", "512", "--max-pending", str(max(4096, args.concurrency * 4)), "--device", "cpu"]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    env.pop("RFTKIT_API_KEY", None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    return wait_healthy(proc, url, log), url


def wait_healthy(proc: subprocess.Popen, url: str, log, timeout_s: float = 120) -> subprocess.Popen:
    """`proc` once the server at `url` answers /health; it is killed if it does not within `timeout_s`."""
    import httpx
    t = time.perf_counter()
    while time.perf_counter() - t < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} (log: {log.name})")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {timeout_s:g} s (log: {log.name})")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process (all threads), or of its thread `tid` (Linux /proc)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def read_metrics(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    import httpx
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def hist(before: dict, after: dict, name: str) -> dict:
    """Count, mean and bucket-interpolated p50 / p99 of a Prometheus histogram over [before, after]."""
    pre = f"rftkit_{name}_bucket{{le=\""
    edges = sorted((float(k[len(pre):-2]), after[k] - before.get(k, 0)) for k in after if k.startswith(pre))
    count = after.get(f"rftkit_{name}_count", 0) - before.get(f"rftkit_{name}_count", 0)
    total = after.get(f"rftkit_{name}_sum", 0) - before.get(f"rftkit_{name}_sum", 0)

    def quantile(q):
        lo_edge, lo_count = 0.0, 0.0
        for edge, c in edges:                       # cumulative counts
            if c >= q * count:
                if edge == float("inf"):
                    return lo_edge
                return lo_edge + (edge - lo_edge) * (q * count - lo_count) / max(c - lo_count, 1e-9)
            lo_edge, lo_count = edge, c
        return float("nan")
    return {"count": int(count), "mean": total / count if count else float("nan"),
            "p50": quantile(0.5) if count else float("nan"), "p99": quantile(0.99) if count else float("nan")}


# ----------------------------------------------------------------------------------------------------------
# the clients

def zipf_models(rng, names: list[str], s: float, size: int) -> list[str]:
    """`size` draws from `names` with P(k-th name) proportional to 1 / k**s."""
    import numpy as np
    p = 1.0 / np.arange(1, len(names) + 1) ** s
    return [names[k] for k in rng.choice(len(names), size=size, p=p / p.sum())]


async def one_request(client, url: str, spec: dict, tokens: int, timeout: float) -> dict:
    """Send one completion; classify it: ok, error (HTTP status / error event / exception) or lost (no complete
    answer: timeout, stream cut short, wrong token count)."""
    body = {"model": spec["model"], "prompt": spec["prompt"], "max_tokens": tokens, "temperature": 1.0,
            "seed": spec["seed"], "ignore_eos": True, "stream": spec["stream"]}
    if spec["stream"]:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    res = {"stream": spec["stream"], "ttft": None, "tokens": 0, "status": "ok", "why": ""}
    try:
        async with asyncio.timeout(timeout):
            if not spec["stream"]:
                r = await client.post(url + "/v1/completions", json=body)
                if r.status_code != 200:
                    return {**res, "status": "error", "why": f"HTTP {r.status_code}: {r.text[:200]}"}
                res["tokens"] = r.json()["usage"]["completion_tokens"]
            else:
                done = False
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        return {**res, "status": "error", "why": f"HTTP {r.status_code}: {(await r.aread())[:200]}"}
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        event = json.loads(line[6:])
                        if "error" in event:
                            return {**res, "status": "error", "why": f"error event: {event['error']}"}
                        if event["choices"] and res["ttft"] is None:
                            res["ttft"] = time.perf_counter() - t0
                        if event.get("usage"):
                            res["tokens"] = event["usage"]["completion_tokens"]
                if not done:
                    return {**res, "status": "lost", "why": "the stream ended without [DONE]"}
    except TimeoutError:
        return {**res, "status": "lost", "why": f"no answer within {timeout} s"}
    except Exception as e:                  # noqa: BLE001 - every failure is counted and shown, none hidden
        return {**res, "status": "error", "why": f"{type(e).__name__}: {e}"}
    res["latency"] = time.perf_counter() - t0
    if res["tokens"] != tokens:
        return {**res, "status": "lost", "why": f"{res['tokens']} tokens instead of {tokens}"}
    return res


async def drive(url: str, specs: list[dict], concurrency: int, tokens: int, timeout: float) -> tuple[list, float]:
    """`concurrency` clients, each sending its next request as soon as its previous one is answered."""
    import httpx
    todo = iter(range(len(specs)))
    results: list = [None] * len(specs)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        async def worker():
            for i in todo:
                results[i] = await one_request(client, url, specs[i], tokens, timeout)
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t
    return results, wall


# ----------------------------------------------------------------------------------------------------------
# phases and the report

def pct(values: list[float], q: float) -> float:
    import numpy as np
    return float(np.percentile(values, q)) if values else float("nan")


def run_phase(name: str, url: str, pid: int, specs: list[dict], args) -> dict:
    before, cpu0, http0 = read_metrics(url), cpu_seconds(pid), cpu_seconds(pid, pid)
    results, wall = asyncio.run(drive(url, specs, args.concurrency, args.tokens, args.timeout))
    # the main thread runs the event loop (HTTP, JSON, detokenizing); the others are the engine and torch's
    after, cpu, http = read_metrics(url), cpu_seconds(pid) - cpu0, cpu_seconds(pid, pid) - http0
    ok = [r for r in results if r["status"] == "ok"]
    bad = [r for r in results if r["status"] != "ok"]
    tokens = sum(r["tokens"] for r in ok)
    delta = lambda key: after.get(f"rftkit_{key}", 0) - before.get(f"rftkit_{key}", 0)   # noqa: E731
    out = {"name": name, "requests": len(specs), "adapters": len({s["model"] for s in specs}), "wall": wall,
           "tok_s": tokens / wall, "req_s": len(ok) / wall, "errors": sum(r["status"] == "error" for r in bad),
           "lost": sum(r["status"] == "lost" for r in bad), "why": [r["why"] for r in bad[:5]],
           "ttft_p50": pct([r["ttft"] for r in ok if r["ttft"] is not None], 50),
           "ttft_p99": pct([r["ttft"] for r in ok if r["ttft"] is not None], 99),
           "lat_p50": pct([r["latency"] for r in ok], 50), "lat_p99": pct([r["latency"] for r in ok], 99),
           "cpu_ms_per_token": 1000 * cpu / max(tokens, 1), "http_cpu_share": http / max(cpu, 1e-9),
           "registrations": hist(before, after, "adapter_load_seconds"),
           "slot_loads": hist(before, after, "adapter_slot_load_seconds"),
           "slot_loads_total": delta("adapter_loads_total"), "evictions": delta("adapter_evictions_total"),
           "server_ttft": hist(before, after, "time_to_first_token_seconds"),
           "running_after": after.get("rftkit_running_sequences", float("nan")),
           "load": os.getloadavg()}
    print(f"{name:>5}: {out['requests']} requests over {out['adapters']} adapters in {wall:.1f} s: "
          f"{out['tok_s']:.1f} tok/s, {out['req_s']:.2f} req/s; errors {out['errors']}, lost {out['lost']}; "
          f"TTFT p50 {out['ttft_p50'] * 1e3:.0f} ms p99 {out['ttft_p99'] * 1e3:.0f} ms (streamed); latency p50 "
          f"{out['lat_p50']:.2f} s p99 {out['lat_p99']:.2f} s; server CPU {out['cpu_ms_per_token']:.1f} ms/token "
          f"({out['http_cpu_share']:.0%} in the HTTP thread); "
          f"load {out['load'][0]:.2f} {out['load'][1]:.2f} {out['load'][2]:.2f}", flush=True)
    reg, slot = out["registrations"], out["slot_loads"]
    print(f"       adapters: {reg['count']} registered (read + validate: mean {reg['mean'] * 1e3:.1f} ms, p50 "
          f"{reg['p50'] * 1e3:.1f} ms, p99 {reg['p99'] * 1e3:.1f} ms); {out['slot_loads_total']:.0f} slot loads "
          f"(mean {slot['mean'] * 1e3:.1f} ms, p50 {slot['p50'] * 1e3:.1f} ms, p99 {slot['p99'] * 1e3:.1f} ms), "
          f"{out['evictions']:.0f} evictions; server TTFT p50 {out['server_ttft']['p50'] * 1e3:.0f} ms p99 "
          f"{out['server_ttft']['p99'] * 1e3:.0f} ms", flush=True)
    for why in out["why"]:
        print(f"       failed: {why}")
    return out


def run_soak(url: str, pid: int, names: list[str], rng, args) -> dict:
    """Warm-up (one request per adapter), RSS, `--soak-requests` requests Zipf over the adapters, RSS."""
    pool = names if args.soak_distinct is None else names[:args.soak_distinct]
    warm = run_phase("warm", url, pid, specs_for(pool, offset=3 * 10**6), args)
    rss0 = rss_mb(pid)
    soak_models = zipf_models(rng, [pool[i] for i in rng.permutation(len(pool))], args.zipf_s, args.soak_requests)
    soak = run_phase("soak", url, pid, specs_for(soak_models, offset=2 * 10**6), args)
    rss1 = rss_mb(pid)
    growth = rss1 / rss0 - 1
    five = sum(v for k, v in read_metrics(url).items() if k.startswith("rftkit_requests_total{") and 'status="5' in k)
    failed = [f"warm-up: {warm['errors']} errors, {warm['lost']} lost"] if warm["errors"] or warm["lost"] else []
    if growth > args.soak_rss_tolerance:
        failed.append(f"RSS grew {growth:.1%} over the soak (limit {args.soak_rss_tolerance:.0%})")
    if len(pool) > args.max_loaded_adapters and not soak["evictions"]:
        failed.append("no evictions: the soak did not exercise slot reuse")
    if five:
        failed.append(f"{five:.0f} requests answered 5xx by the server")
    print(f" soak: {soak['requests']} requests over {soak['adapters']} adapters ({len(pool)} on disk, "
          f"{args.max_loaded_adapters} slots): errors {soak['errors']}, lost {soak['lost']}, evictions "
          f"{soak['evictions']:.0f}; server RSS {rss0:.0f} MB after warm-up, {rss1:.0f} MB at the end "
          f"({growth:+.1%}); 5xx {five:.0f}; {'ok' if not failed else 'FAILED: ' + '; '.join(failed)}", flush=True)
    return {**soak, "rss_warm_mb": rss0, "rss_end_mb": rss1, "rss_growth": growth, "failed": failed}


def specs_for(models: list[str], offset: int = 0) -> list[dict]:
    return [{"model": m, "prompt": f"Q{offset + i}: write one sentence about the number {offset + i}.",
             "seed": offset + i, "stream": i % 2 == 0} for i, m in enumerate(models)]


def main() -> int:
    import numpy as np

    from rftkit.loading import cache_dir
    from rftkit.serve.app import ServeConfig
    defaults = ServeConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=1000, help="adapters on disk")
    ap.add_argument("--distinct", type=int, default=100, help="adapters the zipf phase draws from")
    ap.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    ap.add_argument("--requests", type=int, default=2000, help="requests per phase")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    ap.add_argument("--max-loaded-adapters", type=int, default=defaults.max_loaded_adapters)
    ap.add_argument("--max-batch", type=int, default=defaults.max_batch)
    ap.add_argument("--adapter-dir", type=Path, default=None, help="where the adapters are written (cache)")
    ap.add_argument("--soak", action="store_true", help="then 10,000 requests, Zipf over all adapters (slow)")
    ap.add_argument("--soak-requests", type=int, default=10_000)
    ap.add_argument("--soak-distinct", type=int, default=None, help="adapters the soak draws from (default: all)")
    ap.add_argument("--soak-only", action="store_true", help="skip the one / zipf phases: warm-up and soak only")
    ap.add_argument("--soak-rss-tolerance", type=float, default=0.05, help="allowed RSS growth over the soak")
    ap.add_argument("--model", default=None, help="model folder to serve (default: the embedded SmolLM2-135M)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before an unanswered request is lost")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.distinct > args.adapters:
        ap.error(f"--distinct {args.distinct} exceeds --adapters {args.adapters}")
    tag = "" if args.model is None else "-" + Path(args.model).name
    folder = args.adapter_dir or cache_dir() / "bench" / f"serve-adapters-{args.adapters}-r{RANK}{tag}"
    make_adapters(folder, args.adapters, model=args.model)
    names = [f"a{i:04d}" for i in range(args.adapters)]
    rng = np.random.default_rng(args.seed)
    popular = [names[i] for i in rng.permutation(args.adapters)[:args.distinct]]   # popularity rank order
    zipf = zipf_models(rng, popular, args.zipf_s, args.requests)
    print(f"command: python bench/serve.py {' '.join(sys.argv[1:])}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; server: max_loaded_adapters "
          f"{args.max_loaded_adapters}, max_batch {args.max_batch}; {args.concurrency} clients, {args.tokens} "
          f"tokens per request, half streamed; {args.adapters} adapters on disk (r={RANK}, q_proj+v_proj)",
          flush=True)
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"rftkit-bench-serve-{os.getpid()}.log", "w")
    proc, url = start_server(args, folder, log)
    try:
        warm = specs_for([popular[0]] * args.concurrency, offset=10**6)
        asyncio.run(drive(url, warm, args.concurrency, args.tokens, args.timeout))
        phases = []
        if not args.soak_only:
            one = run_phase("one", url, proc.pid, specs_for([popular[0]] * args.requests), args)
            many = run_phase("zipf", url, proc.pid, specs_for(zipf), args)
            phases += [one, many]
            ratio = many["tok_s"] / one["tok_s"]
            print(f"ratio zipf/one: {ratio:.4f} tok/s, {many['req_s'] / one['req_s']:.4f} req/s, server CPU per "
                  f"token {one['cpu_ms_per_token'] / many['cpu_ms_per_token']:.3f} (target >= 0.8: "
                  f"{'met' if ratio >= 0.8 else 'NOT met'}); load {os.getloadavg()}", flush=True)
        soak_failed = []
        if args.soak or args.soak_only:
            phases.append(soak := run_soak(url, proc.pid, names, rng, args))
            soak_failed = soak["failed"]
        failed = [p["name"] for p in phases if p["errors"] or p["lost"] or p["running_after"] != 0] + soak_failed
        if proc.poll() is not None:
            failed.append(f"the server exited with {proc.returncode}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    if failed:
        print(f"FAILED: {failed} (server log: {log.name})")
        return 1
    os.unlink(log.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
