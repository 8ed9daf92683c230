"""Requests to an OpenAI-compatible endpoint (an API, vLLM, `rft serve`) for judges and remote rewards: the
`openai` async client under a concurrency limit, requests- and tokens-per-minute limits (aiolimiter), retries
with exponential backoff and jitter on 429, 5xx, timeouts and dropped connections (tenacity), an on-disk cache,
and token usage counted.

    client = JudgeClient(JudgeOptions(base_url="http://127.0.0.1:8000/v1", concurrency=4, rpm=600))
    replies = client.chat_many([{"model": "judge", "messages": [...], "max_tokens": 16}], template="...")
    client.usage      # {"judge_requests": 3, "judge_cache_hits": 1, "judge_retries": 1, "judge_prompt_tokens": ...}

Each reply is the text, or an Exception for a request that still failed after the retries (a 4xx other than
429 is not retried: the request itself is wrong). Callers turn those into per-sample reward errors, which
`--on-reward-error` raises or counts.

The cache: one SQLite file in a folder (no pickle), keyed by a SHA-256 of the judge (endpoint and model), the
judge's template, and the full request (the rendered prompt and completion, sampling parameters). A second run
of the same judge over the same completions sends nothing. Sampling judges (temperature > 0) are cached too:
the cache is for reruns and `rft grade`, not for drawing several verdicts; `cache_dir=""` turns it off.

Defaults come from the environment, so `rft train --grader g.json` needs no judge flags:
RFTKIT_JUDGE_BASE_URL (else OPENAI_BASE_URL, else OpenAI's API), RFTKIT_JUDGE_API_KEY (else OPENAI_API_KEY),
RFTKIT_JUDGE_CONCURRENCY, RFTKIT_JUDGE_RPM, RFTKIT_JUDGE_TPM, RFTKIT_JUDGE_CACHE (a folder, "" for none).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

from rftkit.rewards import BatchReward


@dataclass
class JudgeOptions:
    base_url: str | None = None          # endpoint, e.g. http://127.0.0.1:8000/v1 (None: from the environment)
    api_key: str | None = None           # None: $RFTKIT_JUDGE_API_KEY or $OPENAI_API_KEY ("none" if unset)
    concurrency: int = 8                 # requests in flight at once
    rpm: float = 0.0                     # requests per minute (0 = no limit)
    tpm: float = 0.0                     # tokens per minute, prompt estimate + max tokens (0 = no limit)
    max_retries: int = 6                 # retries of a request on 429 / 5xx / timeout / connection error
    retry_wait_s: float = 1.0            # first backoff; doubles each retry (with jitter), at most 60 s
    timeout_s: float = 120.0             # per request
    cache_dir: str | None = None         # None: $RFTKIT_JUDGE_CACHE or <rftkit cache>/judge; "" = no cache

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"judge concurrency must be >= 1, got {self.concurrency}")
        for name in ("rpm", "tpm", "max_retries", "retry_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"judge {name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, **given) -> "JudgeOptions":
        """Fields given (not None) win; the rest come from RFTKIT_JUDGE_* (see the module docstring)."""
        env = os.environ.get
        values = {"base_url": env("RFTKIT_JUDGE_BASE_URL") or env("OPENAI_BASE_URL"),
                  "api_key": env("RFTKIT_JUDGE_API_KEY") or env("OPENAI_API_KEY"),
                  "cache_dir": env("RFTKIT_JUDGE_CACHE")}
        for name, kind in (("concurrency", int), ("rpm", float), ("tpm", float)):
            text = env(f"RFTKIT_JUDGE_{name.upper()}")
            if text:
                try:
                    values[name] = kind(text)
                except ValueError:
                    raise ValueError(f"RFTKIT_JUDGE_{name.upper()} must be a number, got {text!r}") from None
        values.update({k: v for k, v in given.items() if v is not None})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})


def _transient(e: BaseException) -> bool:
    import openai
    if isinstance(e, (openai.APIConnectionError, openai.APITimeoutError)):     # timeouts are connection errors
        return True
    if isinstance(e, openai.APIStatusError):
        return e.status_code == 429 or e.status_code >= 500
    return False


class Cache:
    """{key: JSON value} in one SQLite file; safe across processes (SQLite's own locking)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "judge-cache.sqlite"
        self.db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.commit()
        self.lock = threading.Lock()

    def get(self, key: str):
        with self.lock:
            row = self.db.execute("SELECT value FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, json.dumps(value)))
            self.db.commit()


def _limiter(per_minute: float):
    """A leaky bucket holding at most a second's worth (so a minute's quota is not spent in one burst), or a
    1-request bucket over 60/per_minute seconds for rates under one a second; None for no limit."""
    if per_minute <= 0:
        return None
    from aiolimiter import AsyncLimiter
    period = max(1.0, 60.0 / per_minute)
    return AsyncLimiter(per_minute * period / 60.0, period)


def _run(coro):
    """asyncio.run, from a thread that may already run an event loop (then in a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class JudgeClient:
    options: JudgeOptions = field(default_factory=JudgeOptions.from_env)
    usage: dict = field(default_factory=lambda: {"judge_requests": 0, "judge_cache_hits": 0, "judge_retries": 0,
                                                 "judge_failures": 0, "judge_prompt_tokens": 0,
                                                 "judge_completion_tokens": 0})

    def __post_init__(self):
        folder = self.options.cache_dir
        if folder is None:
            from rftkit.loading.cache import cache_dir
            folder = str(cache_dir() / "judge")
        self.cache = Cache(Path(folder)) if folder else None
        self._lock = threading.Lock()

    def _count(self, **add) -> None:
        with self._lock:
            for k, v in add.items():
                self.usage[k] += v

    def key(self, *parts) -> str:
        return hashlib.sha256(json.dumps([self.options.base_url, *parts], sort_keys=True, default=str)
                              .encode()).hexdigest()

    def chat_many(self, requests: list[dict], template: str = "") -> list:
        """One chat completion per request dict (model, messages, sampling fields): [reply text or Exception]."""
        async def call(client, req):
            r = await client.chat.completions.create(**req)
            if not r.choices:
                raise ValueError(f"the judge endpoint returned no choices for model {req.get('model')!r}")
            u = r.usage
            return r.choices[0].message.content or "", (u.prompt_tokens if u else 0, u.completion_tokens if u else 0)
        est = [len(json.dumps(r.get("messages", ""))) // 4 + int(r.get("max_tokens") or r.get("max_completion_tokens")
                                                                or 256) for r in requests]
        return self._many([(self.key("chat", template, r), r, e) for r, e in zip(requests, est)], call)

    def embed_many(self, model: str, texts: list[str]) -> list:
        """One embedding (list of floats) per text, or an Exception."""
        async def call(client, req):
            r = await client.embeddings.create(**req)
            u = r.usage
            return list(r.data[0].embedding), (u.prompt_tokens if u else 0, 0)
        return self._many([(self.key("embed", model, t), {"model": model, "input": t}, len(t) // 4 + 1)
                           for t in texts], call)

    def post_many(self, url: str, bodies: list[dict]) -> list:
        """POST each JSON body to `url` (not cached: a remote reward may change between runs): [JSON or Exception]."""
        async def call(client, body):
            r = await client.post(url, json=body)
            r.raise_for_status()
            return r.json(), (0, 0)
        return self._many([(None, b, 1) for b in bodies], call, where=url)

    def _many(self, jobs: list[tuple], call, where: str | None = None) -> list:
        """Run `call(client, request)` for each (cache key or None, request, token estimate) job, paced, retried
        and cached; `where` set: plain HTTP to that URL instead of the openai client."""
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random
        o = self.options
        out: list = [None] * len(jobs)
        todo = []
        for i, (key, req, est) in enumerate(jobs):
            hit = self.cache.get(key) if (self.cache is not None and key is not None) else None
            if hit is not None:
                out[i] = hit
                self._count(judge_cache_hits=1)
            else:
                todo.append(i)
        if not todo:
            return out

        http = where is not None

        def transient(e):
            if http:
                import httpx
                if isinstance(e, httpx.HTTPStatusError):
                    return e.response.status_code == 429 or e.response.status_code >= 500
                return isinstance(e, (httpx.TransportError,))
            return _transient(e)

        async def main():
            sem = asyncio.Semaphore(o.concurrency)
            rpm, tpm = _limiter(o.rpm), _limiter(o.tpm)
            if http:
                import httpx
                client = httpx.AsyncClient(timeout=o.timeout_s)
            else:
                from openai import AsyncOpenAI
                client = AsyncOpenAI(base_url=o.base_url, api_key=o.api_key or "none", max_retries=0,
                                     timeout=o.timeout_s)

            async def one(i):
                key, req, est = jobs[i]
                try:
                    async with sem:
                        async for attempt in AsyncRetrying(
                                stop=stop_after_attempt(o.max_retries + 1), reraise=True,
                                wait=wait_exponential(multiplier=o.retry_wait_s, max=60) + wait_random(0, o.retry_wait_s),
                                retry=retry_if_exception(transient),
                                before_sleep=lambda _: self._count(judge_retries=1)):
                            with attempt:
                                if rpm is not None:
                                    await rpm.acquire()
                                if tpm is not None:
                                    await tpm.acquire(min(est, tpm.max_rate))
                                self._count(judge_requests=1)
                                value, (p, c) = await call(client, req)
                    self._count(judge_prompt_tokens=p, judge_completion_tokens=c)
                    if self.cache is not None and key is not None:
                        self.cache.put(key, value)
                    out[i] = value
                except Exception as e:
                    self._count(judge_failures=1)
                    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    out[i] = RuntimeError(f"request to {where or o.base_url or 'the default endpoint'} failed: "
                                          f"{type(e).__name__}: {first_line}")
            try:
                await asyncio.gather(*(one(i) for i in todo))
            finally:
                await (client.aclose() if http else client.close())
        _run(main())
        return out


class EndpointReward(BatchReward):
    """A reward scored through an endpoint: its JudgeClient made on first use, its usage as metrics."""

    def __init__(self, judge: JudgeOptions | None):
        self.judge, self._client = judge, None

    @property
    def client(self) -> JudgeClient:
        if self._client is None:
            self._client = JudgeClient(self.judge or JudgeOptions.from_env())
        return self._client

    def metrics(self) -> dict:
        return dict(self._client.usage) if self._client is not None else {}
