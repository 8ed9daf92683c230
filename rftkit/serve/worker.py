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
bank (read and validated there: a bad folder fails here, naming the problem, not mid-batch), and re-register
it when its files change on disk. The bank keeps only metadata per registered adapter; its weights are copied
into one of the bank's device slots as the request arrives (LRU eviction of idle slots; timed, for /metrics),
or, when the queue could need every free slot, by the engine when the request is admitted.
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from rftkit.peft_format import CONFIG_FILE, WEIGHTS_FILE, adapter_digest, adapter_files, safe_adapter_path
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
        raise AdapterError(404, f"adapter {name!r} not found in the adapter directory")
    return path


def list_adapters(root: str | Path | None) -> list[str]:
    """Names of the folders in DIR that hold an adapter_config.json, sorted."""
    if root is None or not Path(root).is_dir():
        return []
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and os.path.isfile(os.path.join(e.path, CONFIG_FILE)))


RACY_NS = 2_000_000_000     # files changed this recently may change again within one timestamp tick


def _signature(path: Path) -> tuple:
    """A cheap check of the adapter's files (inode, size, mtime, ctime): unchanged means unchanged content,
    except within a timestamp tick of a write (see `_ensure`). ctime and the inode change on every write or
    rename, and no tool can set them back, unlike the mtime that `cp -p`, `rsync -a` and `tar` restore."""
    sig = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            st = os.lstat(path / name)
            sig.append((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
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

    @property
    def rows(self) -> int:          # sequences: prompts x n
        return sum(params.n for _, params in self.jobs)


class EngineWorker:
    def __init__(self, engine: Engine, adapters_dir: str | Path | None = None, max_pending: int = 4096,
                 metrics: "Metrics | None" = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.adapters_dir = None if adapters_dir is None else Path(adapters_dir)
        self.max_pending = max_pending
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[int, Stream] = {}          # rid -> stream; event-loop thread only
        self.next_rid = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None      # set if the engine thread died
        self.on_death = None                           # called on the event loop if it does (rft serve exits)
        self._stop = False
        self._lock = threading.Lock()                  # inbox puts vs the dying thread's last drain
        self._inbox_rows = 0                           # rows submitted, not yet counted in the engine's queue
        # engine-thread state
        self.registered: dict[str, tuple] = {}     # name -> (engine key, file signature, digest, racy)
        self.versions: dict[str, int] = {}                         # name -> registrations so far
        self.stale: list[str] = []                                 # engine keys of replaced files, to unload
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
        """Sequences (prompts x n) waiting for a batch row: in the engine's queue or still in the inbox."""
        return self.snapshot.get("waiting", 0) + self._inbox_rows

    def _put(self, cmd) -> None:
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the engine thread is not running ({self.error!r})")
            self.inbox.put(cmd)

    def submit(self, jobs: list[tuple[list[int], SamplingParams]], adapter: str | None) -> Stream:
        if not self.alive:
            raise RuntimeError(f"the engine thread is not running ({self.error!r})")
        rows = sum(params.n for _, params in jobs)
        if self.pending() + rows > self.max_pending:
            raise OverflowError(f"{self.pending()} sequences are waiting and this request adds {rows} (limit "
                                f"{self.max_pending}); retry later")
        rids = list(range(self.next_rid, self.next_rid + len(jobs)))
        self.next_rid += len(jobs)
        stream = Stream(rids, jobs, adapter)
        for rid in rids:
            self.streams[rid] = stream
        with self._lock:
            self._inbox_rows += rows
        try:
            self._put(("add", stream))
        except RuntimeError:
            self.release(stream, [])
            raise
        return stream

    def release(self, stream: Stream, abort) -> None:
        """The HTTP request is done with `stream`: forget it, and abort the engine requests in `abort` (one
        command for all of them: the engine drops them in one pass)."""
        for rid in stream.rids:
            self.streams.pop(rid, None)
        abort = list(abort)
        if abort and self.error is None:
            try:
                self._put(("abort", abort))
            except RuntimeError:            # it died meanwhile: nothing left to abort
                pass

    def call(self, fn, *args) -> asyncio.Future:
        """Run fn(*args) on the engine thread between steps; await the result (at once an error if the thread
        is dead: nothing waits on a thread that will never answer)."""
        fut: Future = Future()
        self._put(("call", fut, fn, args))
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
                handled = 0
                for cmd in cmds:
                    handled += cmd[1].rows if cmd[0] == "add" else 0
                    self._handle(cmd, replies)
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        replies.append((out.request_id, out if out.error is None else
                                        AdapterError(400, self._public(out.error))))
                        if out.finished:
                            self._finished(out.request_id)
                self._publish(handled)
                if replies:
                    self.loop.call_soon_threadsafe(self._deliver, replies)
        except BaseException as e:          # a dead engine must not look alive: /health turns 503
            with self._lock:                # nothing can be queued after this: calls fail at once
                self.error = e
                left = []
                while True:
                    try:
                        left.append(self.inbox.get_nowait())
                    except queue.Empty:
                        break
            failure = RuntimeError(f"the engine thread failed: {e!r}")
            for cmd in left:
                if cmd[0] == "call":
                    cmd[1].set_exception(failure)
            self.loop.call_soon_threadsafe(self._fail_all, e)
            raise

    def _fail_all(self, e: BaseException) -> None:
        for rid, stream in list(self.streams.items()):
            stream.queue.put_nowait((rid, RuntimeError(f"the engine thread failed: {e!r}")))
        if self.on_death is not None:
            self.on_death(e)

    def _handle(self, cmd, replies: list) -> None:
        kind = cmd[0]
        if kind == "add":
            stream: Stream = cmd[1]
            try:
                key = None if stream.adapter is None else self._ensure(stream.adapter)
                if key is not None:
                    self._prefetch(stream.adapter, key)
                for rid, (prompt, params) in zip(stream.rids, stream.jobs):
                    self.engine.add_request(prompt, params, request_id=rid, adapter=key)
                    self.active[rid] = (key, params.n)
                    replies.append((rid, "accepted"))
            except Exception as e:             # noqa: BLE001 - handed to the request that caused it
                added = [rid for rid in stream.rids if rid in self.active]
                self.engine.abort(added)
                for rid in added:
                    self.active.pop(rid)
                for rid in stream.rids:
                    replies.append((rid, e))
        elif kind == "abort":
            ids = [rid for rid in cmd[1] if rid in self.active]
            self.engine.abort(ids)
            for rid in ids:
                self.active.pop(rid)
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

    def _in_use(self, key: str) -> bool:
        return any(a == key for a, _ in self.active.values())

    # adapter registry: engine thread only (called directly or through `call`). Each registration of a name
    # gets its own engine key (`name`, then `name@2`, ...): requests running on the old files finish on them,
    # and nothing cached for the old weights (prefix-cache blocks are keyed by adapter) serves the new ones.
    def _ensure(self, name: str) -> str:
        """The engine key of DIR/name, registering it if new or changed on disk; errors name the problem.
        A version is its content digest: the files are re-read and hashed when their signature (inode, size,
        mtime, ctime) changes, and while they are "racy" (changed within RACY_NS of the last check: a rewrite
        in the same timestamp tick keeps every field of the signature, as git's racy-clean index entries do);
        a re-read that finds the same digest keeps the version."""
        path = adapter_folder(self.adapters_dir, name)
        sig = _signature(path)
        key, old, digest, racy = self.registered.get(name, (None, None, None, True))
        if old == sig and not racy:
            return key
        if sig[0] is None:
            raise AdapterError(400, f"adapter {name!r} is incomplete: its folder has no {CONFIG_FILE}")
        now = time.time_ns()
        racy = any(s is not None and now - s[4] < RACY_NS for s in sig)
        t = time.perf_counter()
        try:
            files = adapter_files(path, confined=True)
        except (ValueError, OSError) as e:
            raise AdapterError(400, f"adapter {name!r} is invalid: {self._public(str(e))}") from None
        if key is not None and adapter_digest(files) == digest:
            self.registered[name] = (key, sig, digest, racy)
            return key
        if key is not None:
            self.stale.append(self.registered.pop(name)[0])
        self.versions[name] = self.versions.get(name, 0) + 1
        key = name if self.versions[name] == 1 else f"{name}@{self.versions[name]}"
        try:
            digest = self.engine.adapters.register(key, path, confined=True, files=files)
        except Exception as e:             # noqa: BLE001 - whatever the folder holds, it is this request's 400
            raise AdapterError(400, f"adapter {name!r} is invalid: {self._public(str(e))}") from None
        finally:
            self._drop_stale()
        self.metrics.observe("adapter_load_seconds", time.perf_counter() - t)
        self.registered[name] = (key, sig, digest, racy)
        return key

    def _public(self, message: str) -> str:
        """`message` without the server's filesystem layout: paths inside DIR become relative to it."""
        if self.adapters_dir is not None:
            for root in {str(self.adapters_dir.resolve()), str(self.adapters_dir)}:
                message = message.replace(root + os.sep, "")
        return message

    def _prefetch(self, name: str, key: str) -> None:
        """Copy the adapter into a device slot as its request arrives, timed (`adapter_slot_load_seconds`), so
        the engine finds it there at admission. Skipped when the requests already queued could need every slot
        not pinned by a running one: a load for this request could then evict one that a request ahead of it
        needs (the engine loads it at admission instead, untimed)."""
        bank = self.engine.adapters
        if key in bank.slot_of:
            return
        pinned = sum(p > 0 for p in bank.pins[1:])
        if pinned + len(self.engine.waiting) + bool(self.engine.prefilling) >= bank.n_slots:
            return
        t = time.perf_counter()
        try:
            slot = bank.acquire(key)
        except Exception as e:     # noqa: BLE001 - the files changed since registration: this request's error
            raise AdapterError(400, f"adapter {name!r} is invalid: {self._public(str(e))}") from None
        if slot is not None:
            bank.release(key)
            self.metrics.observe("adapter_slot_load_seconds", time.perf_counter() - t)

    def _drop_stale(self) -> None:
        for key in [k for k in self.stale if not self._in_use(k)]:
            self.engine.adapters.unload(key)
            self.stale.remove(key)

    def load_adapter(self, name: str) -> dict:
        """Register `name` and copy it into a device slot now, so its first request pays no load."""
        key = self._ensure(name)
        bank = self.engine.adapters
        if bank.acquire(key) is None:
            raise AdapterError(409, f"adapter {name!r}: all {bank.n_slots} device slots are in use by running "
                               f"requests; retry when they finish")
        bank.release(key)
        return next(i for i in self.adapter_info() if i["name"] == name)

    def unload_adapter(self, name: str) -> None:
        if name not in self.registered:
            raise AdapterError(404, f"adapter {name!r} is not loaded")
        key = self.registered[name][0]
        n = sum(a == key for a, _ in self.active.values())
        if n:
            raise AdapterError(409, f"adapter {name!r} has {n} requests running; unload it when they finish")
        self.engine.adapters.unload(key)
        del self.registered[name]

    def adapter_info(self) -> list[dict]:
        """Name, rank, slot and last use of each registered adapter; no filesystem path (clients need none)."""
        public = {v[0]: name for name, v in self.registered.items()}
        return [{k: v for k, v in i.items() if k != "path"} | {"name": public[i["name"]]}
                for i in self.engine.adapters.info() if i["name"] in public]

    def _publish(self, handled: int = 0) -> None:
        if handled:
            with self._lock:
                self._inbox_rows -= handled
        e = self.engine
        snap = {"running": e.num_running, "waiting": sum(len(g) for g in e.waiting) + bool(e.prefilling),
                "requests_active": len(self.active), "registered": len(self.registered),
                "in_slots": len(e.adapters.slot_of), **e.stats}
        snap.update({f"adapter_{k}": v for k, v in e.adapters.stats.items()})
        self.snapshot = snap


# ----------------------------------------------------------------------------------------------------------
# Prometheus text format, written by hand (a few counters and histograms need no client library)

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))
HELP = {
    "requests_total": ("counter", "HTTP requests answered, by endpoint and status"),
    "prompt_tokens_total": ("counter", "prompt tokens of accepted requests"),
    "model_requests_total": ("counter", "accepted generation requests, by model (base or adapter)"),
    "generation_tokens_total": ("counter", "tokens generated for clients"),
    "time_to_first_token_seconds": ("histogram", "request arrival to its first generated token"),
    "request_duration_seconds": ("histogram", "request arrival to its last token"),
    "adapter_load_seconds": ("histogram", "reading, validating and registering an adapter from disk"),
    "adapter_slot_load_seconds": ("histogram", "copying an adapter into a device slot as its request arrives "
                                  "(loads at admission are counted by adapter_loads_total only)"),
}
ENGINE = {   # snapshot key -> (metric, type, help)
    "waiting": ("queue_depth", "gauge", "sequences waiting for a batch row"),
    "running": ("running_sequences", "gauge", "sequences in the running batch"),
    "requests_active": ("running_requests", "gauge", "engine requests not finished"),
    "registered": ("adapters_registered", "gauge", "adapters read, validated and known to the engine"),
    "in_slots": ("adapters_in_slots", "gauge", "adapters in a device slot"),
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
