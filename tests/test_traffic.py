"""Traffic is data: the request log (rows, retention, a failed write is a warning), /v1/feedback over real HTTP,
and `rft train --from-logs` on logs written by the server itself, warm-started from the adapter that served
them (its weights are the serving adapter's), with a held-out split of the logged prompts that `rft eval`
finds again."""
import json
import sqlite3
import time

import pytest
import torch
from safetensors.torch import load_file

from rftkit.traffic_log import LogQuery, TrafficLog, held_out, parse_time, select_prompts, served_adapter
from tests.serve_helpers import KEY, Running, _peft_adapter, server_root


def _row(i, model="a", created=None, text=None):
    return {"id": f"chatcmpl-{i}", "created": created or time.time(), "model": model, "adapter": model,
            "endpoint": "chat", "messages": [{"role": "user", "content": text or f"What is {i} + 1?"}],
            "completions": [str(i + 1)], "finish": ["eos"], "params": {"temperature": 0}, "latency": 0.01}


def test_log_rows_feedback_selection_and_retention(tmp_path, capsys):
    log = TrafficLog(tmp_path / "logs", retention_days=1, max_rows=5)
    for i in range(4):
        log.record(_row(i, model="a" if i < 3 else "b"))
    log.record(_row(9, text="What is 0 + 1?"))                    # the same prompt as request 0: one prompt
    log.record({**_row(10), "params": {"bad": object()}})          # cannot be encoded: a warning, then go on
    log.record(_row(11, created=time.time() - 3 * 86400))          # past retention: deleted on arrival
    log.flush()
    assert log.failed == 1 and "not JSON serializable" in capsys.readouterr().err
    assert log.feedback("chatcmpl-1", 0, 1.0, "correct", None).result(5) >= 1
    assert log.feedback("chatcmpl-2", 0, 0.0, None, "wrong").result(5) >= 1
    with pytest.raises(KeyError):
        log.feedback("chatcmpl-404", 0, 1.0, None, None).result(5)
    with pytest.raises(IndexError):
        log.feedback("chatcmpl-1", 1, 1.0, None, None).result(5)
    db = str(tmp_path / "logs")
    ids = lambda **kw: [r["id"] for r in select_prompts(LogQuery(db, **kw))[0]]
    assert ids() == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2", "chatcmpl-3"]     # 9 repeats 0's prompt; 11 is gone
    assert ids(adapter="b") == ["chatcmpl-3"]
    assert ids(feedback="with") == ["chatcmpl-1", "chatcmpl-2"]
    assert ids(feedback="without") == ["chatcmpl-0", "chatcmpl-3"]
    assert ids(feedback="score>=0.5") == ids(feedback="label=correct") == ["chatcmpl-1"]
    assert ids(since="1h", until="2999-01-01") == ids()
    with pytest.raises(ValueError, match="no logged chat request matches"):
        ids(since="2999-01-01")
    for i in range(20, 26):                                        # max_rows=5 keeps the newest 5
        log.record(_row(i))
    log.close()
    with sqlite3.connect(tmp_path / "logs" / "requests.db") as con:
        left = [r[0] for r in con.execute("SELECT id FROM requests ORDER BY rowid")]
        assert left == [f"chatcmpl-{i}" for i in range(21, 26)]
        assert con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0    # went with their requests
    with pytest.raises(ValueError, match="--logs-feedback 'score>>1'"):
        LogQuery(db, feedback="score>>1")
    with pytest.raises(ValueError, match="--logs-since 'yesterday'"):
        parse_time("yesterday", "logs-since")
    assert parse_time("2h", "x", now=10000.0) == 10000.0 - 7200
    msgs = [[{"role": "user", "content": f"q{i}"}] for i in range(2000)]
    share = sum(held_out(m, 0.2, seed=0) for m in msgs) / len(msgs)
    assert 0.17 < share < 0.23 and [held_out(m, 0.2, 0) for m in msgs] == [held_out(m, 0.2, 0) for m in msgs]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    from rftkit.serve.app import ServeConfig, Server, build_app
    root, base = server_root(tmp_path_factory, "traffic")
    _peft_adapter(base, root / "adapters" / "add-v1", seed=1)      # r=4, alpha=8, q_proj and v_proj
    cfg = ServeConfig(model=str(base), adapters=str(root / "adapters"), api_key=KEY, max_seq_len=512,
                      device="cpu", log_requests=str(root / "logs"))
    server = Server(cfg)
    running = Running(build_app(server), server)
    running.base, running.root = base, root
    yield running
    running.stop()


def test_server_logs_requests_and_takes_feedback(logged):
    client = logged.client()
    r = client.chat.completions.create(model="add-v1", messages=[{"role": "user", "content": "What is 12 + 30?"}],
                                       max_tokens=5, temperature=0)
    chunks = list(client.chat.completions.create(model="add-v1", max_tokens=4, temperature=0.7, seed=3, n=2,
                                                 stream=True, messages=[{"role": "user", "content": "What is 5 + 6?"}]))
    client.completions.create(model=logged.server.base_id, prompt="plain text", max_tokens=3, temperature=0)
    logged.server.traffic.flush()
    with sqlite3.connect(logged.root / "logs" / "requests.db") as con:
        con.row_factory = sqlite3.Row
        rows = {row["id"]: row for row in con.execute("SELECT * FROM requests")}
    first = rows[r.id]
    assert json.loads(first["completions"]) == [r.choices[0].message.content]
    assert json.loads(first["messages"]) == [{"role": "user", "content": "What is 12 + 30?"}]
    assert first["model"] == "add-v1" and first["adapter_dir"] == str((logged.root / "adapters" / "add-v1").resolve())
    assert json.loads(first["params"])["temperature"] == 0 and json.loads(first["params"])["max_tokens"] == 5
    assert 0 < first["latency"] < 60 and first["completion_tokens"] == r.usage.completion_tokens
    streamed = rows[chunks[0].id]
    joined = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
              for i in range(2)]
    assert json.loads(streamed["completions"]) == joined and json.loads(streamed["params"])["seed"] == 3
    plain = [row for row in rows.values() if row["endpoint"] == "completions"]
    assert len(plain) == 1 and plain[0]["adapter"] is None and json.loads(plain[0]["prompts"]) == ["plain text"]

    ok = logged.post("/v1/feedback", {"id": r.id, "score": 1, "label": "correct", "comment": "fine"})
    assert ok.status_code == 200 and ok.json()["completion_id"] == r.id and ok.json()["score"] == 1.0
    assert logged.post("/v1/feedback", {"id": streamed["id"], "index": 1, "score": 0.5}).status_code == 200
    missing = logged.post("/v1/feedback", {"id": "chatcmpl-nope", "score": 1})
    assert missing.status_code == 404 and "chatcmpl-nope" in missing.json()["error"]["message"]
    for body, field in [({"id": r.id}, "score"), ({"id": r.id, "score": "high"}, "score"), ({"score": 1}, "id"),
                        ({"id": r.id, "score": 1, "index": 5}, "index"), ({"id": r.id, "label": 3}, "label"),
                        ({"id": r.id, "score": 1, "stars": 5}, "stars")]:
        bad = logged.post("/v1/feedback", body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field, (body, bad.text)
    assert logged.post("/v1/feedback", {"id": r.id, "score": 1}, key="wrong").status_code == 401
    assert client.chat.completions.create(model="add-v1", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices                          # still serving


def test_train_from_logs_warm_starts_from_the_serving_adapter(logged, tmp_path):
    from rftkit.evaluate import EvalConfig, run_eval
    from rftkit.grpo import GRPOConfig, train
    import datetime as dt
    client = logged.client()
    since = dt.datetime.now(dt.timezone.utc).isoformat()          # the window: this test's requests only
    for a in range(10, 40):
        client.chat.completions.create(model="add-v1", max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": f"What is {a} + {a + 7}?"}])
    logged.server.traffic.flush()
    logs = str(logged.root / "logs")
    rows = []
    cfg = GRPOConfig(model=str(logged.base), from_logs=logs, logs_adapter="add-v1", logs_since=since,
                     task_reward="arithmetic_verifier", eval_fraction=0.25, output=str(tmp_path / "v2"), steps=2,
                     prompts_per_step=2, group_size=2, max_tokens=4, lr=0.0, lora_r=4, lora_alpha=8,
                     lora_targets=["q_proj", "v_proj"], log_samples=4, device="cpu")
    result = train(cfg, progress=False, on_step=lambda step, row: rows.append(row))
    served = load_file(logged.root / "adapters" / "add-v1" / "adapter_model.safetensors")
    trained = load_file(tmp_path / "v2" / "adapter" / "adapter_model.safetensors")
    assert served.keys() == trained.keys()                        # lr 0: what was loaded is what is saved
    assert all(torch.equal(served[k], trained[k]) for k in served)
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert config["init_adapter"] == str((logged.root / "adapters" / "add-v1").resolve())
    assert result["steps"] == len(rows) == 2       # the verifier raises on a prompt without "A + B?": the logged ones
    assert served_adapter(LogQuery(logs, adapter=logged.server.base_id)) is None     # base traffic: a fresh adapter
    with pytest.raises(ValueError, match="no request served by 'add-v9'"):
        served_adapter(LogQuery(logs, adapter="add-v9"))
    with pytest.raises(ValueError, match="--init-adapter"):
        served_adapter(LogQuery(logs))
    task_rows = select_prompts(LogQuery(logs, adapter="add-v1", since=since))[0]
    assert len(task_rows) == 30
    val = [r for r in task_rows if held_out(r["messages"], 0.25, seed=0)]
    assert 0 < len(val) < len(task_rows)
    out = tmp_path / "eval.jsonl"
    run_eval(EvalConfig(model=str(logged.base), adapter=str(tmp_path / "v2" / "adapter"), from_logs=logs,
                        logs_adapter="add-v1", logs_since=since, eval_fraction=0.25, reward="arithmetic_verifier",
                        max_tokens=4,                        output=str(out)))
    assert sorted(json.loads(l)["id"] for l in out.read_text().splitlines()) == sorted(r["id"] for r in val)
