"""Fine-tuning jobs, the OpenAI way: uploaded files, a queue of jobs in SQLite, and the worker process that runs
one job's `rft train` (reinforcement) or `rft sft` (supervised) with its torch threads capped.

    store = JobStore("adapters-state")          # jobs.db, files/FILE_ID.jsonl, jobs/JOB_ID/{run/,log.txt}
    runner = JobRunner(store, "adapters/")      # one job at a time, 1 torch thread each: serving keeps its cores
    runner.start(); ...; runner.stop()          # a job running at stop() is re-queued and resumed at start()
    python -m rftkit.jobs STATE_DIR JOB_ID      # the worker process the runner starts for a job

Why a process and not a thread: training holds the GIL through its Python loop and would stall the server's
event loop; a process is also what a cancel or a pause can stop cleanly. It gets SIGTERM, which the training
loops already turn into "checkpoint this step, exit 143" (rftkit.preemption), so cancel, pause, and a server
shutdown all keep the checkpoint, and `resume` / the next start-up continue it with `--resume`.

The database is the only state the server keeps about jobs: a job found `running` at start-up belonged to a
server that stopped (or died) mid-job; it is re-queued and resumes from its newest checkpoint. Each training
step's row (the one `metrics.jsonl` gets) is also written here as a `metrics` event by the worker, so events
page in one ordered sequence with the status messages; rows past the checkpoint a resume starts from are
dropped, as `metrics.jsonl` drops them. A succeeded job's adapter is copied into the server's adapter directory
as `ft-SUFFIX-JOBID` (served as `ft:BASE:SUFFIX:JOBID`, OpenAI's naming), where hot-loading finds it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

STATES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
SUFFIX = re.compile(r"[A-Za-z0-9_.]{0,40}")            # no '-' or ':': the folder and the model id split on them
JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")
LR = 2e-4                                               # the learning rate learning_rate_multiplier scales

SCHEMA = """
create table if not exists files (id text primary key, filename text, bytes integer, created_at integer,
                                  purpose text);
create table if not exists jobs (id text primary key, created_at integer, status text, spec text,
                                 fine_tuned_model text, finished_at integer, error text, trained_tokens integer,
                                 want text, resume integer default 0, started_at integer, pid integer);
create table if not exists events (seq integer primary key autoincrement, job_id text, created_at integer,
                                   level text, message text, type text, data text, step integer);
create index if not exists events_job on events (job_id, seq);
"""


def model_id(base: str, suffix: str, job_id: str) -> str:
    return f"ft:{base}:{suffix}:{job_id}"


def adapter_name(model: str) -> str | None:
    """The adapter folder of a `ft:BASE:SUFFIX:JOBID` model id (None for any other id)."""
    parts = model.split(":")
    if len(parts) < 4 or parts[0] != "ft" or not JOB_ID.fullmatch(parts[-1]) or not SUFFIX.fullmatch(parts[-2]):
        return None
    return f"ft-{parts[-2]}-{parts[-1]}" if parts[-2] else f"ft-{parts[-1]}"


def model_of_adapter(folder: str, base: str) -> str:
    """The model id an adapter folder is served as: `ft:BASE:SUFFIX:JOBID` for a job's, else the folder name."""
    m = re.fullmatch(r"ft-(?:([A-Za-z0-9_.]+)-)?(ftjob-[0-9a-f]{24})", folder)
    return model_id(base, m.group(1) or "", m.group(2)) if m else folder


class JobStore:
    """The SQLite database and the folders of one state directory. Every method opens its own connection, so
    the server's threads and the worker process share it safely (WAL: readers never wait for the writer)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(exist_ok=True)
        self.db = self.root / "jobs.db"
        with self.connect() as c:
            c.execute("pragma journal_mode=wal")
            c.executescript(SCHEMA)

    def connect(self) -> sqlite3.Connection:
        c = sqlite3.connect(self.db, timeout=30)
        c.row_factory = sqlite3.Row
        return c

    # ------------------------------------------------------------------ files
    def add_file(self, filename: str, data: bytes, purpose: str) -> dict:
        fid = "file-" + secrets.token_hex(12)
        tmp = self.root / "files" / f".{fid}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.file_path(fid))
        row = (fid, filename, len(data), int(time.time()), purpose)
        with self.connect() as c:
            c.execute("insert into files values (?, ?, ?, ?, ?)", row)
        return self.file(fid)

    def file_path(self, fid: str) -> Path:
        return self.root / "files" / f"{fid}.jsonl"

    def file(self, fid: str) -> dict | None:
        with self.connect() as c:
            r = c.execute("select * from files where id = ?", (fid,)).fetchone()
        return None if r is None else {**dict(r), "object": "file", "status": "processed", "expires_at": None,
                                       "status_details": None}

    def files(self, purpose: str | None = None) -> list[dict]:
        with self.connect() as c:
            ids = [r[0] for r in c.execute("select id from files where ? is null or purpose = ? order by "
                                           "created_at desc, rowid desc", (purpose, purpose))]
        return [self.file(i) for i in ids]

    def delete_file(self, fid: str) -> None:
        with self.connect() as c:
            c.execute("delete from files where id = ?", (fid,))
        self.file_path(fid).unlink(missing_ok=True)

    # ------------------------------------------------------------------ jobs
    def add_job(self, spec: dict) -> str:
        jid = "ftjob-" + secrets.token_hex(12)
        with self.connect() as c:
            c.execute("insert into jobs (id, created_at, status, spec) values (?, ?, 'queued', ?)",
                      (jid, int(time.time()), json.dumps(spec)))
        (self.root / "jobs" / jid).mkdir()
        self.event(jid, f"Created fine-tuning job: {jid}")
        return jid

    def job(self, jid: str) -> dict | None:
        with self.connect() as c:
            r = c.execute("select * from jobs where id = ?", (jid,)).fetchone()
        if r is None:
            return None
        d = dict(r)
        d["spec"], d["error"] = json.loads(d["spec"]), json.loads(d["error"]) if d["error"] else None
        return d

    def jobs(self) -> list[dict]:
        with self.connect() as c:
            ids = [r[0] for r in c.execute("select id from jobs order by created_at desc, rowid desc")]
        return [self.job(i) for i in ids]

    def update(self, jid: str, **values) -> None:
        if "error" in values and values["error"] is not None:
            values["error"] = json.dumps(values["error"])
        with self.connect() as c:
            c.execute(f"update jobs set {', '.join(f'{k} = ?' for k in values)} where id = ?",
                      (*values.values(), jid))

    def next_queued(self) -> dict | None:
        with self.connect() as c:
            r = c.execute("select id from jobs where status = 'queued' order by created_at, rowid limit 1").fetchone()
        return None if r is None else self.job(r[0])

    def run_dir(self, jid: str) -> Path:
        return self.root / "jobs" / jid / "run"

    def log_path(self, jid: str) -> Path:
        return self.root / "jobs" / jid / "log.txt"

    # ------------------------------------------------------------------ events
    def event(self, jid: str, message: str, level: str = "info", data: dict | None = None,
              kind: str = "message") -> None:
        step = data.get("step") if kind == "metrics" and data else None
        with self.connect() as c:
            c.execute("insert into events (job_id, created_at, level, message, type, data, step) "
                      "values (?, ?, ?, ?, ?, ?, ?)", (jid, int(time.time()), level, message, kind,
                                                       json.dumps(data) if data is not None else None, step))

    def events(self, jid: str, after: int | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first, the ones older than event `after` (a sequence number); and whether more remain."""
        with self.connect() as c:
            rows = c.execute("select * from events where job_id = ? and seq < ? order by seq desc limit ?",
                             (jid, after if after is not None else 1 << 62, limit + 1)).fetchall()
        out = [{"id": f"ftevent-{r['seq']}", "object": "fine_tuning.job.event", "created_at": r["created_at"],
                "level": r["level"], "message": r["message"], "type": r["type"],
                "data": json.loads(r["data"]) if r["data"] else None} for r in rows[:limit]]
        return out, len(rows) > limit

    def drop_metrics_after(self, jid: str, step: int) -> None:
        with self.connect() as c:
            c.execute("delete from events where job_id = ? and type = 'metrics' and step > ?", (jid, step))


# ----------------------------------------------------------------------------------------------------------
# a job -> the config of rft train / rft sft

# the training options a request may set beside OpenAI's hyperparameters (`rftkit: {...}` in the body): numbers
# and choices only; paths, reward code and devices stay the server's to decide
TUNABLE = {"steps", "time_budget", "group_size", "prompts_per_step", "max_tokens", "temperature", "top_p", "lr",
           "warmup_steps", "weight_decay", "grad_clip", "lora_r", "lora_alpha", "loss_type", "eps_low", "eps_high",
           "importance", "beta", "scale_rewards", "iterations", "dynamic_sampling", "mask_truncated",
           "micro_batch_groups", "checkpoint_every", "log_samples", "eval_every", "eval_n", "epochs", "batch_size",
           "micro_batch", "max_length", "overlong", "min_lr_ratio", "lora_dropout", "rslora", "keep_checkpoints"}


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _hyper(h: dict, name: str, default, kind=int):
    v = h.get(name, "auto")
    return default if v in (None, "auto") else kind(v)


def job_config(store: JobStore, job: dict):
    """The GRPOConfig (reinforcement) or SFTConfig (supervised) of `job`, resuming if it ran before.
    OpenAI's hyperparameters map as: batch_size -> prompts per step (RFT) / examples per step (SFT); n_epochs ->
    passes over the training file; learning_rate_multiplier x 2e-4; compute_multiplier x 8 -> group size;
    eval_interval / eval_samples -> eval_every / eval_n (with a validation file)."""
    spec, jid = job["spec"], job["id"]
    method = spec["method"]
    kind = method["type"]
    h = {**spec.get("hyperparameters", {}), **(method.get(kind) or {}).get("hyperparameters", {})}
    data = store.file_path(spec["training_file"])
    eval_data = store.file_path(spec["validation_file"]) if spec.get("validation_file") else None
    rows = _count_rows(data)
    batch = _hyper(h, "batch_size", min(8, rows))
    common = dict(model=spec["base_path"], data=str(data), eval_data=str(eval_data) if eval_data else None,
                  output=str(store.run_dir(jid)), seed=spec["seed"], lr=LR * _hyper(h, "learning_rate_multiplier", 1.0,
                                                                                   float),
                  resume=bool(job["resume"]), overwrite=not job["resume"])
    if kind == "reinforcement":
        from rftkit.grpo import GRPOConfig as Config
        grader = store.root / "jobs" / jid / "grader.json"
        grader.write_text(json.dumps(method["reinforcement"]["grader"]))
        epochs = _hyper(h, "n_epochs", 3)
        common.update(grader=str(grader), prompts_per_step=batch, steps=max(1, -(-epochs * rows // batch)),
                      group_size=max(2, round(8 * _hyper(h, "compute_multiplier", 1.0, float))))
        if eval_data:
            common.update(eval_every=_hyper(h, "eval_interval", 10), eval_n=_hyper(h, "eval_samples", 200))
    else:
        from rftkit.sft import SFTConfig as Config
        common.update(batch_size=batch, micro_batch=batch, epochs=_hyper(h, "n_epochs", 3),
                      eval_every=50 if eval_data else 0)
    names = {f.name for f in fields(Config)}
    extra = {k: v for k, v in spec.get("rftkit", {}).items() if k in names}
    return kind, Config(**{**common, **extra})


def check_tunable(extra) -> dict:
    """The `rftkit` object of a job request: known, tunable options with plain values (ValueError otherwise)."""
    if not isinstance(extra, dict):
        raise ValueError(f"rftkit must be an object of training options, got {json.dumps(extra)[:60]}")
    for k, v in extra.items():
        if k not in TUNABLE:
            raise ValueError(f"rftkit.{k} is not an option a job may set; these are: {', '.join(sorted(TUNABLE))}")
        if not isinstance(v, (int, float, str, bool)):
            raise ValueError(f"rftkit.{k} must be a number, a boolean or a string, got {json.dumps(v)[:60]}")
    return extra


def work(state_dir: str, jid: str, threads: int) -> int:
    """The worker process: run job `jid`'s training, its step rows written as events too. Returns the exit
    status (143 after a SIGTERM: checkpointed)."""
    import torch
    torch.set_num_threads(threads)
    store = JobStore(state_dir)
    job = store.job(jid)
    kind, cfg = job_config(store, job)
    if job["resume"]:
        from rftkit.loading.checkpoint import newest_readable_checkpoint
        ckpt, state = newest_readable_checkpoint(store.run_dir(jid) / "checkpoints")
        step = state["meta"]["step"] if ckpt is not None else 0
        store.drop_metrics_after(jid, step)
        store.event(jid, f"Resuming from step {step}" if step else "Starting over: no checkpoint was saved")
    parent = os.getppid()
    total = cfg.steps

    def on_step(step: int, row: dict) -> None:
        what = ", ".join(f"{k} {row[k]:.3g}" for k in ("reward", "accuracy", "loss") if isinstance(row.get(k), float))
        store.event(jid, f"Step {step}{f'/{total}' if total else ''}: {what}", data=row, kind="metrics")
        if os.getppid() != parent:          # the server died without stopping us: checkpoint and leave
            os.kill(os.getpid(), signal.SIGTERM)
    if kind == "reinforcement":
        from rftkit.grpo import train
        result = train(cfg, progress=False, on_step=on_step)
    else:
        from rftkit.sft import train
        result = train(cfg, progress=False, on_step=on_step)
    return 143 if result.get("stopped") else 0


# ----------------------------------------------------------------------------------------------------------
# the runner: in the server's process, a thread that starts and watches the worker processes

class JobRunner:
    """Starts queued jobs as worker processes (`max_running` at once), turns their exits into job states, and
    copies a succeeded job's adapter into `adapters` (the server's adapter directory)."""

    def __init__(self, store: JobStore, adapters: str | Path, max_running: int = 1, threads: int = 1,
                 poll: float = 0.5):
        self.store, self.adapters = store, Path(adapters)
        self.max_running, self.threads, self.poll = max_running, threads, poll
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        with self.store.connect() as c:
            stale = [r[0] for r in c.execute("select id from jobs where status = 'running'")]
        for jid in stale:               # the server that ran it stopped: continue from its checkpoint
            self._orphan_gone(self.store.job(jid)["pid"])
            if self.store.job(jid)["want"] == "cancel":         # asked for just before that stop
                self.store.update(jid, status="cancelled", want=None, finished_at=int(time.time()))
                self.store.event(jid, "Fine-tuning job cancelled (checkpoint kept)")
                continue
            self.store.update(jid, status="queued", resume=1, want=None)
            self.store.event(jid, "The server restarted: the job is queued again and resumes from its checkpoint")
        self.thread = threading.Thread(target=self._loop, name="rftkit-jobs", daemon=True)
        self.thread.start()

    @staticmethod
    def _orphan_gone(pid: int | None, timeout: float = 120.0) -> None:
        """A worker left by a server that was killed (kill -9) may still be in its step: it checkpoints and
        exits on its own (its parent changed); wait for it, so that two processes never share a run folder."""
        if not pid:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                return
            if b"rftkit.jobs" not in command:       # the pid was reused by an unrelated process
                return
            time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the running jobs (each checkpoints its step) and wait for them; they stay `running` in the
        database, so the next start-up re-queues and resumes them."""
        with self.lock:
            self.stopping = True
            procs = dict(self.procs)
        self.wake.set()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self.stopping:
            try:
                self._reap()
                self._launch()
            except Exception as e:      # noqa: BLE001 - a bad job must not stop the queue; it is reported
                print(f"rft serve: job runner: {e!r}", file=sys.stderr, flush=True)
            self.wake.wait(self.poll)
            self.wake.clear()

    def _launch(self) -> None:
        with self.lock:
            while not self.stopping and len(self.procs) < self.max_running:
                job = self.store.next_queued()
                if job is None:
                    return
                jid = job["id"]
                env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
                log = open(self.store.log_path(jid), "ab")
                self.procs[jid] = subprocess.Popen(
                    [sys.executable, "-m", "rftkit.jobs", str(self.store.root), jid, str(self.threads)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True)   # a Ctrl-C at the server's terminal reaches the runner, not the job
                log.close()
                self.store.update(jid, status="running", started_at=int(time.time()), want=None,
                                  pid=self.procs[jid].pid)
                self.store.event(jid, "Fine-tuning job started")

    def _reap(self) -> None:
        with self.lock:
            done = [(jid, p.returncode) for jid, p in self.procs.items() if p.poll() is not None]
            if self.stopping:
                return
            for jid, _ in done:
                del self.procs[jid]
        for jid, rc in done:
            self._finished(jid, rc)

    def _finished(self, jid: str, rc: int) -> None:
        try:
            self._settle(jid, rc)
        except Exception as e:          # noqa: BLE001 - e.g. the adapter copy failed (disk full): the job failed
            message = f"finishing the job failed: {e!r}"
            self.store.update(jid, status="failed", finished_at=int(time.time()), want=None,
                              error={"code": "finish_failed", "message": message, "param": None})
            self.store.event(jid, message, level="error")

    def _settle(self, jid: str, rc: int) -> None:
        job = self.store.job(jid)
        now = int(time.time())
        if rc == 0:
            spec = job["spec"]
            name = f"ft-{spec['suffix']}-{jid}" if spec["suffix"] else f"ft-{jid}"
            tmp = self.adapters / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.store.run_dir(jid) / "adapter", tmp)
            os.replace(tmp, self.adapters / name)      # whole or absent: hot-loading never sees half of it
            model = model_id(spec["base"], spec["suffix"], jid)
            self.store.update(jid, status="succeeded", finished_at=now, fine_tuned_model=model,
                              trained_tokens=self._tokens(jid))
            self.store.event(jid, f"New fine-tuned model created: {model}")
            self.store.event(jid, "The job has successfully completed")
        elif rc in (143, -signal.SIGTERM) and job["want"] in ("cancel", "pause"):
            status = "cancelled" if job["want"] == "cancel" else "paused"
            self.store.update(jid, status=status, resume=1, want=None,
                              finished_at=now if status == "cancelled" else None)
            self.store.event(jid, f"Fine-tuning job {status} (checkpoint kept)")
        else:
            tail = self.store.log_path(jid).read_text(errors="replace").strip().splitlines()[-12:]
            message = f"the training process exited with status {rc}: " + " | ".join(tail)[-1500:]
            self.store.update(jid, status="failed", finished_at=now, want=None,
                              error={"code": "training_failed", "message": message, "param": None})
            self.store.event(jid, message, level="error")

    def _tokens(self, jid: str) -> int | None:
        """Tokens trained on (SFT's `tokens` per step, summed); None for RFT, whose rows count completions."""
        with self.store.connect() as c:
            rows = [json.loads(r[0]) for r in c.execute(
                "select data from events where job_id = ? and type = 'metrics'", (jid,))]
        n = sum(r.get("tokens", 0) for r in rows)
        return int(n) if n else None

    def request(self, jid: str, want: str) -> str:
        """Cancel or pause job `jid`: a queued (or paused) one at once, a running one by SIGTERM (its state
        changes when it has checkpointed). Returns the job's status now; ValueError if it cannot be done."""
        with self.lock:
            job = self.store.job(jid)
            status = job["status"]
            if status in FINAL or (want == "pause" and status == "paused"):
                raise ValueError(f"job {jid} is {status}: it cannot be {'cancelled' if want == 'cancel' else 'paused'}")
            if status == "running" and jid in self.procs:
                self.store.update(jid, want=want)
                self.procs[jid].send_signal(signal.SIGTERM)
                self.store.event(jid, f"{'Cancel' if want == 'cancel' else 'Pause'} requested: checkpointing")
                return status
            new = "cancelled" if want == "cancel" else "paused"
            self.store.update(jid, status=new, finished_at=int(time.time()) if new == "cancelled" else None)
            self.store.event(jid, f"Fine-tuning job {new}")
            return new

    def resume(self, jid: str) -> None:
        with self.lock:
            job = self.store.job(jid)
            if job["status"] != "paused":
                raise ValueError(f"job {jid} is {job['status']}: only a paused job can be resumed")
            self.store.update(jid, status="queued", resume=1)
            self.store.event(jid, "Fine-tuning job resumed: queued")
        self.wake.set()


if __name__ == "__main__":
    sys.exit(work(sys.argv[1], sys.argv[2], int(sys.argv[3])))
