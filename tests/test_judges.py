"""Judges through OpenAI-compatible endpoints on loopback: `rft serve` itself as a score_model judge (a
concurrency limit of 4, a forced 429 retried, a second run served from the cache, counted at the server), and a
FastAPI stub for what a tiny model cannot show: 5xx retries of an HTTP reward, a group judge's one call per
group, rate limits, failures that follow --on-reward-error and name the sample."""
import asyncio
import json
import socket
import time

import pytest
import torch

import rftkit.graders  # noqa: F401  registers the judge specs
from rftkit.graders import load_grader
from rftkit.graders.judge_client import JudgeClient, JudgeOptions
from rftkit.graders.judges import ApiJudge, GroupJudge, HttpReward
from rftkit.rewards import RewardError, load_reward, reward_metrics, score_batch
from tests.conftest import tiny_model
from tests.serve_helpers import Uvicorn


class Gate:
    """An ASGI wrapper: counts the requests to `path`, the most in flight at once, and answers the first `fail`
    of them with `status` (a 429 or a 5xx) before the app sees them."""

    def __init__(self, app, fail: int = 1, status: int = 429, path: str = "/v1/chat/completions"):
        self.app, self.fail, self.status, self.path = app, fail, status, path
        self.seen, self.in_flight, self.max_in_flight = 0, 0, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        self.seen += 1
        if self.seen <= self.fail:
            body = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode()
            await send({"type": "http.response.start", "status": self.status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def digit_judge(tok):
    """A tiny model whose greedy reply is always a digit: the final norm keeps one dimension h0, and lm_head
    scores '7' by +h0 and '3' by -h0, every other token 0, so whatever h0's sign one digit wins."""
    model = tiny_model(vocab_size=258, tie_embeddings=False, max_seq_len=512)
    seven, three = tok.encode("7")[0], tok.encode("3")[0]
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[seven, 0] = 10.0
        model.lm_head.weight[three, 0] = -10.0
    return model


@pytest.fixture
def served_judge(tok_dir):
    from rftkit.serve.app import ServeConfig, Server, build_app
    from rftkit.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tok_dir)
    server = Server(ServeConfig(max_seq_len=1024, device="cpu", served_model_name="judge"), digit_judge(tok), tok)
    gate = Gate(build_app(server), fail=1, status=429)
    running = Uvicorn(gate)
    yield running, gate
    running.stop()


SCORE_MODEL = {  # the shape of OpenAI's score_model example, pointed at our own server
    "type": "score_model", "name": "judge", "model": "judge", "range": [0, 10],
    "input": [{"role": "system", "content": "Score the answer from 0 to 10. Reply with the number only."},
              {"role": "user", "content": "Reference: {{ item.reference_answer }}\nModel answer: {{ sample.output_text }}"}],
    "sampling_params": {"temperature": 0, "max_completions_tokens": 1, "seed": 0}}


def test_judge_through_rft_serve_with_a_concurrency_limit_a_429_and_the_cache(served_judge, tmp_path):
    running, gate = served_judge
    opts = JudgeOptions(base_url=running.url + "/v1", api_key="x", concurrency=4, retry_wait_s=0.05,
                        cache_dir=str(tmp_path / "cache"))
    completions = [f"answer {i}" for i in range(12)]
    samples = [{"messages": [{"role": "user", "content": f"q{i}"}], "reference_answer": str(i)} for i in range(12)]
    first = load_grader(SCORE_MODEL, opts)
    scores = score_batch({"judge": first}, completions, samples)["judge"]      # on_error="raise": all must parse
    assert set(scores) <= {3.0, 7.0} and len(scores) == 12
    assert gate.seen == 13                            # 12 requests + the one answered 429, retried
    assert 1 <= gate.max_in_flight <= 4
    m = first.metrics()
    assert m["judge_requests"] == 13 and m["judge_retries"] == 1 and m["judge_cache_hits"] == 0
    assert m["judge_prompt_tokens"] > 0 and m["judge_completion_tokens"] == 12
    assert reward_metrics({"judge": first})["judge/judge_requests"] == 13

    second = load_grader(SCORE_MODEL, opts)          # a new run: same judge, template, prompts, completions
    assert score_batch({"judge": second}, completions, samples)["judge"] == scores
    assert gate.seen == 13                            # the server saw nothing more
    assert second.metrics()["judge_cache_hits"] == 12 and second.metrics()["judge_requests"] == 0

    changed = json.loads(json.dumps(SCORE_MODEL))     # another template: another cache entry
    changed["input"][0]["content"] = "Grade it, 0-10."
    load_grader(changed, opts).batch(completions[:2], samples[:2])
    assert gate.seen == 15


def stub_app(reply):
    """An OpenAI-style chat endpoint answering reply(messages), an HTTP reward at /score, and its counters."""
    from fastapi import FastAPI, Request
    app = FastAPI()
    app.state.bodies = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        await asyncio.sleep(0.05)
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": k, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply(body["messages"])}}
                            for k in range(body.get("n") or 1)],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):     # letter counts: an embedding whose cosine is easy to compute
        body = await request.json()
        text = body["input"]
        return {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1},
                "data": [{"object": "embedding", "index": 0,
                          "embedding": [float(text.count(c)) for c in "abcdefghijklmnopqrstuvwxyz"]}]}

    @app.post("/score")
    async def score(request: Request):
        body = await request.json()
        if body["completion"] == "bad":
            from fastapi.responses import JSONResponse
            return JSONResponse({"detail": "no"}, status_code=400)
        return {"score": len(body["completion"]) / 10, "echo": body["sample"]["id"]}
    return app


@pytest.fixture
def stub():
    def reply(messages):
        text = messages[-1]["content"]
        if "Answer 1:" in text:                      # a group: score answers by length, in order
            answers = text.split("Answer ")[1:]
            return json.dumps({"scores": [min(10, len(a.split(":\n", 1)[1].split("\n\n")[0])) for a in answers]})
        if "unreadable" in text:
            return "I cannot decide."
        return "Score: 8"
    app = stub_app(reply)
    gate = Gate(app, fail=2, status=503, path="/score")
    running = Uvicorn(gate)
    running.app, running.gate = app, gate
    yield running
    running.stop()


def test_http_reward_contract_retries_5xx_and_names_the_failing_sample(stub, tmp_path):
    reward = HttpReward(stub.url + "/score", JudgeOptions(retry_wait_s=0.05, concurrency=2, cache_dir=""))
    samples = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    assert score_batch({"remote": reward}, ["a", "abcd", "abcdefghij"], samples)["remote"] == [0.1, 0.4, 1.0]
    assert stub.gate.seen == 5 and reward.metrics()["judge_retries"] == 2      # two 503s, retried
    with pytest.raises(RewardError, match=r"reward 'remote' raised RuntimeError: request to http://127\.0\.0\.1:\d+/score "
                                          r"failed: HTTPStatusError.*400.*sample \{'id': 1"):
        score_batch({"remote": reward}, ["a", "bad"], samples[:2])
    errors = {}
    got = score_batch({"remote": reward}, ["a", "bad"], samples[:2], on_error="count", errors=errors)["remote"]
    assert got == [0.1, 0.0] and errors["remote"]["count"] == 1 and "400" in errors["remote"]["first"]
    assert "sample {'id': 1" in errors["remote"]["first"]          # counted failures name the sample too
    assert isinstance(load_reward(stub.url + "/score"), HttpReward)


def test_group_judge_scores_a_group_in_one_call(stub):
    judge = GroupJudge("m", judge=JudgeOptions(base_url=stub.url + "/v1", cache_dir=""))
    a, b = {"messages": [{"role": "user", "content": "task A"}]}, {"messages": [{"role": "user", "content": "task B"}]}
    comps = ["x", "xxxx", "xx", "yyyyy", "y"]
    scores = judge.batch(comps, [a, a, a, b, b])       # rollouts lay out a group's G completions together
    assert scores == [0.1, 0.4, 0.2, 0.5, 0.1]
    assert len(stub.app.state.bodies) == 2              # one request per group
    texts = {("task A" in b["messages"][0]["content"]): b["messages"][0]["content"]   # any order: concurrent
             for b in stub.app.state.bodies}
    assert "Answer 3:\nxx" in texts[True] and "task B" not in texts[True]
    assert "task B" in texts[False] and "Answer 2:\ny" in texts[False] and "Answer 3" not in texts[False]


def test_api_judge_parses_like_the_engine_judge_and_names_the_sample(stub, monkeypatch):
    monkeypatch.setenv("RFTKIT_JUDGE_BASE_URL", stub.url + "/v1")
    monkeypatch.setenv("RFTKIT_JUDGE_CACHE", "")
    judge = load_reward("judge-api:judge-model")
    assert isinstance(judge, ApiJudge)
    samples = [{"id": "ok", "prompt": "2+2?"}, {"id": "hard", "prompt": "unreadable"}]
    with pytest.raises(RewardError, match=r"no score matching.*I cannot decide.*sample \{'id': 'hard'"):
        score_batch({"judge": judge}, ["4", "5"], samples)
    errors = {}
    assert score_batch({"judge": judge}, ["4", "5"], samples, on_error="count", errors=errors)["judge"] == [0.8, 0.0]
    bodies = stub.app.state.bodies                     # concurrent requests: any order
    assert {b["model"] for b in bodies} == {"judge-model"}
    assert sum("2+2?" in b["messages"][0]["content"] for b in bodies) == 2 == len(bodies) // 2


def test_requests_per_minute_are_paced(stub):
    client = JudgeClient(JudgeOptions(base_url=stub.url + "/v1", rpm=120, concurrency=8, cache_dir=""))
    t0 = time.perf_counter()
    replies = client.chat_many([{"model": "m", "messages": [{"role": "user", "content": str(i)}]} for i in range(6)])
    assert replies == ["Score: 8"] * 6
    assert time.perf_counter() - t0 >= 1.5             # 2 a second: the burst of 2, then 4 more over 2 s


def test_a_dead_endpoint_is_an_error_after_the_retries(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                                       # nothing listens there
    client = JudgeClient(JudgeOptions(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, retry_wait_s=0.01,
                                      cache_dir=""))
    out = client.chat_many([{"model": "m", "messages": [{"role": "user", "content": "x"}]}])
    assert isinstance(out[0], RuntimeError) and "APIConnectionError" in str(out[0])
    assert client.usage["judge_requests"] == 3 and client.usage["judge_retries"] == 2 and client.usage["judge_failures"] == 1


def test_text_similarity_cosine_uses_the_endpoint_embeddings(stub):
    grader = load_grader({"type": "text_similarity", "name": "cos", "evaluation_metric": "cosine",
                          "input": "{{ sample.output_text }}", "reference": "{{ item.ref }}"},
                         JudgeOptions(base_url=stub.url + "/v1", cache_dir=""))
    got = grader.batch(["abc", "ab", "aab"], [{"ref": "abc"}, {"ref": "cd"}, {"ref": "ab"}])
    # letter-count vectors: abc.abc = 3 / (sqrt3 sqrt3); ab.cd = 0; aab.ab = (2 + 1) / (sqrt5 sqrt2)
    assert got == pytest.approx([1.0, 0.0, 3 / (5 ** 0.5 * 2 ** 0.5)])


def test_rft_grade_samples_from_an_endpoint(stub, tmp_path):
    from rftkit.graders.grade import GradeConfig, grade
    (tmp_path / "g.json").write_text(json.dumps({"type": "string_check", "name": "says_score", "operation": "like",
                                                 "input": "{{ sample.output_text }}", "reference": "{{ item.want }}"}))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "want": w}) + "\n"
                                                 for i, w in enumerate(["Score", "8", "nine"])))
    out = grade(GradeConfig(grader=str(tmp_path / "g.json"), data=str(tmp_path / "rows.jsonl"),
                            base_url=stub.url + "/v1", served_model="policy", samples=2, temperature=1.0))
    assert out["texts"] == [["Score: 8"] * 2] * 3 and out["scores"] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert [b["model"] for b in stub.app.state.bodies] == ["policy"] * 3
    assert stub.app.state.bodies[0]["n"] == 2 and "mean 0.667" in out["report"]
