"""OpenAI's files and fine-tuning jobs endpoints, and the console page, as a FastAPI router `rft serve` includes.

    client.files.create(file=open("rows.jsonl", "rb"), purpose="fine-tune")
    client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=f.id, method={
        "type": "reinforcement", "reinforcement": {"grader": {"type": "string_check", ...}}})
    client.fine_tuning.jobs.list_events(job.id)          # status messages and each step's metrics, newest first
    open http://127.0.0.1:8000/ui#key=KEY                # the console

Shapes follow the official `openai` client's types (FileObject, FineTuningJob, FineTuningJobEvent,
FineTuningJobCheckpoint, cursor pages with `has_more`); the one addition is `paused`, the state between
`pause` and `resume`. A request may add `rftkit: {...}` (numbers and choices of rft train / rft sft, e.g.
`{"group_size": 4, "max_tokens": 16}`); paths, reward code and devices are never the client's to set.
The store, the queue and the worker process are rftkit.jobs; this module is HTTP only.
"""

import json
import re
import sqlite3
from pathlib import Path

from rftkit.jobs import JOB_ID, SUFFIX, JobRunner, JobStore, check_tunable
from rftkit.serve.requests import APIError

CONSOLE = Path(__file__).with_name("console.html")
METHODS = ("supervised", "reinforcement")
HYPER = {"batch_size": int, "n_epochs": int, "learning_rate_multiplier": float, "compute_multiplier": float,
         "eval_interval": int, "eval_samples": int, "reasoning_effort": str}


def open_jobs(cfg) -> JobRunner | None:
    """The job runner of a ServeConfig: None when jobs are off (max_jobs 0, or no --adapters: a finished job's
    adapter needs a directory to be served from); the state folder defaults to ADAPTERS-state beside it."""
    if cfg.max_jobs == 0 or cfg.adapters is None:
        if cfg.state_dir is not None and cfg.max_jobs:
            raise ValueError("--state-dir needs --adapters: a finished job's adapter goes to the adapter directory")
        return None
    adapters = Path(cfg.adapters)
    state = Path(cfg.state_dir) if cfg.state_dir else adapters.resolve().parent / f"{adapters.resolve().name}-state"
    if state.resolve() == adapters.resolve() or adapters.resolve() in state.resolve().parents:
        raise ValueError(f"--state-dir {state} must not be inside the adapter directory {adapters}")
    try:
        store = JobStore(state)
    except (OSError, sqlite3.Error) as e:      # e.g. a read-only mount beside the adapters
        raise ValueError(f"cannot open the fine-tuning jobs' state folder {state}: {e}; pass --state-dir DIR, or "
                         f"--max-jobs 0 to serve without fine-tuning jobs") from None
    return JobRunner(store, adapters, max_running=cfg.max_jobs, threads=cfg.job_threads)


def _job_object(job: dict) -> dict:
    spec = job["spec"]
    method = spec["method"]
    h = {**spec.get("hyperparameters", {}), **(method.get(method["type"]) or {}).get("hyperparameters", {})}
    return {"id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"], "model": spec["base"],
            "status": job["status"], "fine_tuned_model": job["fine_tuned_model"], "finished_at": job["finished_at"],
            "error": job["error"], "organization_id": "rftkit", "result_files": [], "seed": spec["seed"],
            "trained_tokens": job["trained_tokens"], "training_file": spec["training_file"],
            "validation_file": spec.get("validation_file"), "estimated_finish": None, "integrations": [],
            "metadata": spec.get("metadata"), "method": method, "user_provided_suffix": spec["suffix"] or None,
            "hyperparameters": {k: h.get(k, "auto") for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}}


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """A cursor page of `items` (newest first): those after the item with id `after`."""
    if not 1 <= limit <= 10_000:
        raise APIError(400, f"limit must be in [1, 10000], got {limit}", "limit")
    if after is not None:
        ids = [x["id"] for x in items]
        if after not in ids:
            raise APIError(400, f"after: no item {after!r} in this list", "after")
        items = items[ids.index(after) + 1:]
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def _check_rows(data: bytes) -> int:
    """Rows of a JSONL upload (each line one JSON object); 400 naming the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"file: not UTF-8 text (byte {e.start}); upload a JSONL file", "file") from None
    n = 0
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise APIError(400, f"file: line {i} is not JSON ({e.msg}): {line[:80]!r}", "file") from None
        if not isinstance(row, dict):
            raise APIError(400, f"file: line {i} is not a JSON object: {line[:80]!r}", "file")
        n += 1
    if n == 0:
        raise APIError(400, "file: no rows (a JSONL file has one JSON object per line)", "file")
    return n


def _method(body: dict) -> dict:
    method = body.get("method") or {"type": "supervised"}     # OpenAI's default when only hyperparameters come
    if not isinstance(method, dict) or method.get("type") not in METHODS:
        kind = method.get("type") if isinstance(method, dict) else method
        raise APIError(400, f"method.type must be one of {', '.join(METHODS)} (dpo is not supported), got "
                            f"{json.dumps(kind)[:60]}", "method")
    kind = method["type"]
    inner = method.get(kind) or {}
    if not isinstance(inner, dict):
        raise APIError(400, f"method.{kind} must be an object", f"method.{kind}")
    for where, h in (("hyperparameters", body.get("hyperparameters") or {}),
                     (f"method.{kind}.hyperparameters", inner.get("hyperparameters") or {})):
        if not isinstance(h, dict):
            raise APIError(400, f"{where} must be an object", where)
        for k, v in h.items():
            if k not in HYPER:
                raise APIError(400, f"{where}.{k}: unknown; known: {', '.join(HYPER)}", f"{where}.{k}")
            good = v == "auto" or v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and v > 0 and (HYPER[k] is float or float(v).is_integer()))
            if not good and not (k == "reasoning_effort" and isinstance(v, str)):
                raise APIError(400, f"{where}.{k} must be \"auto\" or a positive {HYPER[k].__name__}, got "
                                    f"{json.dumps(v)[:60]}", f"{where}.{k}")
    if kind == "reinforcement":
        from rftkit.graders.schema import validate
        if "grader" not in inner:
            raise APIError(400, "method.reinforcement.grader is required: the grader object that scores samples",
                           "method.reinforcement.grader")
        try:
            validate(inner["grader"], "method.reinforcement.grader")
        except ValueError as e:
            raise APIError(400, str(e), "method.reinforcement.grader") from None
    return method


def jobs_router(server, runner: JobRunner, body_of):
    """The router: `server` is the app's Server (base model id and path, limits), `body_of` its JSON body
    reader (size limit, timeout)."""
    from fastapi import APIRouter
    from fastapi import Request as HTTPRequest
    from fastapi.responses import FileResponse
    store = runner.store
    router = APIRouter()

    def file_or_404(fid: str) -> dict:
        f = store.file(fid)
        if f is None:
            raise APIError(404, f"no file {fid!r}", "file_id", "file_not_found")
        return f

    def job_or_404(jid: str) -> dict:
        job = store.job(jid) if JOB_ID.fullmatch(jid) else None
        if job is None:
            raise APIError(404, f"no fine-tuning job {jid!r}", "fine_tuning_job_id", "job_not_found")
        return job

    @router.post("/v1/files")
    async def upload(request: HTTPRequest):
        limit = server.cfg.max_file_mb << 20
        size = request.headers.get("content-length", "")
        if not size.isdigit():
            raise APIError(411, "an upload needs a Content-Length header")
        if int(size) > limit + (64 << 10):
            raise APIError(413, f"upload of {size} bytes exceeds the limit of {server.cfg.max_file_mb} MB "
                                f"(--max-file-mb)", "file")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:          # noqa: BLE001 - whatever the multipart parser refused
            raise APIError(400, f"the body is not a multipart form with a file: {str(e)[:200]}", "file") from None
        file, purpose = form.get("file"), form.get("purpose")
        if purpose != "fine-tune":
            raise APIError(400, f"purpose must be \"fine-tune\" (the only files this server keeps), got "
                                f"{json.dumps(purpose)[:60]}", "purpose")
        if file is None or isinstance(file, str):
            raise APIError(400, "file: missing (send the JSONL file as the multipart field `file`)", "file")
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, f"file exceeds the limit of {server.cfg.max_file_mb} MB (--max-file-mb)", "file")
        await server.off_loop(_check_rows, data)
        name = re.sub(r"[^A-Za-z0-9._ -]", "_", Path(file.filename or "upload.jsonl").name)[:200]
        return await server.off_loop(store.add_file, name, data, purpose)

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None, after: str | None = None, limit: int = 10_000):
        return _page(store.files(purpose), after, limit)

    @router.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return file_or_404(file_id)

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        file_or_404(file_id)
        return FileResponse(store.file_path(file_id), media_type="application/jsonl")     # streamed from disk

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        file_or_404(file_id)
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @router.post("/v1/fine_tuning/jobs")
    async def create_job(request: HTTPRequest):
        body = await body_of(request)
        if body.get("model") != server.base_id:
            raise APIError(400, f"model must be the served base model {server.base_id!r}, got "
                                f"{json.dumps(body.get('model'))[:80]} (a fine-tuned model is not trained again)",
                           "model")
        for key in ("training_file", "validation_file"):
            fid = body.get(key)
            if (key == "training_file" or fid is not None) and (not isinstance(fid, str) or store.file(fid) is None):
                raise APIError(400, f"{key}: no uploaded file {json.dumps(fid)[:60]} (POST /v1/files first)", key)
        suffix = body.get("suffix") or ""
        if not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix):
            raise APIError(400, f"suffix must be at most 40 letters, digits, '_' or '.', got {json.dumps(suffix)[:60]}",
                           "suffix")
        seed = body.get("seed", 0) if body.get("seed") is not None else 0
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise APIError(400, f"seed must be an integer, got {json.dumps(seed)[:40]}", "seed")
        if body.get("integrations"):
            raise APIError(400, "integrations are not supported here; rft train's --report-to logs to trackers",
                           "integrations")
        try:
            extra = check_tunable(body.get("rftkit") or {})
        except ValueError as e:
            raise APIError(400, str(e), "rftkit") from None
        method = _method(body)
        spec = {"base": server.base_id, "base_path": server.cfg.model, "training_file": body["training_file"],
                "validation_file": body.get("validation_file"), "method": method, "seed": seed, "suffix": suffix,
                "hyperparameters": body.get("hyperparameters") or {}, "metadata": body.get("metadata"),
                "rftkit": extra}
        jid = store.add_job(spec)
        runner.wake.set()
        return _job_object(store.job(jid))

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = 20):
        return _page([_job_object(j) for j in store.jobs()], after, limit)

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return _job_object(job_or_404(job_id))

    async def act(job_id: str, what: str):
        job_or_404(job_id)
        try:
            runner.resume(job_id) if what == "resume" else runner.request(job_id, what)
        except ValueError as e:
            raise APIError(409, str(e), "fine_tuning_job_id") from None
        return _job_object(store.job(job_id))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        return await act(job_id, "cancel")

    @router.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause(job_id: str):
        return await act(job_id, "pause")

    @router.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume(job_id: str):
        return await act(job_id, "resume")

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(job_id: str, after: str | None = None, limit: int = 20):
        job_or_404(job_id)
        if not 1 <= limit <= 10_000:
            raise APIError(400, f"limit must be in [1, 10000], got {limit}", "limit")
        seq = None
        if after is not None:
            if not re.fullmatch(r"ftevent-\d{1,18}", after):
                raise APIError(400, f"after must be an event id (ftevent-N), got {after[:60]!r}", "after")
            seq = int(after.split("-")[1])
        data, more = await server.off_loop(store.events, job_id, seq, limit)
        return {"object": "list", "data": data, "has_more": more}

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        job = job_or_404(job_id)
        from rftkit.loading.checkpoint import checkpoints as found
        steps = {}
        for r in (await server.off_loop(store.events, job_id, None, 100_000))[0]:
            if r["type"] == "metrics" and r["data"] and "step" in r["data"]:
                steps.setdefault(r["data"]["step"], r["data"])
        model = job["fine_tuned_model"] or f"ft:{job['spec']['base']}:{job['spec']['suffix']}:{job_id}"
        out = []
        for path in reversed(found(store.run_dir(job_id) / "checkpoints")):
            step = int(path.name.split("-")[1])
            row = steps.get(step, {})
            metrics = {"step": step, "train_loss": row.get("loss"), "valid_loss": row.get("eval_loss"),
                       "train_mean_reward": row.get("reward"), "train_accuracy": row.get("accuracy")}
            out.append({"id": f"ftckpt-{job_id.split('-')[1]}-{step}", "object": "fine_tuning.job.checkpoint",
                        "created_at": int((path / "state.json").stat().st_mtime), "fine_tuning_job_id": job_id,
                        "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{step}", "step_number": step,
                        "metrics": metrics})
        return _page(out, after, limit)

    return router


def console_router():
    """GET /ui: the console, one static page (inline JS and CSS, nothing from the internet). The page holds no
    data: its script asks the key-protected endpoints, with the key from the URL fragment (`/ui#key=KEY`, which
    browsers never send to the server) or from its login box."""
    from fastapi import APIRouter
    from fastapi.responses import HTMLResponse
    router = APIRouter()

    @router.get("/ui", include_in_schema=False)
    async def console():
        return HTMLResponse(CONSOLE.read_text(), headers={"Cache-Control": "no-store"})

    return router
