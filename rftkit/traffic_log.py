"""The request log: what `rft serve --log-requests DIR` served (prompt, completions, adapter, sampling settings,
latency), the feedback attached to it, and the selection `rft train --from-logs` trains on.

    log = TrafficLog("logs/", retention_days=30)      # DIR/requests.db, SQLite
    log.record({"id": "chatcmpl-..", "model": "add-v1", "messages": [...], "completions": ["42"], ...})
    rows = select_prompts(LogQuery("logs/", adapter="add-v1", since="24h", feedback="score>=1"))

Off by default: a prompt is personal data, and logging it is the operator's choice. The file stays on the box;
nothing is sent anywhere. Retention is enforced by the writer: rows older than `retention_days`, and the
oldest rows beyond `max_rows`, are deleted (with their feedback) as new rows arrive.

Writes never touch the serving path: `record` puts the row on a queue and returns; one writer thread owns the
SQLite connection and inserts in batches. A failed write (disk full, file removed, locked) is a warning on
stderr and a counter, never an error for the request that was served. Feedback goes through the same queue,
so feedback on a completion that was answered a moment ago finds its row (the queue is FIFO).
"""
from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import json
import queue
import re
import sqlite3
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

DB_NAME = "requests.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,        -- the answer's id (chatcmpl-..., cmpl-...): what /v1/feedback names
    created REAL NOT NULL,      -- unix seconds
    model TEXT NOT NULL,        -- the served model id: an adapter's name, or the base model's id
    adapter TEXT,               -- the adapter's name; NULL for the base model
    adapter_dir TEXT,           -- the adapter's folder when it served (what --from-logs warm-starts from)
    endpoint TEXT NOT NULL,     -- chat or completions
    messages TEXT,              -- chat: the request's messages (JSON)
    prompts TEXT,               -- completions: the prompts (JSON: strings or token-id lists)
    completions TEXT NOT NULL,  -- JSON list of the choices' texts
    finish TEXT NOT NULL,       -- JSON list of finish reasons
    params TEXT NOT NULL,       -- JSON sampling settings
    latency REAL NOT NULL,      -- seconds from the request's arrival to its last token
    prompt_tokens INTEGER, completion_tokens INTEGER);
CREATE INDEX IF NOT EXISTS requests_created ON requests(created);
CREATE TABLE IF NOT EXISTS feedback (
    rowid INTEGER PRIMARY KEY,
    completion_id TEXT NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
    created REAL NOT NULL, choice INTEGER NOT NULL, score REAL, label TEXT, comment TEXT);
CREATE INDEX IF NOT EXISTS feedback_completion ON feedback(completion_id);
"""
COLUMNS = ("id", "created", "model", "adapter", "adapter_dir", "endpoint", "messages", "prompts", "completions",
           "finish", "params", "latency", "prompt_tokens", "completion_tokens")


def db_path(path: str | Path) -> Path:
    """The log file of a --log-requests folder (or the file itself)."""
    p = Path(path).expanduser()
    return p / DB_NAME if p.is_dir() or not p.suffix else p


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=10, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")          # readers (rft train --from-logs) never block the writer
    con.execute("PRAGMA foreign_keys=ON")
    con.executescript(SCHEMA)
    return con


class TrafficLog:
    """The server's side: a writer thread over DIR/requests.db. `record` never blocks and never raises."""

    def __init__(self, folder: str | Path, retention_days: float = 30.0, max_rows: int = 1_000_000,
                 max_queue: int = 10_000):
        if retention_days <= 0 or max_rows < 1:
            raise ValueError(f"log retention must be positive: retention_days={retention_days}, "
                             f"max_rows={max_rows}")
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / DB_NAME
        _connect(self.path).close()                 # a bad path fails at start-up, not on the first request
        self.retention_s, self.max_rows = retention_days * 86400.0, max_rows
        self.inbox: queue.Queue = queue.Queue(max_queue)
        self.written = self.failed = self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="rftkit-traffic-log", daemon=True)
        self.thread.start()
        atexit.register(self.close)                 # rows still queued at exit are written

    def record(self, row: dict) -> None:
        """Queue one served request (keys: COLUMNS; lists and dicts as they are). Full queue: dropped, counted."""
        try:
            self.inbox.put_nowait(("row", row))
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                print(f"rft serve: warning: request log queue full, {self.dropped} rows dropped", file=sys.stderr)

    def feedback(self, completion_id: str, choice: int, score: float | None, label: str | None,
                 comment: str | None) -> Future:
        """A Future of the feedback row's id, or of KeyError when no logged completion has that id."""
        fut: Future = Future()
        try:
            self.inbox.put_nowait(("feedback", (completion_id, choice, score, label, comment), fut))
        except queue.Full:
            fut.set_exception(OSError("the request log's queue is full; try again"))
        return fut

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued before this call is written (tests, shutdown)."""
        fut: Future = Future()
        self.inbox.put(("flush", fut))
        fut.result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            self.inbox.put(("stop",))
            self.thread.join(timeout)

    # ---------------------------------------------------------------- the writer thread
    def _run(self) -> None:
        con = None
        while True:
            items = [self.inbox.get()]
            while len(items) < 256:
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                con = con or _connect(self.path)
                self._apply(con, items)
            except Exception as e:          # noqa: BLE001 - a log write must never take serving down
                self.failed += sum(it[0] == "row" for it in items)
                print(f"rft serve: warning: request log write to {self.path} failed ({type(e).__name__}: {e}); "
                      f"{self.failed} rows lost so far", file=sys.stderr)
                for it in items:
                    if it[0] == "feedback" and not it[2].done():
                        it[2].set_exception(OSError(f"the request log could not be written: {e}"))
                try:
                    con and con.close()
                except sqlite3.Error:
                    pass
                con = None
            for it in items:
                if it[0] == "flush":
                    it[1].set_result(None)
            if any(it[0] == "stop" for it in items):
                con and con.close()
                return

    def _apply(self, con: sqlite3.Connection, items: list) -> None:
        values = []
        for it in items:
            if it[0] == "row":
                try:
                    values.append(_values(it[1]))
                except (TypeError, ValueError) as e:       # one bad row is lost, not its batch
                    self.failed += 1
                    print(f"rft serve: warning: request {it[1].get('id')} not logged ({e})", file=sys.stderr)
        with con:
            con.executemany(f"INSERT OR REPLACE INTO requests ({','.join(COLUMNS)}) VALUES "
                            f"({','.join('?' * len(COLUMNS))})", values)
            if values:
                self._retain(con)
        self.written += len(values)
        for it in items:
            if it[0] != "feedback":
                continue
            cid, choice, score, label, comment = it[1]
            with con:
                found = con.execute("SELECT json_array_length(completions) FROM requests WHERE id = ?",
                                    (cid,)).fetchone()
                if found is None:
                    it[2].set_exception(KeyError(cid))
                    continue
                if choice >= found[0]:
                    it[2].set_exception(IndexError(f"index {choice} out of range: {cid} has {found[0]} choices"))
                    continue
                cur = con.execute("INSERT INTO feedback (completion_id, created, choice, score, label, comment) "
                                  "VALUES (?, ?, ?, ?, ?, ?)", (cid, time.time(), choice, score, label, comment))
            it[2].set_result(cur.lastrowid)

    def _retain(self, con: sqlite3.Connection) -> None:
        con.execute("DELETE FROM requests WHERE created < ?", (time.time() - self.retention_s,))
        con.execute("DELETE FROM requests WHERE rowid <= (SELECT rowid FROM requests ORDER BY rowid DESC "
                    "LIMIT 1 OFFSET ?)", (self.max_rows,))


def _values(row: dict) -> tuple:
    enc = lambda v: None if v is None else json.dumps(v, ensure_ascii=False)
    return tuple(enc(row.get(c)) if c in ("messages", "prompts", "completions", "finish", "params")
                 else row.get(c) for c in COLUMNS)


# ---------------------------------------------------------------------------------------------------------
# reading: the selection `rft train --from-logs` and `rft eval --from-logs` take

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_time(text: str, flag: str, now: float | None = None) -> float | None:
    """"" -> None; "24h" / "30m" / "7d" / "90s" -> that long ago; ISO 8601 (UTC when no zone) -> unix seconds."""
    if not text:
        return None
    m = _AGO.match(text.strip())
    if m:
        return (now or time.time()) - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--{flag} {text!r}: give a time ago (90s, 30m, 24h, 7d) or an ISO date/time "
                         f"(2026-12-07 or 2026-12-07T01:30, UTC unless a zone is given)") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


_FEEDBACK = re.compile(r"^(any|with|without|label=.+|score(>=|<=|>|<|=)-?\d+(\.\d+)?)$")


@dataclass
class LogQuery:
    """Which logged prompts to take: by served model, time window and feedback."""
    db: str                             # a --log-requests folder or its requests.db
    adapter: str = ""                   # the served model id (adapter name or base id); "" = every one
    since: str = ""                     # "24h" ago, or an ISO time; "" = from the start
    until: str = ""                     # the same, the end; "" = now
    feedback: str = "any"               # any | with | without | score>=X (also >, <=, <, =) | label=NAME

    def __post_init__(self):
        if not _FEEDBACK.match(self.feedback):
            raise ValueError(f"--logs-feedback {self.feedback!r}: use any, with, without, score>=X (also >, <=, "
                             f"<, =) or label=NAME")
        for flag in ("since", "until"):
            parse_time(getattr(self, flag), "logs-" + flag)     # a bad time fails at once


def select_prompts(q: LogQuery) -> tuple[list[dict], str]:
    """The distinct chat prompts that match `q`, oldest first, as data rows ({"messages", "id", "_where",
    "_line"}; `id` is the first logged completion's id), and a line saying what was taken. Feedback of a
    request is any feedback row on any of its choices; the score filter takes requests whose mean score passes."""
    path = db_path(q.db)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no request log (start rft serve with --log-requests DIR, then pass "
                                f"that DIR to --from-logs)")
    since, until = parse_time(q.since, "logs-since"), parse_time(q.until, "logs-until")
    where, args = ["endpoint = 'chat'"], []
    if q.adapter:
        where.append("model = ?")
        args.append(q.adapter)
    if since is not None:
        where.append("created >= ?")
        args.append(since)
    if until is not None:
        where.append("created < ?")
        args.append(until)
    fb = "(SELECT COUNT(*) FROM feedback f WHERE f.completion_id = r.id)"
    if q.feedback == "with":
        where.append(f"{fb} > 0")
    elif q.feedback == "without":
        where.append(f"{fb} = 0")
    elif q.feedback.startswith("label="):
        where.append("EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = r.id AND f.label = ?)")
        args.append(q.feedback[len("label="):])
    elif q.feedback.startswith("score"):
        op = re.match(r"score(>=|<=|>|<|=)", q.feedback).group(1)
        where.append(f"(SELECT AVG(score) FROM feedback f WHERE f.completion_id = r.id) {op} ?")
        args.append(float(q.feedback[len("score") + len(op):]))
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        found = con.execute(f"SELECT id, messages FROM requests r WHERE {' AND '.join(where)} ORDER BY created, id",
                            args).fetchall()
        total = con.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path}: not a request log ({e})") from None
    finally:
        con.close()
    rows, seen = [], set()
    for rid, messages in found:
        key = prompt_key(json.loads(messages))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": json.loads(messages), "id": rid, "_where": f"{path} request {rid}",
                     "_line": len(rows) + 1})
    what = ", ".join(f"{k} {v}" for k, v in (("adapter", q.adapter), ("since", q.since), ("until", q.until),
                                               ("feedback", q.feedback)) if v and v != "any") or "every chat request"
    if not rows:
        raise ValueError(f"{path}: no logged chat request matches ({what}; the log holds {total} requests)")
    return rows, f"{len(rows)} distinct prompts of {len(found)} matching requests in {path} ({what})"


def log_query(cfg) -> LogQuery | None:
    """The LogQuery of a command config's from_logs / logs_* fields (rft train, rft eval); None without
    from_logs."""
    if not cfg.from_logs:
        if cfg.logs_adapter or cfg.logs_since or cfg.logs_until or cfg.logs_feedback != "any":
            raise ValueError("--logs-adapter, --logs-since, --logs-until and --logs-feedback select from a request "
                             "log: give --from-logs DIR")
        return None
    return LogQuery(cfg.from_logs, cfg.logs_adapter, cfg.logs_since, cfg.logs_until, cfg.logs_feedback)


def served_adapter(q: LogQuery) -> str | None:
    """The folder of the adapter that served `q.adapter`'s logged requests (the newest one's), for a warm
    start; None when the base model served them (a fresh adapter); an error when the log has no such requests
    or the folder is gone."""
    if not q.adapter:
        raise ValueError("--from-logs without --logs-adapter: say which served model's traffic to train on (an "
                         "adapter's folder is the warm start), or give --init-adapter DIR")
    con = sqlite3.connect(f"file:{db_path(q.db)}?mode=ro", uri=True, timeout=10)
    try:
        found = con.execute("SELECT adapter, adapter_dir FROM requests WHERE model = ? ORDER BY created DESC "
                            "LIMIT 1", (q.adapter,)).fetchone()
    finally:
        con.close()
    if found is None:
        raise ValueError(f"{db_path(q.db)}: no request served by {q.adapter!r} (--logs-adapter takes an adapter "
                         f"name or the base model's id, as the requests' `model` field named it)")
    if found[0] is None:
        return None                                 # the base model's traffic: a new adapter from scratch
    if not Path(found[1], "adapter_config.json").is_file():
        raise FileNotFoundError(f"{found[1]}: the adapter that served {q.adapter!r} is gone; give --init-adapter DIR")
    return found[1]


def prompt_key(messages: list[dict]) -> str:
    """One prompt however often it was sent: the canonical JSON of its messages."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def held_out(messages: list[dict], fraction: float, seed: int) -> bool:
    """Whether a logged prompt is in the held-out share: a hash of (seed, the prompt), so the split of a prompt
    never changes as the log grows, and a prompt sent twice never lands on both sides."""
    h = int(hashlib.sha256(f"{seed}:{prompt_key(messages)}".encode()).hexdigest()[:8], 16)
    return h < fraction * 0x100000000
