"""The server's engine thread: one thread owns the Engine; the HTTP layer talks to it through a queue.

    worker = EngineWorker(engine, adapters_dir="adapters/")
    worker.start(asyncio.get_running_loop())
    stream = worker.submit([(prompt_ids, params)], adapter="math-v2")   # from the event loop
    item = await stream.queue.get()     # "accepted" once per prompt, then StepOutputs; or an exception

Why a thread: a step is a forward pass (milliseconds to seconds); run on the event loop it would stall /health
and every open stream. Torch releases the GIL inside its kernels, so the loop keeps answering meanwhile.
Nothing but this thread touches the engine: requests, aborts, adapter loads and unloads all arrive through one
inbox and are applied between steps; what HTTP reads without waiting (counters) is a snapshot this thread
publishes after each step. Results go back with one `call_soon_threadsafe` per step, routed by request id to
the asyncio queue of the HTTP request that owns them.

Adapters load on first use: a request naming adapter X makes this thread register `DIR/X` with the engine's
bank (read + validated there), and re-register it when its files changed on disk. At most
`max_loaded_adapters` stay registered; beyond that the least recently used one no running request needs is
unloaded (the bank itself keeps only `adapter_slots` of them on the device, LRU too).
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from rftkit.adapters import CONFIG_FILE, WEIGHTS_FILE, safe_adapter_path
from rftkit.engine import Engine
from rftkit.sampling import SamplingParams


class AdapterError(Exception):
    """An adapter that cannot be served; `status` is the HTTP status it maps to (404 missing, 400 invalid,
    409 busy)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def adapter_folder(root: str | Path | None, name: str) -> Path:
    """DIR/name, with the name checked (ValueError) and the folder required to exist (AdapterError 404)."""
    if root is None:
        raise AdapterError(404, f"adapter {name!r} not found: the server was started without --adapters")
    path = safe_adapter_path(root, name)
    if not path.is_dir():
        raise AdapterError(404, f"adapter {name!r} not found in {root}")
    return path


def list_adapters(root: str | Path | None) -> list[str]:
    """Names of the folders in DIR that hold an adapter_config.json, sorted."""
    if root is None or not Path(root).is_dir():
        return []
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and os.path.isfile(os.path.join(e.path, CONFIG_FILE)))


def _signature(path: Path) -> tuple:
    """What identifies the adapter's files on disk: a changed signature means re-register."""
    sig = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            st = os.stat(path / name)
            sig.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            sig.append(None)
    return tuple(sig)


@dataclass
class Stream:
    """The engine requests of one HTTP request and the asyncio queue their results arrive on."""
    rids: list[int]
    jobs: list[tuple[list[int], SamplingParams]]
    adapter: str | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    t_submit: float = field(default_factory=time.perf_counter)


class EngineWorker:
    def __init__(self, engine: Engine, adapters_dir: str | Path | None = None, max_loaded_adapters: int = 64,
                 max_pending: int = 4096, metrics: "Metrics | None" = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.adapters_dir = None if adapters_dir is None else Path(adapters_dir)
        self.max_loaded = max_loaded_adapters
        self.max_pending = max_pending
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[int, Stream] = {}          # rid -> stream; event-loop thread only
        self.next_rid = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None      # set if the engine thread died
        self._stop = False
        # engine-thread state
        self.registered: OrderedDict[str, tuple] = OrderedDict()   # name -> file signature, LRU order
        self.active: dict[int, tuple[str | None, int]] = {}        # rid -> (adapter, sequences not finished)
        self.snapshot: dict = {}

    # ------------------------------------------------------------------ event-loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="rftkit-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        self.inbox.put(("wake",))
        if self.thread is not None:
            self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.error is None

    def pending(self) -> int:
        return self.snapshot.get("waiting", 0) + self.inbox.qsize()

    def submit(self, jobs: list[tuple[list[int], SamplingParams]], adapter: str | None) -> Stream:
        if not self.alive:
            raise RuntimeError(f"the engine thread is not running ({self.error!r})")
        if self.pending() >= self.max_pending:
            raise OverflowError(f"{self.pending()} requests are waiting (limit {self.max_pending}); retry later")
        rids = list(range(self.next_rid, self.next_rid + len(jobs)))
        self.next_rid += len(jobs)
        stream = Stream(rids, jobs, adapter)
        for rid in rids:
            self.streams[rid] = stream
        self.inbox.put(("add", stream))
        return stream

    def release(self, stream: Stream, abort) -> None:
        """The HTTP request is done with `stream`: forget it, and abort the engine requests in `abort`."""
        for rid in stream.rids:
            self.streams.pop(rid, None)
        for rid in abort:
            self.inbox.put(("abort", rid))

    def call(self, fn, *args) -> asyncio.Future:
        """Run fn(*args) on the engine thread between steps; await the result."""
        fut: Future = Future()
        self.inbox.put(("call", fut, fn, args))
        return asyncio.wrap_future(fut)

    def _deliver(self, outs) -> None:
        for item in outs:
            rid, value = item
            stream = self.streams.get(rid)
            if stream is not None:
                stream.queue.put_nowait((rid, value))

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stop:
                busy = self.engine.has_unfinished()
                cmds = []
                if not busy:
                    try:
                        cmds.append(self.inbox.get(timeout=0.2))
                    except queue.Empty:
                        pass
                while True:
                    try:
                        cmds.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                replies: list = []
                for cmd in cmds:
                    self._handle(cmd, replies)
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        replies.append((out.request_id, out))
                        if out.finished:
                            self._finished(out.request_id)
                self._publish()
                if replies:
                    self.loop.call_soon_threadsafe(self._deliver, replies)
        except BaseException as e:          # a dead engine must not look alive: /health turns 503
            self.error = e
            self.loop.call_soon_threadsafe(self._fail_all, e)
            raise

    def _fail_all(self, e: BaseException) -> None:
        for rid, stream in list(self.streams.items()):
            stream.queue.put_nowait((rid, RuntimeError(f"the engine failed: {e!r}")))

    def _handle(self, cmd, replies: list) -> None:
        kind = cmd[0]
        if kind == "add":
            stream: Stream = cmd[1]
            try:
                if stream.adapter is not None:
                    self._ensure(stream.adapter)
                    self.registered.move_to_end(stream.adapter)
                for rid, (prompt, params) in zip(stream.rids, stream.jobs):
                    kw = {} if stream.adapter is None else {"adapter": stream.adapter}
                    self.engine.add_request(prompt, params, request_id=rid, **kw)
                    self.active[rid] = (stream.adapter, params.n)
                    replies.append((rid, "accepted"))
            except Exception as e:             # noqa: BLE001 - handed to the request that caused it
                for rid in stream.rids:
                    if rid in self.active:
                        self.engine.abort(rid)
                        self.active.pop(rid)
                    replies.append((rid, e))
        elif kind == "abort":
            if cmd[1] in self.active:
                self.engine.abort(cmd[1])
                self.active.pop(cmd[1])
        elif kind == "call":
            fut, fn, args = cmd[1:]
            try:
                fut.set_result(fn(*args))
            except Exception as e:             # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _finished(self, rid: int) -> None:
        if rid in self.active:
            adapter, left = self.active[rid]
            if left <= 1:
                del self.active[rid]
            else:
                self.active[rid] = (adapter, left - 1)

    def _in_use(self, name: str) -> bool:
        return any(a == name for a, _ in self.active.values())

    # adapter registry: engine thread only (called directly or through `call`)
    def _ensure(self, name: str) -> None:
        """Register DIR/name with the engine unless registered with the same files; errors name the problem."""
        path = adapter_folder(self.adapters_dir, name)
        sig = _signature(path)
        if self.registered.get(name) == sig:
            return
        if sig[0] is None:
            raise AdapterError(400, f"adapter {name!r} is incomplete: {path} has no {CONFIG_FILE}")
        t = time.perf_counter()
        try:
            self.engine.adapters.register(name, path)
        except (ValueError, FileNotFoundError) as e:
            self.registered.pop(name, None)
            raise AdapterError(400, f"adapter {name!r} is invalid: {e}") from None
        self.metrics.observe("adapter_load_seconds", time.perf_counter() - t)
        self.registered[name] = sig
        while len(self.registered) > self.max_loaded:
            victim = next((n for n in self.registered if n != name and not self._in_use(n)), None)
            if victim is None:
                break
            self.engine.adapters.unload(victim)
            del self.registered[victim]

    def load_adapter(self, name: str) -> dict:
        self._ensure(name)
        self.registered.move_to_end(name)
        return next(i for i in self.engine.adapters.info() if i["name"] == name)

    def unload_adapter(self, name: str) -> None:
        if name not in self.registered:
            raise AdapterError(404, f"adapter {name!r} is not loaded")
        if self._in_use(name):
            n = sum(a == name for a, _ in self.active.values())
            raise AdapterError(409, f"adapter {name!r} has {n} requests running; unload it when they finish")
        self.engine.adapters.unload(name)
        del self.registered[name]

    def adapter_info(self) -> list[dict]:
        return self.engine.adapters.info()

    def _publish(self) -> None:
        e = self.engine
        snap = {"running": e.num_running, "waiting": sum(len(g) for g in e.waiting) + bool(e.prefilling),
                "requests_active": len(self.active), "registered": len(self.registered), **e.stats}
        bank = getattr(e, "adapters", None)
        if bank is not None:
            snap.update({f"adapter_{k}": v for k, v in bank.stats.items()})
        self.snapshot = snap


# ----------------------------------------------------------------------------------------------------------
# Prometheus text format, written by hand (a few counters and histograms need no client library)

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))
HELP = {
    "requests_total": ("counter", "HTTP requests answered, by endpoint and status"),
    "prompt_tokens_total": ("counter", "prompt tokens of accepted requests"),
    "generation_tokens_total": ("counter", "tokens generated for clients"),
    "time_to_first_token_seconds": ("histogram", "request arrival to its first generated token"),
    "request_duration_seconds": ("histogram", "request arrival to its last token"),
    "adapter_load_seconds": ("histogram", "reading, validating and registering an adapter from disk"),
}
ENGINE = {   # snapshot key -> (metric, type, help)
    "waiting": ("queue_depth", "gauge", "sequences waiting for a batch row"),
    "running": ("running_sequences", "gauge", "sequences in the running batch"),
    "requests_active": ("running_requests", "gauge", "engine requests not finished"),
    "registered": ("adapters_loaded", "gauge", "adapters registered with the engine (host copy)"),
    "adapter_loads": ("adapter_loads_total", "counter", "adapter copies into a device slot"),
    "adapter_evictions": ("adapter_evictions_total", "counter", "adapters evicted from a device slot (LRU)"),
    "adapter_hits": ("adapter_slot_hits_total", "counter", "requests whose adapter was already in a slot"),
    "aborted": ("aborted_requests_total", "counter", "engine requests aborted (client gone, stop string)"),
    "finished": ("finished_sequences_total", "counter", "sequences finished by the engine"),
    "steps": ("engine_steps_total", "counter", "engine steps"),
    "prefill_tokens": ("prefill_tokens_total", "counter", "prompt tokens run through the model"),
    "decode_tokens": ("decode_tokens_total", "counter", "tokens decoded"),
}


class Metrics:
    """Counters and histograms, safe to update from any thread; `render(snapshot)` is the /metrics body."""

    def __init__(self, prefix: str = "rftkit_"):
        self.prefix = prefix
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.hists: dict[str, list] = {}             # name -> [bucket counts..., sum, count]

    def inc(self, name: str, value: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            h = self.hists.setdefault(name, [0] * (len(BUCKETS) + 2))
            for i, b in enumerate(BUCKETS):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def render(self, snapshot: dict) -> str:
        p, lines = self.prefix, []
        with self.lock:
            counters, hists = dict(self.counters), {k: list(v) for k, v in self.hists.items()}
        for name, (kind, text) in HELP.items():
            lines += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} {kind}"]
            if kind == "counter":
                for (n, labels), v in sorted(counters.items()):
                    if n == name:
                        lab = ",".join(f'{k}="{v2}"' for k, v2 in labels)
                        lines.append(f"{p}{name}{{{lab}}} {v:g}" if lab else f"{p}{name} {v:g}")
                if not any(n == name for n, _ in counters):
                    lines.append(f"{p}{name} 0")
            else:
                h = hists.get(name, [0] * (len(BUCKETS) + 2))
                for b, c in zip(BUCKETS, h):
                    lines.append(f'{p}{name}_bucket{{le="{"+Inf" if b == float("inf") else f"{b:g}"}"}} {c}')
                lines += [f"{p}{name}_sum {h[-2]:.6f}", f"{p}{name}_count {h[-1]}"]
        for key, (name, kind, text) in ENGINE.items():
            if key in snapshot:
                lines += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} {kind}", f"{p}{name} {snapshot[key]:g}"]
        return "\n".join(lines) + "\n"
