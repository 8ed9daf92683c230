"""Traffic as data, the server's side: the opt-in request log and `POST /v1/feedback`.

    rft serve --adapters adapters/ --log-requests logs/ --log-retention-days 30
    curl localhost:8000/v1/feedback -d '{"id": "chatcmpl-...", "score": 1.0, "label": "correct"}'

With `--log-requests DIR`, each answered /v1/chat/completions and /v1/completions request (streamed or not) is
queued for rftkit.traffic_log's writer thread once its last token is out: the request's messages or prompts,
the completions, the served model id and the adapter folder, the sampling settings, the latency, the token
counts, under the answer's `id`. Nothing here waits for the disk, and a row that cannot be written is a
warning, never an error for the request. LoRAX's /generate is not logged. Feedback names an answer's `id`
(and a choice `index`, default 0) and carries a `score` (a finite number), a `label` (a short string), or both,
and an optional `comment`: 404 when no logged answer has that id (or logging is off), 400 for a bad body.
"""
import asyncio
import dataclasses
import math
import sys
import time

from rftkit.serve.requests import APIError
from rftkit.serve.worker import adapter_folder
from rftkit.traffic_log import TrafficLog

FEEDBACK_FIELDS = {"id", "index", "score", "label", "comment"}


def open_log(cfg) -> TrafficLog | None:
    """The server's request log: None unless cfg.log_requests names a folder."""
    if not cfg.log_requests:
        return None
    log = TrafficLog(cfg.log_requests, cfg.log_retention_days, cfg.log_max_rows)
    print(f"rft serve: logging requests to {log.path} (retention {cfg.log_retention_days:g} days, at most "
          f"{cfg.log_max_rows} rows); prompts and completions are stored on this machine", flush=True)
    return log


def log_served(server, rid: str, req, texts: list[str], finish: list, t0: float, prompt_tokens: int,
               completion_tokens: int) -> None:
    """Queue the record of one answered request, if the server logs requests. Never raises."""
    if server.traffic is None:
        return
    try:
        adapter = server.adapter_of(req.model)
        params = {k: v for k, v in dataclasses.asdict(req.params).items() if k not in ("stop_token_ids",
                                                                                        "max_tokens")}
        server.traffic.record({
            "id": rid, "created": time.time(), "model": adapter or server.base_id, "adapter": adapter,
            "adapter_dir": str(adapter_folder(server.cfg.adapters, adapter).resolve()) if adapter else None,
            "endpoint": "chat" if req.chat else "completions", "messages": req.prompts[0] if req.chat else None,
            "prompts": None if req.chat else req.prompts, "completions": texts, "finish": finish,
            "params": {**params, "max_tokens": req.max_tokens, "stop": req.stop},
            "latency": time.perf_counter() - t0, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens})
    except Exception as e:              # noqa: BLE001 - the answer is out; a log row must never fail it
        print(f"rft serve: warning: request {rid} not logged ({type(e).__name__}: {e})", file=sys.stderr)


def parse_feedback(body: dict) -> tuple[str, int, float | None, str | None, str | None]:
    """(id, index, score, label, comment) of a feedback body, or a 400 naming the bad field."""
    unknown = sorted(set(body) - FEEDBACK_FIELDS)
    if unknown:
        raise APIError(400, f"unknown feedback field {unknown[0]!r}: send id, index, score, label, comment",
                       unknown[0])
    rid, index, score = body.get("id"), body.get("index", 0), body.get("score")
    label, comment = body.get("label"), body.get("comment")
    if not isinstance(rid, str) or not rid:
        raise APIError(400, "id must be the `id` of a logged answer (chatcmpl-... or cmpl-...)", "id")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1 << 20:
        raise APIError(400, f"index must be a choice's index (an integer >= 0), got {str(index)[:40]}", "index")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not math.isfinite(score)):
        raise APIError(400, f"score must be a finite number, got {str(score)[:40]}", "score")
    if label is not None and (not isinstance(label, str) or not 0 < len(label) <= 200):
        raise APIError(400, "label must be a string of 1 to 200 characters", "label")
    if comment is not None and (not isinstance(comment, str) or len(comment) > 4000):
        raise APIError(400, "comment must be a string of at most 4000 characters", "comment")
    if score is None and label is None:
        raise APIError(400, "feedback needs a score, a label, or both", "score")
    return rid, index, None if score is None else float(score), label, comment


def feedback_router(server, dependencies: list, body_of):
    """The APIRouter of POST /v1/feedback; `body_of` reads a request's JSON body with the server's limits."""
    from fastapi import APIRouter
    from fastapi import Request as HTTPRequest
    router = APIRouter()

    @router.post("/v1/feedback", dependencies=dependencies)
    async def feedback(request: HTTPRequest):
        rid, index, score, label, comment = parse_feedback(await body_of(request))
        if server.traffic is None:
            raise APIError(404, f"answer {rid!r} not found: this server does not log requests (start rft serve "
                                f"with --log-requests DIR to collect feedback)", "id")
        try:
            row = await asyncio.wrap_future(server.traffic.feedback(rid, index, score, label, comment))
        except KeyError:
            raise APIError(404, f"answer {rid!r} not found in the request log (never logged, or past its "
                                f"retention)", "id") from None
        except IndexError as e:
            raise APIError(400, str(e), "index") from None
        except OSError as e:
            raise APIError(503, str(e), headers={"Retry-After": "1"}) from None
        return {"object": "feedback", "id": f"fb-{row}", "completion_id": rid, "index": index, "score": score,
                "label": label, "comment": comment}
    return router
