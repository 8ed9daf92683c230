"""`rft serve` over real HTTP on loopback, driven by the official `openai` client: greedy answers equal
transformers (base) and PEFT + transformers (adapters), streams join to the non-streamed text, bad input is a
4xx naming the problem, a client killed mid-stream frees its batch row."""
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import tok_dir  # the fixture's body builds the module-scoped server's tokenizer

from tests.serve_helpers import KEY, MSG, Running, _base_folder, _hf_greedy, _peft_adapter


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from rftkit.serve.app import ServeConfig, Server, build_app
    root = tmp_path_factory.mktemp("serve")
    (root / "tok").mkdir()
    base = _base_folder(root, tok_dir.__wrapped__(root / "tok"))    # the fixture's body, module-scoped here
    (root / "adapters").mkdir()
    _peft_adapter(base, root / "adapters" / "alpha", seed=1)
    _peft_adapter(base, root / "adapters" / "beta", seed=2, r=2, targets=("q_proj", "v_proj", "down_proj"))
    cfg = ServeConfig(model=str(base), adapters=str(root / "adapters"), api_key=KEY, max_seq_len=2048,
                      max_n=4, max_body_bytes=64 << 10, max_loaded_adapters=2, device="cpu")
    server = Server(cfg)
    running = Running(build_app(server), server)
    running.base, running.root = base, root
    yield running
    running.stop()


# ----------------------------------------------------------------------------------------------------------

def test_completions_and_chat_equal_transformers_greedy(served):
    client = served.client()
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "alpha", "beta"]
    chat = client.chat.completions.create(model="base", messages=MSG, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == _hf_greedy(served.base, MSG, 12)
    assert chat.usage.completion_tokens == chat.usage.total_tokens - chat.usage.prompt_tokens > 0
    comp = client.completions.create(model="base", prompt="abc", max_tokens=10, temperature=0)
    assert comp.choices[0].text == _hf_greedy(served.base, None, 10, raw="abc")
    assert comp.usage.prompt_tokens == 3


def test_streams_join_to_the_non_streamed_text(served):
    client = served.client()
    for kind in ("chat", "completion"):
        common = dict(model="base", max_tokens=20, temperature=0, n=2, stop=["zz"])
        if kind == "chat":
            full = client.chat.completions.create(messages=MSG, logprobs=True, top_logprobs=2, **common)
            chunks = list(client.chat.completions.create(messages=MSG, stream=True,
                                                         stream_options={"include_usage": True}, **common))
            parts = {0: [], 1: []}
            for c in chunks[:-1]:
                for ch in c.choices:
                    parts[ch.index].append(ch.delta.content or "")
            texts = [c.message.content for c in full.choices]
            lp = full.choices[0].logprobs.content
            assert len(lp) == full.usage.completion_tokens // 2 and all(len(e.top_logprobs) == 2 for e in lp)
            assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in lp)   # greedy = top-1
        else:
            full = client.completions.create(prompt="abc", logprobs=1, **common)
            chunks = list(client.completions.create(prompt="abc", stream=True,
                                                    stream_options={"include_usage": True}, **common))
            parts = {0: [], 1: []}
            for c in chunks[:-1]:
                for ch in c.choices:
                    parts[ch.index].append(ch.text)
            texts = [c.text for c in full.choices]
            lp = full.choices[0].logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == full.usage.completion_tokens // 2
            assert all(t == pytest.approx(max(top.values())) for t, top in zip(lp.token_logprobs, lp.top_logprobs))
        assert texts[0] == texts[1] and texts[0]                         # greedy: both samples agree
        assert ["".join(parts[i]) for i in (0, 1)] == texts
        assert len(parts[0]) > 3                                          # really streamed
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_stop_strings_cut_the_text(served):
    client = served.client()
    full = client.completions.create(model="base", prompt="abc", max_tokens=20, temperature=0).choices[0]
    stop = full.text[5:7]
    assert stop and full.text.find(stop) == 5
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model="base", prompt="abc", max_tokens=20, temperature=0, stop=[stop], stream=True) if c.choices)
        else:
            r = client.completions.create(model="base", prompt="abc", max_tokens=20, temperature=0, stop=stop)
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop"
        assert text == full.text[:5]


def test_seeded_sampling_is_reproducible(served):
    client = served.client()
    a, b, c = (client.completions.create(model="base", prompt="abc", max_tokens=12, temperature=1.0, seed=s).choices[0]
               .text for s in (7, 7, 8))
    assert a == b != c


def test_lorax_generate_and_stream(served):
    body = {"inputs": "abc", "parameters": {"max_new_tokens": 10, "details": True}}
    r = served.post("/generate", body)
    assert r.status_code == 200, r.text
    expected = served.client().completions.create(model="base", prompt="abc", max_tokens=10, temperature=0)
    assert r.json()["generated_text"] == expected.choices[0].text
    assert r.json()["details"]["generated_tokens"] == expected.usage.completion_tokens
    with httpx.stream("POST", served.url + "/generate_stream", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"] == expected.choices[0].text
    assert served.post("/generate", {"inputs": "abc", "parameters": {"adapter_id": "nope"}}).status_code == 404


def test_bad_input_is_a_4xx_naming_the_problem_then_service_goes_on(served):
    import openai
    chat = {"model": "base", "messages": MSG, "max_tokens": 4}
    cases = [  # (body or raw bytes, key, status, words the message must contain)
        (b'{"model": "base", "messages": [', KEY, 400, "malformed JSON"),
        (b'[1, 2]', KEY, 400, "must be a JSON object"),
        ({**chat, "max_tokens": "ten"}, KEY, 400, "max_tokens must be an integer"),
        ({**chat, "messages": "hi"}, KEY, 400, "messages must be a non-empty list"),
        ({**chat, "messages": [{"role": "wizard", "content": "x"}]}, KEY, 400, "messages[0].role"),
        ({**chat, "temperature": "hot"}, KEY, 400, "temperature must be a number"),
        ({**chat, "max_tokens": 5000}, KEY, 400, "exceeds the context of 2048 tokens"),
        ({**chat, "temperature": -0.5}, KEY, 400, "temperature must be >= 0"),
        ({**chat, "n": 5}, KEY, 400, "n=5 exceeds the limit of 4"),
        ({**chat, "model": "nope"}, KEY, 404, "model 'nope' not found"),
        ({**chat, "model": "../alpha"}, KEY, 400, "invalid adapter name '../alpha'"),
        ({**chat, "model": "/etc/passwd"}, KEY, 400, "invalid adapter name '/etc/passwd'"),
        ({**chat, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}, KEY, 413, "exceeds the limit"),
        (chat, "wrong", 401, "invalid API key"),
        (chat, None, 401, "missing API key"),
        ({**chat, "tools": [{"type": "function", "function": {"name": "f g"}}]}, KEY, 400, "tools[0].function.name"),
        ({**chat, "response_format": {"type": "json_object"}, "logit_bias": {"5": 3}}, KEY, 400,
         "unsupported field: logit_bias"),
        ({**chat, "frequency_penalty": 0.5}, KEY, 400, "unsupported field: frequency_penalty"),
    ]
    comp = {"model": "base", "prompt": "abc", "max_tokens": 4}
    lorax = {"inputs": "abc", "parameters": {"max_new_tokens": 4}}
    other = [  # (path, body, status, words): the other endpoints' own fields
        ("/v1/completions", {**comp, "echo": True}, 400, "unsupported field: echo"),
        ("/v1/completions", {**comp, "suffix": "xyz"}, 400, "unsupported field: suffix"),
        ("/v1/completions", {**comp, "prompt": 7}, 400, "prompt must be a string"),
        ("/v1/completions", {**comp, "max_tokens": 2048}, 400, "exceeds the context of 2048 tokens"),
        ("/v1/completions", {**comp, "model": "base:../beta"}, 400, "invalid adapter name '../beta'"),
        ("/generate", {"inputs": "abc", "parameters": {"watermark": True}}, 400, "unsupported field: watermark"),
        ("/generate", {"inputs": "abc", "parameters": {"decoder_input_details": True}}, 400,
         "unsupported field: decoder_input_details"),
        ("/generate", {"inputs": "abc", "parameters": {"adapter_id": "/abs/path"}}, 400, "invalid adapter name"),
        ("/generate", {"inputs": "abc", "parameters": {"adapter_source": "s3"}}, 400,
         "unsupported field: adapter_source"),
        ("/generate", {**lorax, "parameters": {"max_new_tokens": -1}}, 400, "parameters.max_new_tokens must be"),
    ]
    for path, body, key, status, words in [("/v1/chat/completions", b, k, st, w) for b, k, st, w in cases] + \
            [(path, b, KEY, st, w) for path, b, st, w in other]:
        if isinstance(body, bytes):
            r = httpx.post(served.url + path, content=body, timeout=30,
                           headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        else:
            r = served.post(path, body, key=key)
        assert r.status_code == status, (path, body if not isinstance(body, dict) else list(body), r.text)
        assert words in r.json()["error"]["message"], r.text
    with pytest.raises(openai.NotFoundError, match="model 'nope' not found"):      # as the client shows it
        served.client().chat.completions.create(model="nope", messages=MSG)
    ok = {**chat, "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"}}  # neutral
    r = served.post("/v1/chat/completions", ok)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    neutral = {**comp, "echo": False, "suffix": None}
    assert served.post("/v1/completions", neutral).json()["usage"]["completion_tokens"] > 0
    assert served.post("/generate", {**lorax, "parameters": {"watermark": False}}).status_code == 200
    assert served.get("/health").json()["status"] == "ok"


KILLED_CLIENT = """
import os, signal, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
for chunk in client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=1900, stream=True, extra_body={"ignore_eos": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        print("streaming", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_client_killed_mid_stream_frees_its_row(served):
    aborted = served.metric("aborted_requests_total")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, served.url + "/v1", KEY], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "streaming\n"
    assert proc.wait(timeout=30) == -9
    t = time.perf_counter()
    while served.metric("running_sequences") > 0 and time.perf_counter() - t < 10:
        time.sleep(0.05)
    assert served.metric("running_sequences") == 0
    assert served.metric("aborted_requests_total") == aborted + 1
    assert served.metric("decode_tokens_total") > 0


def test_health_answers_fast_under_full_load(served):
    import http.client

    def health():       # a fresh connection per probe (a keep-alive client adds its own delayed-ACK waits)
        t = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
        c.request("GET", "/health")
        body = json.loads(c.getresponse().read())
        c.close()
        return time.perf_counter() - t, body

    def long_request(i):
        return served.client().completions.create(model="base", prompt=f"p{i}", max_tokens=300, temperature=1,
                                                  extra_body={"ignore_eos": True}).usage.completion_tokens
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(long_request, i) for i in range(24)]
        while served.metric("running_sequences") < 16:
            time.sleep(0.05)
        times = []                       # probe times while sequences were running (the tiny model is fast:
        while len(times) < 20 and not all(f.done() for f in futures):    # the load can end before 20 probes)
            dt, body = health()
            assert body["status"] == "ok"
            if body["running"] > 0:
                times.append(dt)
            time.sleep(0.02)
        assert [f.result() for f in futures] == [300] * 24
    assert len(times) >= 5, f"only {len(times)} probes while the engine was busy"
    assert max(times) < 0.1, sorted(times)


def test_metrics_are_prometheus_text(served):
    text = served.get("/metrics").text
    import re
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or re.fullmatch(
            r'rftkit_\w+(\{[\w]+="[^"]*"(,[\w]+="[^"]*")*\})? [0-9.e+-]+', line), line
    for name in ("requests_total", "prompt_tokens_total", "generation_tokens_total", "queue_depth",
                 "time_to_first_token_seconds_count", "adapter_loads_total", "adapter_evictions_total"):
        assert f"rftkit_{name}" in text, name
    assert 'rftkit_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_adapters_equal_peft_greedy_alone_and_concurrently(served):
    client = served.client()
    ask = lambda model: client.chat.completions.create(model=model, messages=MSG, max_tokens=12,  # noqa: E731
                                                       temperature=0).choices[0].message.content
    expected = {name: _hf_greedy(served.base, MSG, 12, adapter=served.root / "adapters" / name)
                for name in ("alpha", "beta")}
    expected["base"] = _hf_greedy(served.base, MSG, 12)
    assert len(set(expected.values())) == 3                        # the adapters change the answer
    assert ask("alpha") == ask("base:alpha") == expected["alpha"]
    order = ["alpha", "beta", "base"] * 4
    with ThreadPoolExecutor(len(order)) as pool:                    # mixed in one batch
        assert list(pool.map(ask, order)) == [expected[m] for m in order]


def test_adapter_directory_is_live_and_refusals_name_the_adapter(served):
    import shutil
    adapters = served.root / "adapters"
    client = served.client()
    chat = lambda model: client.chat.completions.create(model=model, messages=MSG, max_tokens=12,  # noqa: E731
                                                        temperature=0).choices[0].message.content
    loads, timed = served.metric("adapter_loads_total"), served.metric("adapter_slot_load_seconds_count")
    shutil.copytree(adapters / "alpha", adapters / "gamma")        # dropped in while serving
    assert "gamma" in [m.id for m in client.models.list().data]
    assert chat("gamma") == chat("alpha")
    time.sleep(0.01)
    for f in ("adapter_model.safetensors", "adapter_config.json"):  # replaced: served as the new files
        shutil.copy(adapters / "beta" / f, adapters / "gamma" / f)
    assert chat("gamma") == chat("beta")
    # one request at a time: every slot load happens as its request arrives, and each is timed
    assert served.metric("adapter_slot_load_seconds_count") - timed == served.metric("adapter_loads_total") - loads >= 2

    (adapters / "half").mkdir()                                     # weights written, config not yet
    shutil.copy(adapters / "alpha" / "adapter_model.safetensors", adapters / "half")
    r = served.post("/v1/chat/completions", {"model": "half", "messages": MSG})
    assert r.status_code == 400 and "adapter 'half' is incomplete" in r.json()["error"]["message"]
    (adapters / "half" / "adapter_config.json").write_text('{"r": 4, "lora_alpha"')
    r = served.post("/v1/chat/completions", {"model": "half", "messages": MSG})
    assert r.status_code == 400 and "adapter 'half' is invalid" in r.json()["error"]["message"]
    assert "not valid JSON" in r.json()["error"]["message"]
    shutil.copy(adapters / "alpha" / "adapter_config.json", adapters / "half")  # now complete
    assert chat("half") == chat("alpha")

    listing = {a["name"]: a for a in served.get("/v1/adapters").json()["data"]}
    assert listing["alpha"]["loaded"] and listing["half"]["loaded"] and listing["half"]["rank"] == 4
    assert sum(a.get("slot") is not None for a in listing.values()) <= 2   # max_loaded_adapters=2 device slots
    assert served.metric("adapter_evictions_total") > 0 and served.metric("adapter_loads_total") >= 3
    r = served.post("/v1/adapters/load", {"name": "beta"})
    assert r.status_code == 200 and r.json()["slot"] is not None
    assert served.post("/v1/adapters/unload", {"name": "beta"}).json()["unloaded"]
    assert not {a["name"]: a for a in served.get("/v1/adapters").json()["data"]}["beta"]["loaded"]
    assert chat("beta") == _hf_greedy(served.base, MSG, 12, adapter=adapters / "beta")   # loads again on use
    for body, status, words in [({"name": "nope"}, 404, "adapter 'nope' not found"),
                                ({"name": "../alpha"}, 400, "invalid adapter name"),
                                ({"name": 3}, 400, "name must be a string")]:
        r = served.post("/v1/adapters/load", body)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    r = served.post("/v1/adapters/unload", {"name": "never-loaded"})
    assert r.status_code == 404 and "not loaded" in r.json()["error"]["message"]


def test_api_key_from_the_environment(served, monkeypatch):
    from rftkit.serve.app import ServeConfig, Server
    model, tok = served.server.engine.model, served.server.tok
    monkeypatch.setenv("RFTKIT_API_KEY", "from-env")
    assert Server(ServeConfig(kv_budget_mb=1, max_batch=2), model=model, tok=tok).api_key == "from-env"
    assert Server(ServeConfig(api_key="flag", kv_budget_mb=1, max_batch=2), model=model, tok=tok).api_key == "flag"
    monkeypatch.delenv("RFTKIT_API_KEY")
    assert Server(ServeConfig(kv_budget_mb=1, max_batch=2), model=model, tok=tok).api_key is None
    with pytest.raises(ValueError, match="max_loaded_adapters must be positive, got 0"):
        ServeConfig(max_loaded_adapters=0)


def test_slot_loads_on_arrival_never_evict_what_the_queue_needs(served, tmp_path):
    """Two slots; alpha and beta arrive and are copied into slots at once (timed); gamma arrives with two
    requests queued, so loading it now could evict one they need: it waits for admission instead."""
    import shutil

    from rftkit.engine import Engine
    from rftkit.loading import load
    from rftkit.sampling import SamplingParams
    from rftkit.serve.worker import EngineWorker, Metrics, Stream
    for name in ("alpha", "beta"):
        shutil.copytree(served.root / "adapters" / name, tmp_path / name)
    shutil.copytree(served.root / "adapters" / "alpha", tmp_path / "gamma")
    model, _ = load(str(served.base))
    engine = Engine(model, max_seq_len=64, max_batch=4, adapter_slots=2)
    worker = EngineWorker(engine, tmp_path, metrics=Metrics())
    replies: list = []
    for i, name in enumerate(("alpha", "beta", "gamma")):
        worker._handle(("add", Stream([i], [([5, 6, 7], SamplingParams(max_tokens=3))], name)), replies)
    assert [r for _, r in replies] == ["accepted"] * 3
    assert sorted(engine.adapters.slot_of) == ["alpha", "beta"]         # gamma not loaded over a queued one
    assert worker.metrics.hists["adapter_slot_load_seconds"][-1] == 2
    done = [o.request_id for _ in range(20) if engine.has_unfinished() for o in engine.step() if o.finished]
    assert sorted(done) == [0, 1, 2]
    assert engine.adapters.stats["loads"] == 3 and "gamma" in engine.adapters.slot_of
