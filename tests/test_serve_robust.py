"""`rft serve` against hostile input, over real HTTP on loopback: every bad body, field and adapter folder is a
named 4xx (never a 500, never silently served), nothing a request does kills the engine thread or locks others
out, the event loop stays free, versions are told apart by content, and nothing leaks (paths, file contents)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve_helpers import KEY, MSG, Running, _hf_greedy, _peft_adapter, server_root


@pytest.fixture(scope="module")
def robust(tmp_path_factory):
    from rftkit.serve.app import ServeConfig, Server, build_app
    root, base = server_root(tmp_path_factory, "robust")
    _peft_adapter(base, root / "adapters" / "alpha", seed=1)
    cfg = ServeConfig(model=str(base), adapters=str(root / "adapters"), api_key=KEY, max_seq_len=2048, max_n=4,
                      max_body_bytes=2 << 20, max_loaded_adapters=2, device="cpu", header_timeout=2.0)
    server = Server(cfg)
    running = Running(build_app(server), server)
    running.base, running.root = base, root
    yield running
    running.stop()


def _raw(running, path, raw: bytes):
    return httpx.post(running.url + path, content=raw, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


def _five_hundreds(running) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in running.get("/metrics").text.splitlines()
               if line.startswith("rftkit_requests_total{") and 'status="5' in line)


# ----------------------------------------------------------------------------------------------------------
# bad input: a table

C = {"model": "base", "prompt": "abc", "max_tokens": 4}
CHAT = {"model": "base", "messages": MSG, "max_tokens": 4}
LORAX = {"inputs": "abc", "parameters": {"max_new_tokens": 4}}
DEEP = "[" * 5000 + "]" * 5000
BAD = [  # (path, body: dict or raw bytes, status, words in the message)
    # numbers that are not numbers, or overflow what the sampler takes
    ("/v1/completions", b'{"model": "base", "prompt": "abc", "temperature": NaN}', 400, "NaN is not valid JSON"),
    ("/v1/completions", b'{"model": "base", "prompt": "abc", "temperature": Infinity}', 400, "Infinity"),
    ("/v1/completions", b'{"model": "base", "prompt": "abc", "temperature": 1e999}', 400,
     "temperature must be a finite number"),
    ("/v1/completions", {**C, "temperature": 1e-30}, 400, "temperature must be 0 (greedy) or in [0.01"),
    ("/v1/completions", {**C, "temperature": 1e6}, 400, "temperature must be 0 (greedy) or in"),
    ("/v1/completions", b'{"model": "base", "prompt": "abc", "min_p": NaN}', 400, "NaN is not valid JSON"),
    ("/v1/completions", {**C, "min_p": 1.0}, 400, "min_p must be in [0, 0.999]"),
    ("/v1/completions", {**C, "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {**C, "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {**C, "top_p": "0.5"}, 400, "top_p must be a number"),
    ("/v1/completions", {**C, "top_k": -1}, 400, "top_k must be >= 0"),
    ("/v1/completions", {**C, "top_k": 1.5}, 400, "top_k must be an integer"),
    ("/v1/completions", {**C, "top_k": True}, 400, "top_k must be an integer"),
    ("/v1/completions", {**C, "top_k": 10 ** 30}, 400, "top_k must be a finite number within 64 bits"),
    # integers of thousands of digits, seeds outside 64 bits
    ("/v1/completions", b'{"model": "base", "prompt": "abc", "seed": 1' + b"0" * 5000 + b"}", 400,
     "malformed JSON body"),
    ("/v1/completions", {**C, "seed": 10 ** 4000}, 400, "seed must be a finite number within 64 bits, got an "
     "integer of 4001 digits"),
    ("/v1/completions", {**C, "seed": 1 << 64}, 400, "seed must be a finite number within 64 bits"),
    ("/v1/completions", {**C, "seed": -(1 << 63) - 1}, 400, "seed must be a finite number within 64 bits"),
    ("/v1/completions", {**C, "seed": "7"}, 400, "seed must be an integer"),
    ("/v1/completions", {**C, "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ("/v1/completions", {**C, "max_tokens": 1.5}, 400, "max_tokens must be an integer"),
    ("/v1/completions", {**C, "max_tokens": True}, 400, "max_tokens must be an integer"),
    ("/v1/completions", {**C, "max_tokens": 10 ** 30}, 400, "max_tokens must be a finite number within 64 bits"),
    ("/v1/completions", {**C, "max_tokens": 1 << 40}, 400, "exceeds the context of 2048 tokens"),
    ("/v1/completions", {**C, "n": 0}, 400, "n must be >= 1"),
    ("/v1/completions", {**C, "n": True}, 400, "n must be an integer"),
    ("/v1/completions", {**C, "n": 10 ** 20}, 400, "n must be a finite number within 64 bits"),
    ("/v1/completions", {**C, "logprobs": 21}, 400, "logprobs must be in [0, 20]"),
    ("/v1/completions", {**C, "logprobs": True}, 400, "logprobs must be an integer"),
    # nesting and encoding
    ("/v1/completions", f'{{"model": "base", "prompt": "abc", "x": {DEEP}}}'.encode(), 400, "malformed JSON body"),
    ("/v1/completions", {**C, "metadata": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}},
     400, "nested more than 32 levels deep"),
    ("/v1/completions", b'{"model": "base", "prompt": "a\\ud800b"}', 400, "prompt: the value holds a lone surrogate"),
    ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages[0].content: the value holds a lone surrogate"),
    ("/v1/completions", b'{"model": "base", "prompt": "abc", "stop": ["\\ud83d"]}', 400, "lone surrogate"),
    ("/v1/completions", b'{"model": "base", "prompt": "abc", "\\ud800": 1}', 400, "the key holds a lone surrogate"),
    ("/v1/completions", b'\xff\xfe{}', 400, "malformed JSON body"),
    # prompts
    ("/v1/completions", {**C, "prompt": [True, False]}, 400, "prompt must be a string"),
    ("/v1/completions", {**C, "prompt": [[]]}, 400, "prompt must be a string"),
    ("/v1/completions", {**C, "prompt": []}, 400, "prompt must be a string"),
    ("/v1/completions", {**C, "prompt": {"text": "abc"}}, 400, "prompt must be a string"),
    ("/v1/completions", {**C, "prompt": [300]}, 400, "prompt token ids must be in [0, 258)"),
    ("/v1/completions", {**C, "prompt": [-1]}, 400, "prompt token ids must be in [0, 258)"),
    ("/v1/completions", {**C, "prompt": [10 ** 30]}, 400, "prompt token ids must be in [0, 258)"),
    ("/v1/completions", {**C, "prompt": ["x"] * 65}, 400, "prompt has 65 prompts; at most 64 per request"),
    ("/v1/completions", {**C, "prompt": ""}, 400, "the prompt is empty"),
    ("/v1/completions", {**C, "model": 5}, 400, "model must be a string"),
    # stops and streams
    ("/v1/completions", {**C, "stop": [""]}, 400, "stop must be a non-empty string"),
    ("/v1/completions", {**C, "stop": [1]}, 400, "stop must be a non-empty string"),
    ("/v1/completions", {**C, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop has 5 strings; at most 4"),
    ("/v1/completions", {**C, "stop": "x" * 2000}, 400, "more than 1000 characters"),
    ("/v1/completions", {**C, "stream": "yes"}, 400, "stream must be true or false"),
    ("/v1/completions", {**C, "stream_options": "x"}, 400, "stream_options must be an object"),
    ("/v1/completions", {**C, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage must be"),
    ("/v1/completions", {**C, "ignore_eos": 1}, 400, "ignore_eos must be true or false"),
    # chat fields
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content must be a string"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only text parts are supported"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "name": 5}]}, 400,
     "messages[0].name must be a string"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": None, "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": "x"}, 400, "max_completion_tokens must be"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs must be in [0, 20]"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 3}, 400, "logprobs must be true or false"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature must be >= 0"),
    # LoRAX
    ("/generate", b'{"inputs": "abc", "parameters": {"temperature": NaN}}', 400, "NaN is not valid JSON"),
    ("/generate", {**LORAX, "parameters": {"temperature": 1e-9}}, 400, "parameters.temperature must be 0"),
    ("/generate", {**LORAX, "parameters": {"seed": 1 << 64}}, 400, "parameters.seed must be a finite number"),
    ("/generate", {**LORAX, "parameters": {"top_k": True}}, 400, "parameters.top_k must be an integer"),
    ("/generate", {**LORAX, "parameters": "x"}, 400, "parameters must be an object"),
    ("/generate", {**LORAX, "inputs": ""}, 400, "inputs must be a non-empty string"),
    # admin
    ("/v1/adapters/load", {"name": ["alpha"]}, 400, "name must be a string"),
    ("/v1/adapters/load", b'{"name": "\\ud800"}', 400, "lone surrogate"),
]


def test_bad_input_table_is_named_4xx_never_500(robust):
    before = _five_hundreds(robust)
    failures = []
    for path, body, status, words in BAD:
        r = _raw(robust, path, body) if isinstance(body, bytes) else robust.post(path, body)
        try:
            message = r.json()["error"]["message"]
        except Exception:                                   # noqa: BLE001 - recorded as a failure below
            message = r.text
        if r.status_code != status or words not in message:
            failures.append((path, str(body)[:80], r.status_code, message[:200]))
    assert not failures, "\n".join(map(str, failures))
    assert _five_hundreds(robust) == before
    ok = robust.post("/v1/completions", {**C, "seed": (1 << 63) - 1, "temperature": 0.01, "top_k": 3, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert robust.get("/health").json()["status"] == "ok"


def test_a_500_after_submit_releases_the_stream(robust, monkeypatch):
    """An unexpected error while the engine thread takes the request: a 500 naming it, and none of the
    request's bookkeeping left behind (its stream, its rows in the queue count)."""
    engine = robust.server.engine
    real = engine.add_request

    def broken(prompt, params, request_id=None, adapter=None):
        if params.max_tokens == 7:
            raise TypeError("an unexpected bug")
        return real(prompt, params, request_id=request_id, adapter=adapter)
    monkeypatch.setattr(engine, "add_request", broken)
    r = robust.post("/v1/completions", {**C, "max_tokens": 7})
    assert r.status_code == 500
    assert robust.server.worker.streams == {}
    assert robust.server.worker.pending() == 0
    assert robust.post("/v1/completions", C).status_code == 200


def test_503_carries_retry_after_and_rows_count_against_the_queue(robust, monkeypatch):
    worker = robust.server.worker
    monkeypatch.setattr(worker, "max_pending", 6)
    r = robust.post("/v1/completions", {**C, "prompt": ["a", "b"], "n": 4})    # 8 rows in one request
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "this request adds 8" in r.json()["error"]["message"]
    assert robust.post("/v1/completions", {**C, "prompt": ["a", "b"], "n": 3}).status_code == 200
    monkeypatch.setattr(worker, "pending", lambda: 6)
    r = robust.post("/v1/chat/completions", CHAT)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_non_finite_log_probs_are_a_named_error_not_a_500(robust):
    """An adapter whose (finite) weights overflow float32: its log-probs come out NaN; the answer is a 400
    naming the adapter, in both shapes, and the server goes on."""
    folder = robust.root / "adapters" / "huge"
    _peft_adapter(robust.base, folder, seed=4)
    from safetensors.torch import load_file, save_file
    w = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v * 1e25 for k, v in w.items()}, str(folder / "adapter_model.safetensors"))
    body = {"model": "huge", "prompt": "abc", "max_tokens": 3, "logprobs": 2}
    r = robust.post("/v1/completions", body)
    assert r.status_code == 400 and "non-finite log-prob" in r.json()["error"]["message"], r.text
    with httpx.stream("POST", robust.url + "/v1/completions", json={**body, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as s:
        events = [line for line in s.iter_lines() if line.startswith("data:")]
    assert "non-finite log-prob" in events[-2] and events[-1] == "data: [DONE]"
    assert robust.get("/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------------------------------------
# adapter folders

def _adapter_case(root, base, name, config=None, weights=None):
    folder = root / "adapters" / name
    shutil.rmtree(folder, ignore_errors=True)
    _peft_adapter(base, folder, seed=5)
    if config is not None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        text = config(cfg) if callable(config) else config
        (folder / "adapter_config.json").write_text(text if isinstance(text, str) else json.dumps(text))
    if weights is not None:
        from safetensors.torch import load_file, save_file
        w = weights(load_file(str(folder / "adapter_model.safetensors")))
        save_file(w, str(folder / "adapter_model.safetensors"))
    return folder


ADAPTERS = [  # (name, config edit, weights edit, words)
    ("list-config", lambda c: [c], None, "must be a JSON object, got list"),
    ("string-alpha", lambda c: {**c, "lora_alpha": "16"}, None, "lora_alpha must be a finite number, got '16'"),
    ("nan-alpha", lambda c: json.dumps(c).replace('"lora_alpha": 8', '"lora_alpha": NaN'), None, "not valid JSON"),
    ("dict-targets", lambda c: {**c, "target_modules": {"q_proj": 1}}, None, "target_modules must be a string"),
    ("int-targets", lambda c: {**c, "target_modules": 5}, None, "target_modules must be a string"),
    ("bool-r", lambda c: {**c, "r": True}, None, "r must be a positive integer"),
    ("string-rslora", lambda c: {**c, "use_rslora": "no"}, None, "use_rslora must be true or false"),
    ("rank-pattern", lambda c: {**c, "rank_pattern": {"q_proj": "2"}}, None, "rank_pattern['q_proj'] must be"),
    ("alpha-pattern", lambda c: {**c, "alpha_pattern": {"v_proj": [1]}}, None, "alpha_pattern['v_proj'] must be"),
    ("bad-regex", lambda c: {**c, "rank_pattern": {"(q_proj": 2}}, None, "is not a valid regex"),
    ("params-ints", lambda c: {**c, "target_parameters": [1, 2]}, None, "target_parameters must be a list"),
    ("not-utf8", "\udcff", None, "not valid JSON"),
    ("deep-config", "[" * 5000 + "]" * 5000, None, "not valid JSON"),
    ("one-d", None, lambda w: {k: v.flatten() for k, v in w.items()}, "LoRA weights are 2-D floats"),
    ("nan-weights", None, lambda w: {k: v * float("nan") for k, v in w.items()}, "NaN or infinite values"),
]


def test_bad_adapter_folders_are_a_400_naming_the_problem_and_the_engine_lives(robust):
    failures = []
    for name, config, weights, words in ADAPTERS:
        folder = _adapter_case(robust.root, robust.base, name, None if isinstance(config, str) else config, weights)
        if isinstance(config, str):
            (folder / "adapter_config.json").write_bytes(config.encode("utf-8", "surrogateescape"))
        r = robust.post("/v1/completions", {**C, "model": name})
        message = r.json()["error"]["message"] if r.headers.get("content-type", "").startswith("application/json") \
            else r.text
        if r.status_code != 400 or words not in message or f"adapter {name!r} is invalid" not in message:
            failures.append((name, r.status_code, message[:200]))
        if str(robust.root) in message:
            failures.append((name, "leaks the server's path", message[:200]))
    assert not failures, "\n".join(map(str, failures))
    assert robust.server.worker.alive and robust.post("/v1/completions", {**C, "model": "alpha"}).status_code == 200


def test_no_leaks_unknown_field_value_symlinks_paths(robust, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"password": "TOPSECRET-1"}))
    _adapter_case(robust.root, robust.base, "unknown", lambda c: {**c, "secret_field": "TOPSECRET-2"})
    r = robust.post("/v1/completions", {**C, "model": "unknown"})
    assert r.status_code == 400 and "unknown adapter field 'secret_field'" in r.json()["error"]["message"]
    assert "TOPSECRET" not in r.text
    for link in ("adapter_config.json", "adapter_model.safetensors"):
        folder = _adapter_case(robust.root, robust.base, f"link-{link[8:13]}")
        (folder / link).unlink()
        (folder / link).symlink_to(secret)
        r = robust.post("/v1/completions", {**C, "model": folder.name})
        assert r.status_code == 400 and "symbolic link" in r.json()["error"]["message"], r.text
        assert "TOPSECRET" not in r.text and str(tmp_path) not in r.text
    listing = robust.get("/v1/adapters").text
    assert robust.post("/v1/adapters/load", {"name": "alpha"}).status_code == 200
    listing = robust.get("/v1/adapters")
    assert any(a["loaded"] for a in listing.json()["data"])
    assert str(robust.root) not in listing.text and "path" not in listing.text
    r = robust.post("/v1/completions", {**C, "model": "nope"})
    assert r.status_code == 404 and str(robust.root) not in r.text


def test_api_key_empty_is_refused_unless_no_auth(robust, monkeypatch):
    from rftkit.serve.app import ServeConfig, Server
    model, tok = robust.server.engine.model, robust.server.tok
    with pytest.raises(ValueError, match="api_key is empty"):
        ServeConfig(api_key="")
    monkeypatch.delenv("RFTKIT_API_KEY", raising=False)
    assert Server(ServeConfig(api_key="", no_auth=True, kv_budget_mb=1, max_batch=2), model=model, tok=tok).api_key \
        is None
    monkeypatch.setenv("RFTKIT_API_KEY", "")
    with pytest.raises(ValueError, match="RFTKIT_API_KEY is set but empty"):
        Server(ServeConfig(kv_budget_mb=1, max_batch=2), model=model, tok=tok)
    monkeypatch.delenv("RFTKIT_API_KEY")
    with pytest.raises(ValueError, match="without an API key would serve anyone"):
        Server(ServeConfig(host="0.0.0.0", kv_budget_mb=1, max_batch=2), model=model, tok=tok)
    from rftkit.cli import main
    assert main(["serve", "--api-key", "", "--port", "1"]) != 0


# ----------------------------------------------------------------------------------------------------------
# versions by content

def test_same_size_replacement_with_the_old_mtime_is_served(robust):
    """`cp -p` / `rsync -a` / `tar`: new bytes, same size, the old mtime restored; the next request is served
    by the new weights. A rewrite with the same content keeps the version (no re-registration)."""
    adapters = robust.root / "adapters"
    _peft_adapter(robust.base, adapters / "delta", seed=11)
    _peft_adapter(robust.base, robust.root / "other", seed=12)
    st = os.stat(adapters / "delta" / "adapter_model.safetensors")
    assert st.st_size == os.stat(robust.root / "other" / "adapter_model.safetensors").st_size
    time.sleep(2.1)                        # past the racy window: the signature alone is trusted from now on
    ask = lambda: robust.client().chat.completions.create(model="delta", messages=MSG, max_tokens=10,  # noqa
                                                          temperature=0).choices[0].message.content
    assert ask() == _hf_greedy(robust.base, MSG, 10, adapter=adapters / "delta")
    key = robust.server.worker.registered["delta"][0]
    shutil.copyfile(robust.root / "other" / "adapter_model.safetensors", adapters / "delta" / "adapter_model.safetensors")
    os.utime(adapters / "delta" / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(adapters / "delta" / "adapter_model.safetensors").st_mtime_ns == st.st_mtime_ns
    assert ask() == _hf_greedy(robust.base, MSG, 10, adapter=robust.root / "other")
    key2 = robust.server.worker.registered["delta"][0]
    assert key2 != key
    data = (adapters / "delta" / "adapter_config.json").read_bytes()
    (adapters / "delta" / "adapter_config.json").write_bytes(data)           # same bytes rewritten
    assert ask() == _hf_greedy(robust.base, MSG, 10, adapter=robust.root / "other")
    assert robust.server.worker.registered["delta"][0] == key2


# ----------------------------------------------------------------------------------------------------------
# the event loop stays free; connections

SENDERS = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
import httpx
url, key, bodies = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())
def send(b):
    path = "/v1/chat/completions" if "messages" in b else "/v1/completions"
    return httpx.post(url + path, json=b, headers={"Authorization": "Bearer " + key}, timeout=300).status_code
with ThreadPoolExecutor(len(bodies)) as pool:
    print(json.dumps(list(pool.map(send, bodies))))
"""


PROBE = """
import http.client, json, sys, threading, time
port, stop = int(sys.argv[1]), threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
times, t0, i = [], time.perf_counter(), 0
while not stop.is_set():
    due = t0 + 0.02 * i
    time.sleep(max(0.0, due - time.perf_counter()))
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/health")
    c.getresponse().read()
    c.close()
    times.append(time.perf_counter() - due)
    i += 1
print(json.dumps(times))
"""


def test_health_stays_fast_while_big_prompts_tokenize_and_big_answers_build(robust):
    """/health probed on a fixed schedule (every 20 ms; a probe's latency counts from when it was due, so a
    stall of the event loop delays every probe due meanwhile: no coordinated omission) while 1 MB chat bodies
    arrive (parsed, checked, refused) and answers of 4 x 1,500 tokens with 20 alternatives each are built.
    The load and the probe come from other processes, as clients do (in this one they would compete with the
    server for the GIL, and the probe would measure that contention rather than the server)."""
    big = {"model": "base", "messages": [{"role": "user", "content": "ab " * 300_000}], "max_tokens": 1}
    logprobs = {**C, "max_tokens": 1500, "logprobs": 20, "n": 4, "ignore_eos": True, "temperature": 1.0}
    probe = subprocess.Popen([sys.executable, "-c", PROBE, str(robust.port)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)                                          # the probe is up before the load starts
    senders = subprocess.Popen([sys.executable, "-c", SENDERS, robust.url, KEY], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    codes = json.loads(senders.communicate(json.dumps([big, logprobs, big, logprobs, big]), timeout=300)[0])
    times = json.loads(probe.communicate("", timeout=60)[0])
    assert codes == [400, 200, 400, 200, 400]               # the big prompts cannot fit
    assert len(times) >= 50, len(times)
    p99 = sorted(times)[int(0.99 * (len(times) - 1))]
    assert p99 < 0.1, (p99, len(times), sorted(times)[-10:])


def test_header_timeout_and_connection_cap(robust):
    from rftkit.serve.app import ServeConfig, Server, build_app
    server = Server(ServeConfig(max_connections=3, header_timeout=1.0, kv_budget_mb=1, max_batch=2, device="cpu"),
                    model=robust.server.engine.model, tok=robust.server.tok)
    running = Running(build_app(server), server)
    try:
        slow = socket.create_connection(("127.0.0.1", running.port), timeout=5)
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")          # headers never finished
        idle = [socket.create_connection(("127.0.0.1", running.port), timeout=5) for _ in range(2)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", running.port), timeout=5)
        answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer, answer
        t = time.perf_counter()
        assert slow.recv(4096) == b"" and time.perf_counter() - t < 3          # closed by the header timeout
        for s in idle + [slow, extra]:
            s.close()
        time.sleep(0.2)
        assert httpx.get(running.url + "/health", timeout=5).status_code == 200
    finally:
        running.stop()


def test_a_client_that_went_away_is_not_a_500(robust):
    before = _five_hundreds(robust)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(robust.url + "/v1/completions", json={**C, "max_tokens": 1900, "ignore_eos": True}, timeout=0.5,
                   headers={"Authorization": f"Bearer {KEY}"})
    t = time.perf_counter()
    while robust.metric("running_sequences") > 0 and time.perf_counter() - t < 10:
        time.sleep(0.05)
    time.sleep(0.3)
    assert robust.metric("running_sequences") == 0
    assert _five_hundreds(robust) == before
    assert 'status="499"' in robust.get("/metrics").text


# ----------------------------------------------------------------------------------------------------------
# the engine thread's death ends the process

DYING = """
import sys
import rftkit.engine as engine
real = engine.Engine.step
def step(self):
    if any(len(g[0].prompt) == 7 for g in self.waiting):
        raise RuntimeError("simulated engine bug")
    return real(self)
engine.Engine.step = step
from rftkit.cli import main
sys.exit(main(["serve", "--model", sys.argv[1], "--port", sys.argv[2], "--device", "cpu", "--kv-budget-mb", "8",
               "--max-batch", "4", "--adapters", sys.argv[3]]))
"""


def test_engine_thread_death_exits_non_zero_and_fails_waiting_calls(robust):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.pop("RFTKIT_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-c", DYING, str(robust.base), str(port), str(robust.root / "adapters")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.perf_counter()
        while time.perf_counter() - t < 60:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.post(url + "/v1/completions", json=C, timeout=30).status_code == 200

        def waiting():
            return httpx.post(url + "/v1/completions", json={**C, "max_tokens": 1900, "ignore_eos": True},
                              timeout=30).status_code
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(waiting)
            time.sleep(0.3)
            t = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json={**C, "prompt": [5] * 7}, timeout=30)   # kills it
            assert r.status_code >= 500 and time.perf_counter() - t < 10
            assert slow.result() >= 500
        assert proc.wait(timeout=30) == 1
        assert "the engine thread died" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_large_body_is_parsed_off_the_loop_and_answered(robust):
    r = robust.post("/v1/completions", {**C, "ignore_eos": True, "metadata": {"pad": "x" * 1_500_000}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# ----------------------------------------------------------------------------------------------------------
# the engine thread, without HTTP

@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the thread is meant to die
def test_rows_count_against_max_pending_and_a_dead_engine_fails_calls_at_once():
    import asyncio

    from rftkit.engine import Engine
    from rftkit.sampling import SamplingParams
    from rftkit.serve.worker import EngineWorker
    from tests.conftest import tiny_model
    engine = Engine(tiny_model(), max_seq_len=64, max_batch=4)
    worker = EngineWorker(engine, None, max_pending=10)
    died = []
    worker.on_death = died.append
    row = ([1, 2, 3], SamplingParams(max_tokens=50, n=4))

    async def main():
        worker.start(asyncio.get_running_loop())
        with pytest.raises(OverflowError, match="this request adds 12"):
            worker.submit([row] * 3, None)                           # 3 prompts x n=4 = 12 rows > 10
        first = worker.submit([row] * 2, None)
        with pytest.raises(OverflowError):
            worker.submit([row] * 2, None)                           # 8 + 8 > 10, however far the engine got
        real = engine.step

        def broken():
            raise RuntimeError("simulated engine bug")
        engine.step = broken
        await asyncio.sleep(0.5)
        assert not worker.alive and died
        t = time.perf_counter()
        with pytest.raises(RuntimeError, match="the engine thread"):
            await worker.call(len, [])
        items = [first.queue.get_nowait() for _ in range(first.queue.qsize())]
        assert any(isinstance(v, RuntimeError) for _, v in items)
        with pytest.raises(RuntimeError, match="not running"):
            worker.submit([row], None)
        assert time.perf_counter() - t < 1
        engine.step = real
        worker.stop()
    asyncio.run(main())
