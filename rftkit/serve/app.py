"""`rft serve`: an OpenAI-compatible HTTP server for one base model and thousands of LoRA adapters.

    rft serve --adapters adapters/ --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "math-v2", "messages": [...]}'

The request's `model` field picks the adapter: the base model's id (its folder name, or
`smollm2-135m-instruct`), an adapter name (a folder in `--adapters`), or `BASE:NAME`. An adapter that does not
exist is a 404 naming it, never the base model in disguise; a half-written or invalid adapter folder is a 400
saying what is wrong with it. Adapters load on first use and when their files change, so dropping a folder
into the directory makes it servable without a restart.

Layers: this module is HTTP only (FastAPI + uvicorn, imported nowhere else); `serve.requests` checks bodies and
turns engine tokens into text; `serve.worker` is the one thread that owns the engine. Endpoints:
`/v1/completions`, `/v1/chat/completions` (SSE with `stream`), `/v1/models`, LoRAX's `/generate` and
`/generate_stream` (`parameters.adapter_id`), `/v1/adapters` (+ `/load`, `/unload`), `/health`, `/metrics`;
`/v1/files` and `/v1/fine_tuning/jobs` (serve.jobs, with --adapters) and the console `/ui`.
"""

import asyncio
import dataclasses
import gc
import hmac
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rftkit.jobs import adapter_name, model_of_adapter
from rftkit.serve.jobs import console_router, jobs_router, open_jobs
from rftkit.serve import structured
from rftkit.serve.requests import (APIError, ClientGone, NonFiniteError, Request, accept, deltas, parse_chat,
                                   parse_completion, parse_json, parse_lorax)
from rftkit.serve.traffic import feedback_router, log_served, open_log
from rftkit.serve.worker import AdapterError, EngineWorker, Metrics, adapter_folder, list_adapters

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    model: str | None = None            # model folder, .gguf file, or None for the embedded smollm2-135m-instruct
    adapters: str | None = None         # folder of adapter folders; a request's `model` field names one
    host: str = "127.0.0.1"             # address to listen on
    port: int = 8000                    # port to listen on
    api_key: str | None = None          # require `Authorization: Bearer KEY` (default: $RFTKIT_API_KEY)
    no_auth: bool = False               # serve without an API key on a non-loopback host (never implied by "")
    max_loaded_adapters: int = 128      # adapters in device slots (LRU eviction of idle ones); keep >= max_batch
    max_batch: int = 64                 # sequences decoded together
    max_seq_len: int = 2048             # context per sequence: prompt + completion
    kv_budget_mb: int = 1024            # KV-cache memory
    max_n: int = 16                     # most samples (`n`) per request
    max_body_bytes: int = 1 << 20       # largest request body
    max_pending: int = 4096             # sequences (prompts x n) waiting for the engine before 503s
    max_prompts: int = 64               # prompts in one /v1/completions request
    max_connections: int = 1024         # open HTTP connections; more are answered 503 and closed
    header_timeout: float = 10.0        # seconds a client may take to send a request's headers (and its body)
    served_model_name: str | None = None  # the base model's id (default: its folder name)
    device: str = "auto"                # cpu, cuda, or auto (cuda when present)
    state_dir: str | None = None        # fine-tuning jobs' database, files and runs (default: ADAPTERS-state)
    max_jobs: int = 1                   # fine-tuning jobs trained at once, each its own process (0 = no jobs)
    job_threads: int = 1                # torch threads of a job's process (serving keeps the other cores)
    max_file_mb: int = 512              # largest training file uploaded to /v1/files
    log_requests: str | None = None     # log each chat/completions request (prompt, completions, adapter, sampling,
                                        # latency) to DIR/requests.db for rft train --from-logs; off by default:
                                        # prompts are personal data, kept on this machine (docs/traffic.md)
    log_retention_days: float = 30.0    # logged requests older than this are deleted
    log_max_rows: int = 1_000_000       # the oldest logged requests beyond this many are deleted

    def __post_init__(self):
        for name in ("port", "max_loaded_adapters", "max_batch", "max_seq_len", "kv_budget_mb", "max_n",
                     "max_body_bytes", "max_pending", "max_prompts", "max_connections", "header_timeout", "job_threads",
                     "max_file_mb"):
            if getattr(self, name) <= (-1 if name == "port" else 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.api_key == "" and not self.no_auth:
            raise ValueError('api_key is empty: an empty key would turn authentication off; pass a key, or '
                             '--no-auth to serve without one')
        if self.api_key and self.no_auth:
            raise ValueError("both an api_key and no_auth given: pick one")
        if self.max_jobs < 0:
            raise ValueError(f"max_jobs must be >= 0 (0 = no fine-tuning jobs), got {self.max_jobs}")


class Server:
    """The model, its tokenizer, the engine thread and the metrics behind one app."""

    def __init__(self, cfg: ServeConfig, model=None, tok=None):
        import torch

        from rftkit.engine import Engine
        from rftkit.loading import EMBEDDED, load
        self.cfg = cfg
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        if model is None:
            model, tok = load(cfg.model, device=device)
        if cfg.adapters is not None and not Path(cfg.adapters).is_dir():
            raise FileNotFoundError(f"{cfg.adapters}: no such adapter directory")
        self.tok = tok
        self.base_id = cfg.served_model_name or (EMBEDDED if cfg.model is None else Path(cfg.model).name)
        env = os.environ.get("RFTKIT_API_KEY")
        if env == "" and cfg.api_key is None and not cfg.no_auth:
            raise ValueError("RFTKIT_API_KEY is set but empty: that would turn authentication off; set a key, "
                             "unset it, or pass --no-auth")
        self.api_key = None if cfg.no_auth else (cfg.api_key or env or None)
        if self.api_key is None and not cfg.no_auth and cfg.host not in LOOPBACK:
            raise ValueError(f"--host {cfg.host} without an API key would serve anyone who can reach it: pass "
                             f"--api-key (or $RFTKIT_API_KEY), or --no-auth to mean it")
        self.engine = Engine(model, kv_budget_bytes=cfg.kv_budget_mb << 20, max_seq_len=cfg.max_seq_len,
                             max_batch=cfg.max_batch, adapter_slots=cfg.max_loaded_adapters)
        self.metrics = Metrics()
        self.traffic = open_log(cfg)        # None unless --log-requests
        self.worker = EngineWorker(self.engine, cfg.adapters, cfg.max_pending, self.metrics)
        self.worker.on_death = self._engine_died
        self.eos = list(tok.eos_token_ids)
        self.created = int(time.time())
        # a token covers at most this many characters of text (its vocabulary string, byte-level or not); a
        # prompt longer than 2x that per context token cannot fit, and is refused before it is tokenized
        # (tokenizers holds the GIL while it encodes: 1 MB of text would stall every thread for ~0.2 s)
        longest = max(map(len, tok.backend.get_vocab(with_added_tokens=True)), default=1)
        self.max_prompt_chars = 2 * self.engine.max_seq_len * max(longest, 1)
        # tokenizing, chat templates and building large answers: off the event loop (a 1 MB prompt takes
        # ~0.2 s to tokenize, an answer with 20 alternatives per token as long), so /health and the streams of
        # everyone else never wait behind one request. The incremental detokenization of each engine step
        # (a token or two per sequence, a few microseconds) stays on the loop: a thread hop costs more.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rftkit-text")
        self.texts: dict[int, str] = {}     # token id -> its text (log-prob answers)
        self._grammars = None               # rftkit.constrained.Grammars, built on the first constrained request
        self.uvicorn = None                 # set by run_serve: told to exit if the engine thread dies
        self.tuning = open_jobs(cfg)        # fine-tuning jobs' runner, or None
        self.exit_code = 0

    def _engine_died(self, e: BaseException) -> None:
        """The engine thread raised: nothing can be served any more. Waiting calls were failed; the process
        exits non-zero so that a supervisor restarts it (a server answering 503 forever is worse)."""
        print(f"rft serve: the engine thread died: {e!r}; exiting", file=sys.stderr, flush=True)
        self.exit_code = 1
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------------ request -> engine jobs
    def adapter_of(self, model: str) -> str | None:
        """None for the base model, else the adapter name; 404 / 400 naming the model otherwise."""
        if model in ("", self.base_id):
            return None
        name = adapter_name(model) or model.removeprefix(self.base_id + ":")    # ft:BASE:SUFFIX:JOBID: a job's
        try:
            adapter_folder(self.cfg.adapters, name)
        except ValueError as e:
            raise APIError(400, f"model {model!r}: {e}", "model") from None
        except AdapterError:
            where = f"no adapter folder named {name!r}" if self.cfg.adapters else "no adapter directory"
            raise APIError(404, f"model {model!r} not found: not the base model {self.base_id!r} and {where}",
                           "model", "model_not_found") from None
        return name

    def grammars(self):
        if self._grammars is None:
            from rftkit.constrained import Grammars
            self._grammars = Grammars(self.tok, self.engine.model.cfg.vocab_size)
        return self._grammars

    def jobs(self, req: Request) -> list:
        ctx, vocab, out = self.engine.max_seq_len, self.engine.model.cfg.vocab_size, []
        try:
            grammar = structured.grammar(req, self.grammars) if req.chat else None
        except ValueError as e:         # the schema compiles to no grammar (llguidance's reason)
            raise APIError(400, str(e), str(e).split(":")[0]) from None
        for p in req.prompts:
            chars = sum(len(m["content"]) for m in p) if req.chat else len(p) if isinstance(p, str) else 0
            if chars > self.max_prompt_chars:
                raise APIError(400, f"the prompt ({chars} characters) cannot fit the context of {ctx} tokens",
                               "messages" if req.chat else "prompt")
            if req.chat:
                try:
                    msgs, kw = structured.prompt(req, p, self.tok)
                    ids = self.tok.encode_chat(msgs, **kw)
                except Exception as e:          # noqa: BLE001 - the template's own error (raise_exception)
                    raise APIError(400, f"messages: the chat template refused them: {str(e)[:200]}",
                                   "messages") from None
            elif isinstance(p, str):
                try:
                    ids = self.tok.encode(p, add_special_tokens=True)
                except Exception as e:          # noqa: BLE001 - whatever the tokenizer cannot take
                    raise APIError(400, f"prompt: the tokenizer refused it: {str(e)[:200]}", "prompt") from None
            else:
                ids = p
                if any(not 0 <= t < vocab for t in ids):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            if not ids:
                raise APIError(400, "the prompt is empty", "prompt")
            max_tokens = req.max_tokens if req.max_tokens is not None else ctx - len(ids)
            if len(ids) + max_tokens > ctx or max_tokens < 1:
                raise APIError(400, f"max_tokens ({max_tokens}) + the prompt ({len(ids)} tokens) exceeds the "
                               f"context of {ctx} tokens", "max_tokens")
            out.append((ids, dataclasses.replace(req.params, max_tokens=max_tokens, stop_token_ids=self.eos,
                                                 logprobs=req.logprobs or 0, grammar=grammar)))
        return out

    async def start(self, req: Request, t0: float):
        """Submit `req` and wait until the engine thread accepted it: errors become HTTP errors here,
        before any streamed byte. Whatever fails after the submit releases the stream (no bookkeeping left
        behind for a request that is gone)."""
        adapter = self.adapter_of(req.model)
        rows = len(req.prompts) * req.params.n
        if rows > self.cfg.max_pending:
            raise APIError(400, f"{len(req.prompts)} prompts x n={req.params.n} = {rows} sequences exceed the "
                           f"queue limit of {self.cfg.max_pending}", "prompt")
        jobs = await self.off_loop(self.jobs, req)
        try:
            stream = self.worker.submit(jobs, adapter)
        except OverflowError as e:
            raise APIError(503, str(e), headers={"Retry-After": "1"}) from None
        except RuntimeError as e:
            raise APIError(503, str(e), headers={"Retry-After": "5"}) from None
        stream.t_submit = t0
        try:
            await accept(stream)
        except BaseException as e:
            self.worker.release(stream, stream.rids)
            if isinstance(e, AdapterError):
                raise APIError(e.status, str(e), "model", "invalid_adapter" if e.status == 400 else None) from None
            if isinstance(e, (ValueError, KeyError)):
                raise APIError(400, str(e)) from None
            if isinstance(e, RuntimeError) and not self.worker.alive:
                raise APIError(503, str(e), headers={"Retry-After": "5"}) from None
            raise
        self.metrics.inc("prompt_tokens_total", sum(len(ids) for ids, _ in jobs))
        self.metrics.inc("model_requests_total", model=adapter or self.base_id)
        return stream, [len(ids) for ids, _ in jobs]

    async def run(self, stream, req: Request, http_request=None):
        """Deltas of `stream` until done; the engine requests are aborted if the consumer stops early (client
        gone, error) or a stop string ended them before the engine did."""
        counts: dict = {}
        watcher = None
        if http_request is not None:      # non-streaming: nobody writes to the socket, so watch it
            watcher = asyncio.create_task(self._watch(http_request, stream))
        try:
            async for d in deltas(stream, self.tok, req.params.n, req.stop, self.metrics, counts):
                yield d
        except AdapterError as e:         # its adapter failed to load at admission: this request's 4xx
            raise APIError(e.status, str(e), "model", "invalid_adapter") from None
        except NonFiniteError as e:       # an adapter's weights overflow: its 400; the base model's: our 500
            if stream.adapter is not None:
                raise APIError(400, f"adapter {stream.adapter!r}: {e}", "model", "invalid_adapter") from None
            raise APIError(500, str(e)) from None
        except ConnectionAbortedError:
            raise ClientGone() from None
        finally:
            if watcher is not None:
                watcher.cancel()
            self.worker.release(stream, counts.get("unfinished", stream.rids))
            self.metrics.inc("generation_tokens_total", sum(v for k, v in counts.items() if isinstance(k, int)))
            self.metrics.observe("request_duration_seconds", time.perf_counter() - stream.t_submit)

    @staticmethod
    async def _watch(http_request, stream):
        while not await http_request.is_disconnected():
            await asyncio.sleep(0.25)
        stream.queue.put_nowait((stream.rids[0], ConnectionAbortedError("client disconnected")))

    def token_text(self, t: int) -> str:
        text = self.texts.get(t)           # memoized: an answer with 20 alternatives per token asks ~10^5 times
        if text is None:
            text = self.texts[t] = self.tok.decode([t], skip_special_tokens=False)
        return text


# ----------------------------------------------------------------------------------------------------------
# OpenAI response shapes

FINISH = {"eos": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls"}


def _usage(prompt_lens: list[int], n: int, completion: int) -> dict:
    p = sum(prompt_lens) * n
    return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}


def _dumps(obj) -> bytes:
    """JSON of an answer, encoded in pieces: json.dumps holds the GIL for its whole call (~0.1 s for 6,000
    tokens with 20 alternatives each), which would stall the event loop as surely as running it there."""
    return _encode(obj).encode()


def _encode(obj, chunk: int = 256) -> str:
    """Containers with large parts are joined from the JSON of their parts, lists in runs of `chunk`."""
    if isinstance(obj, dict) and _large(obj):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _encode(v, chunk) for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)) and len(obj) > chunk:
        return "[" + ",".join(_encode(obj[i:i + chunk], chunk)[1:-1]
                              for i in _yielding(range(0, len(obj), chunk), 1)) + "]"
    if isinstance(obj, (list, tuple)) and _large(obj):
        return "[" + ",".join(_encode(x, chunk) for x in obj) + "]"
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _large(x, size: int = 64) -> bool:
    """More than `size` items anywhere below x (looking inside small containers only: bounded work)."""
    if not isinstance(x, (dict, list, tuple)):
        return False
    if len(x) > size:
        return True
    return any(map(_large, x.values() if isinstance(x, dict) else x))


def _yielding(items, every: int = 64):
    """`items`, pausing 0.2 ms every `every` of them. A thread building a large answer holds the GIL for as long
    as the interpreter lets it; the event loop waiting for it then gets it only when the 5 ms switch interval
    forces a hand-over, and may lose it to another greedy thread again (loop stalls of 0.1 s were measured
    here while two answers of 6,000 tokens x 20 alternatives were built). `sleep(0)` is not enough: it takes
    the GIL back before a waiting thread wakes; a short real sleep lets the loop in."""
    for i, x in enumerate(items):
        if i % every == every - 1:
            time.sleep(0.0002)
        yield x


def _chat_logprobs(server: Server, tokens: list) -> dict:
    def entry(t, lp):
        s = server.token_text(t)
        return {"token": s, "logprob": lp, "bytes": tuple(s.encode())}
    # tuples, not lists (JSON arrays alike): the collector untracks tuples of atoms, so the 10^5 containers of a
    # large answer do not make every full collection walk them (0.1-0.4 s with the GIL held, measured here)
    return {"content": [{**entry(t, lp), "top_logprobs": tuple(entry(a, b) for a, b in top or ())}
                        for t, lp, top in _yielding(tokens)]}


def _completion_logprobs(server: Server, tokens: list, offset: int) -> dict:
    texts = [server.token_text(t) for t, _, _ in tokens]
    offsets = []
    for s in texts:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [{server.token_text(a): b for a, b in top or []} for _, _, top in _yielding(tokens)],
            "text_offset": offsets}


def _choice(server: Server, req: Request, index: int, text: str, tokens: list, finish: str | None,
            stream: bool, first: bool = False, calls: list | None = None) -> dict:
    lp = None
    if req.logprobs is not None:
        lp = _chat_logprobs(server, tokens) if req.chat else _completion_logprobs(server, tokens, 0)
    reason = FINISH[finish] if finish else None
    if not req.chat:
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
    if stream:
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        return {"index": index, "delta": delta | ({"tool_calls": calls} if calls else {}), "logprobs": lp,
                "finish_reason": reason}
    message = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return {"index": index, "message": message, "logprobs": lp, "finish_reason": reason}


# ----------------------------------------------------------------------------------------------------------
# the app

def build_app(server: Server):
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.requests import ClientDisconnect

    @asynccontextmanager
    async def lifespan(app):
        # Everything alive now (torch, transformers, the model, the tokenizer: hundreds of thousands of objects)
        # lives as long as the server. Frozen, the collector stops re-scanning it: a full collection would
        # otherwise hold the GIL for 0.1-0.3 s on this machine, stalling /health and every stream at once.
        gc.collect()
        gc.freeze()
        server.worker.start(asyncio.get_running_loop())
        if server.tuning is not None:
            server.tuning.start()
        yield
        if server.tuning is not None:
            await asyncio.to_thread(server.tuning.stop)      # running jobs checkpoint; the next start resumes them
        server.worker.stop()
        server.pool.shutdown(wait=False, cancel_futures=True)
        gc.unfreeze()

    app = FastAPI(title="rftkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(_, e: ClientGone):
        # nobody reads this answer; 499 (nginx's "client closed request") keeps it out of the 5xx counts
        return Response(status_code=499)

    async def auth(request: HTTPRequest):
        if server.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise APIError(401, "missing API key: send the header Authorization: Bearer KEY")
        if not hmac.compare_digest(header[7:].encode(), server.api_key.encode()):
            raise APIError(401, "invalid API key")

    async def body_of(request: HTTPRequest) -> dict:
        limit = server.cfg.max_body_bytes
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and len(size) < 20 and int(size) > limit:
            raise APIError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
        chunks, n = [], 0
        try:
            async with asyncio.timeout(server.cfg.header_timeout):   # a body trickled in byte by byte
                async for chunk in request.stream():
                    n += len(chunk)
                    if n > limit:
                        raise APIError(413, f"request body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {server.cfg.header_timeout:g} s") from None
        except ClientDisconnect:
            raise ClientGone() from None
        raw = b"".join(chunks)
        return parse_json(raw) if len(raw) < 1 << 16 else await server.off_loop(parse_json, raw)

    def sse(data) -> str:
        return f"data: {json.dumps(data)}\n\n"

    protected = [Depends(auth)]
    app.include_router(console_router())
    if server.tuning is not None:
        app.include_router(jobs_router(server, server.tuning, body_of), dependencies=protected)

    async def openai(request: HTTPRequest, chat: bool):
        t0 = time.perf_counter()
        body = await body_of(request)
        req = parse_chat(body, server.cfg.max_n) if chat else \
            parse_completion(body, server.cfg.max_n, server.cfg.max_prompts)
        stream, prompt_lens = await server.start(req, t0)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": ("chat.completion" if chat else "text_completion"), "created": int(time.time()),
                "model": req.model}
        n = req.params.n * len(prompt_lens)
        splits = [structured.ToolSplit() for _ in range(n)] if chat and structured.parses_calls(req) else None

        def split(d):                   # (content, tool calls, finish) of a delta
            if splits is None:
                return d.text, [], d.finish
            text, calls = splits[d.index].add(d.text, d.finish is not None)
            made = splits[d.index].calls and d.finish in ("eos", "stop_sequence")
            return text, calls, "tool_calls" if made else d.finish
        if req.stream:
            head["object"] = "chat.completion.chunk" if chat else "text_completion"

            async def events():
                completion, raw, finish = 0, [[] for _ in range(n)], [None] * n
                try:
                    if chat:
                        yield sse({**head, "choices": [_choice(server, req, i, "", [], None, True, True)
                                                       for i in range(n)]})
                    async for d in server.run(stream, req):
                        completion += len(d.tokens)
                        raw[d.index].append(d.text)
                        text, calls, fin = split(d)
                        finish[d.index] = fin or finish[d.index]
                        if text or calls or fin or d.tokens and req.logprobs is not None:
                            yield sse({**head, "choices": [_choice(server, req, d.index, text, d.tokens, fin,
                                                                   True, calls=calls)]})
                    if req.include_usage:
                        yield sse({**head, "choices": [], "usage": _usage(prompt_lens, req.params.n, completion)})
                    log_served(server, rid, req, ["".join(t) for t in raw], finish, t0, sum(prompt_lens), completion)
                except Exception as e:     # noqa: BLE001 - headers are sent: report in the stream, then end it
                    yield sse({"error": {"message": str(e), "type": "server_error"}})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        texts, raw, tokens, finish = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        calls = [[] for _ in range(n)]
        async for d in server.run(stream, req, request):
            text, new_calls, done = split(d)
            texts[d.index].append(text)
            raw[d.index].append(d.text)           # the request log keeps what the model wrote, calls included
            calls[d.index] += new_calls
            tokens[d.index] += d.tokens
            finish[d.index] = done or finish[d.index]
        log_served(server, rid, req, ["".join(t) for t in raw], finish, t0, sum(prompt_lens),
                   sum(map(len, tokens)))

        def answer() -> bytes:          # off the loop: thousands of tokens x 20 alternatives take a while
            choices = [_choice(server, req, i, "".join(texts[i]), tokens[i], finish[i], False, calls=calls[i])
                       for i in range(n)]
            return _dumps({**head, "choices": choices,
                           "usage": _usage(prompt_lens, req.params.n, sum(map(len, tokens)))})
        return Response(await server.off_loop(answer), media_type="application/json")

    app.include_router(feedback_router(server, protected, body_of))

    @app.post("/v1/completions", dependencies=protected)
    async def completions(request: HTTPRequest):
        return await openai(request, chat=False)

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(request: HTTPRequest):
        return await openai(request, chat=True)

    async def lorax(request: HTTPRequest, streaming: bool):
        t0 = time.perf_counter()
        req = parse_lorax(await body_of(request), server.base_id)
        stream, prompt_lens = await server.start(req, t0)

        def details(finish: str, generated: int, tokens: list | None) -> dict:
            d = {"finish_reason": {"eos": "eos_token", "stop_sequence": "stop_sequence", "length": "length"}[finish],
                 "generated_tokens": generated, "prompt_tokens": prompt_lens[0], "seed": req.params.seed}
            if tokens is not None:
                d["tokens"] = [{"id": t, "text": server.token_text(t), "logprob": lp, "special": t in server.eos}
                               for t, lp, _ in tokens]
            return d

        prefix = req.prompts[0] if req.echo else ""
        if streaming:
            async def events():
                text, count = [prefix], 0
                try:
                    async for d in server.run(stream, req):
                        text.append(d.text)
                        count += len(d.tokens)
                        t, lp, _ = d.tokens[-1] if d.tokens else (None, None, None)
                        yield sse({"token": {"id": t, "text": d.text, "logprob": lp, "special": t in server.eos},
                                   "generated_text": "".join(text) if d.finish else None,
                                   "details": details(d.finish, count, None) if d.finish else None})
                except Exception as e:     # noqa: BLE001 - headers are sent: report in the stream
                    yield sse({"error": str(e), "error_type": "generation"})
            return StreamingResponse(events(), media_type="text/event-stream")
        text, tokens, finish = [prefix], [], None
        async for d in server.run(stream, req, request):
            text.append(d.text)
            tokens += d.tokens
            finish = d.finish or finish

        def answer() -> bytes:
            out = {"generated_text": "".join(text)}
            if req.details:
                out["details"] = details(finish, len(tokens), tokens)
            return _dumps(out)
        return Response(await server.off_loop(answer), media_type="application/json")

    @app.post("/generate", dependencies=protected)
    async def generate(request: HTTPRequest):
        return await lorax(request, streaming=False)

    @app.post("/generate_stream", dependencies=protected)
    async def generate_stream(request: HTTPRequest):
        return await lorax(request, streaming=True)

    @app.get("/v1/models", dependencies=protected)
    async def models():
        card = {"object": "model", "created": server.created, "owned_by": "rftkit"}
        return {"object": "list", "data": [{"id": server.base_id, **card, "parent": None}] + [
            {"id": model_of_adapter(name, server.base_id), **card, "parent": server.base_id}
            for name in list_adapters(server.cfg.adapters)]}

    async def adapter_call(fn, request: HTTPRequest):
        body = await body_of(request)
        name = body.get("name")
        if not isinstance(name, str):
            raise APIError(400, f"name must be a string (an adapter folder's name), got {json.dumps(name)[:60]}",
                           "name")
        try:
            return await server.worker.call(fn, name)
        except ValueError as e:
            raise APIError(400, str(e), "name") from None
        except AdapterError as e:
            raise APIError(e.status, str(e), "name") from None
        except RuntimeError as e:
            if server.worker.alive:
                raise
            raise APIError(503, str(e), headers={"Retry-After": "5"}) from None

    @app.get("/v1/adapters", dependencies=protected)
    async def adapters():
        loaded = {a["name"]: a for a in await server.worker.call(server.worker.adapter_info)} \
            if server.cfg.adapters else {}
        return {"object": "list", "max_loaded": server.cfg.max_loaded_adapters,
                "data": [{"name": name, "loaded": name in loaded, **loaded.get(name, {})}
                         for name in sorted(set(list_adapters(server.cfg.adapters)) | set(loaded))]}

    @app.post("/v1/adapters/load", dependencies=protected)
    async def load_adapter(request: HTTPRequest):
        t = time.perf_counter()
        info = await adapter_call(server.worker.load_adapter, request)
        return {**info, "loaded": True, "seconds": time.perf_counter() - t}

    @app.post("/v1/adapters/unload", dependencies=protected)
    async def unload_adapter(request: HTTPRequest):
        body = await adapter_call(server.worker.unload_adapter, request)
        return {"unloaded": True, **(body or {})}

    @app.get("/health")
    async def health():
        snap = server.worker.snapshot
        if not server.worker.alive:
            return JSONResponse({"status": "error", "error": repr(server.worker.error)}, status_code=503,
                                headers={"Retry-After": "5"})
        return {"status": "ok", "model": server.base_id, "running": snap.get("running", 0),
                "waiting": server.worker.pending()}

    @app.get("/metrics", dependencies=protected)
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.worker.snapshot),
                                 media_type="text/plain; version=0.0.4")

    return _Counted(app, server.metrics)


class _Counted:
    """ASGI wrapper counting answered requests by endpoint and status (streaming passes through untouched)."""

    PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/generate", "/generate_stream",
             "/v1/adapters", "/v1/adapters/load", "/v1/adapters/unload", "/health", "/metrics"}

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.metrics.inc("requests_total", endpoint=path, status=str(status[0]))


def run_serve(cfg: ServeConfig) -> int:
    """Serve until stopped: 0 after a normal shutdown, 1 if the engine thread died (so a supervisor restarts
    the process instead of leaving a server that answers 503 forever)."""
    import uvicorn

    from rftkit.serve.limits import uvicorn_config
    server = Server(cfg)
    print(f"rft serve: {server.base_id} on http://{cfg.host}:{cfg.port}/v1 (adapters: {cfg.adapters or 'none'}"
          f"{', API key required' if server.api_key else ''})", flush=True)
    server.uvicorn = uvicorn.Server(uvicorn_config(build_app(server), cfg, host=cfg.host, port=cfg.port))
    server.uvicorn.run()
    return server.exit_code
