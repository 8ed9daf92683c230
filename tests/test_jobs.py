"""Fine-tuning jobs behind `rft serve`, driven by the official `openai` client on loopback: upload a file, run a
reinforcement job with a text_similarity grader to `succeeded`, chat with its model id (equal to PEFT +
transformers on the job's adapter), cancel, pause/resume, a restart mid-job, and bad requests as 4xx."""
import io
import json
import os
import shutil
import sqlite3
import subprocess
import time

import httpx
import openai
import pytest

from tests.serve_helpers import KEY, MSG, Running, _hf_greedy, server_root

GRADER = {"type": "text_similarity", "name": "close", "input": "{{ sample.output_text }}",   # graded: the random
          "reference": "{{ item.answer }}", "evaluation_metric": "fuzzy_match"}           # model gets some credit
ABC = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"       # the random model's bytes hit some letters
ROWS = [{"messages": [{"role": "user", "content": f"Say some letters, {i}"}], "answer": ABC} for i in range(4)]
TINY = {"group_size": 4, "max_tokens": 4, "lora_r": 2, "lora_alpha": 4.0, "checkpoint_every": 1}


def start(root, base):
    from rftkit.serve.app import ServeConfig, Server, build_app
    cfg = ServeConfig(model=str(base), adapters=str(root / "adapters"), api_key=KEY, max_seq_len=512,
                      max_loaded_adapters=2, device="cpu")
    server = Server(cfg)
    return Running(build_app(server), server)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root, base = server_root(tmp_path_factory, "jobs")
    return root, base


@pytest.fixture(scope="module")
def served(world):
    running = start(*world)
    yield running
    running.stop()


def upload(client, rows=ROWS):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return client.files.create(file=("rows.jsonl", io.BytesIO(data)), purpose="fine-tune")


def create(client, fid, steps, suffix="", **extra):
    return client.fine_tuning.jobs.create(
        model="base", training_file=fid, suffix=suffix or None,
        method={"type": "reinforcement", "reinforcement": {"grader": GRADER,
                                                           "hyperparameters": {"batch_size": 2, "n_epochs": 1}}},
        extra_body={"rftkit": {**TINY, "steps": steps, **extra}})


def wait(client, jid, until, timeout=120.0):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        job = client.fine_tuning.jobs.retrieve(jid)
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {jid} still {job.status} after {timeout} s: {job.error}")


def metric_events(client, jid):
    return [e for e in client.fine_tuning.jobs.list_events(jid, limit=1000).data if e.type == "metrics"]


# ----------------------------------------------------------------------------------------------------------

def test_upload_reinforcement_job_to_succeeded_then_chat_with_its_model(served, world):
    root, base = world
    client = served.client()
    f = upload(client)
    assert f.purpose == "fine-tune" and f.bytes > 0 and f.filename == "rows.jsonl"
    assert client.files.retrieve(f.id).id == f.id and f.id in [x.id for x in client.files.list()]
    assert client.files.content(f.id).content.decode().splitlines()[0] == json.dumps(ROWS[0])
    job = create(client, f.id, steps=2, suffix="adds")
    assert job.status == "queued" and job.method.type == "reinforcement" and job.model == "base"
    assert job.hyperparameters.batch_size == 2
    job = wait(client, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:base:adds:{job.id}" and job.finished_at >= job.created_at
    # the events: every training step's row of metrics.jsonl, newest first, then paged with `after`
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert events[0].message == "The job has successfully completed"
    rows = [json.loads(l) for l in (root / "adapters-state" / "jobs" / job.id / "run" / "metrics.jsonl")
            .read_text().splitlines()]
    steps = [e.data for e in events if e.type == "metrics"][::-1]
    assert [r["step"] for r in steps] == [1, 2] == [r["step"] for r in rows]
    assert [r["reward"] for r in steps] == [r["reward"] for r in rows]
    assert all(0 <= r["reward"] <= 1 and len(r["samples"]) == 2 for r in steps)
    page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert page.has_more and [e.id for e in page.data] == [e.id for e in events[:2]]
    assert [e.id for e in page.get_next_page().data] == [e.id for e in events[2:4]]
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [2, 1]
    assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]
    # the model id is served at once (hot-loading), and answers as PEFT + transformers do on the job's adapter
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(model=job.fine_tuned_model, messages=MSG, max_tokens=8, temperature=0)
    folder = root / "adapters" / f"ft-adds-{job.id}"
    assert chat.choices[0].message.content == _hf_greedy(base, MSG, 8, adapter=folder)
    from safetensors.torch import load_file
    lora_b = [v for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)          # trained: B starts at zero
    assert served.get("/metrics").text.count(f'rftkit_model_requests_total{{model="ft-adds-{job.id}"}} 1') == 1


@pytest.mark.slow
def test_supervised_job_trains_on_the_replies_and_is_served(served, world):
    root, base = world
    client = served.client()
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("one", "two", "three", "four")]
    job = client.fine_tuning.jobs.create(model="base", training_file=upload(client, rows).id, suffix="sft",
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "batch_size": 2, "n_epochs": 1, "learning_rate_multiplier": 50}}},
                                         extra_body={"rftkit": {"lora_r": 2, "lora_alpha": 4.0}})
    job = wait(client, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    losses = [e.data["loss"] for e in metric_events(client, job.id)][::-1]
    assert len(losses) == 2 and losses[1] < losses[0]                  # 2 steps of 2 rows; lr 1e-2 lowers it
    assert job.trained_tokens == sum(e.data["tokens"] for e in metric_events(client, job.id)) > 0
    chat = client.chat.completions.create(model=job.fine_tuned_model, messages=MSG, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == _hf_greedy(base, MSG, 6, adapter=root / "adapters" / f"ft-sft-{job.id}")


def test_cancel_a_running_job_keeps_its_checkpoint_and_serves_nothing(served, world):
    root, _ = world
    client = served.client()
    job = create(client, upload(client).id, steps=500)
    wait(client, job.id, lambda j: j.status == "running" and metric_events(client, j.id))
    assert client.fine_tuning.jobs.cancel(job.id).status in ("running", "cancelled")
    job = wait(client, job.id, lambda j: j.status != "running")
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data                   # SIGTERM checkpointed the step
    assert not list((root / "adapters").glob(f"*{job.id}*"))
    with pytest.raises(openai.ConflictError, match="cancelled"):
        client.fine_tuning.jobs.cancel(job.id)
    queued = create(client, upload(client).id, steps=500)                         # runner idle: may start at once
    client.fine_tuning.jobs.cancel(queued.id)
    assert wait(client, queued.id, lambda j: j.status == "cancelled").status == "cancelled"


@pytest.mark.slow
def test_pause_then_resume_continues_from_the_checkpoint(served):
    client = served.client()
    job = create(client, upload(client).id, steps=4)
    wait(client, job.id, lambda j: j.status == "running" and metric_events(client, j.id))
    client.fine_tuning.jobs.pause(job.id)
    job = wait(client, job.id, lambda j: j.status == "paused")
    done = max(e.data["step"] for e in metric_events(client, job.id))
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    job = wait(client, job.id, lambda j: j.status == "succeeded")
    steps = sorted(e.data["step"] for e in metric_events(client, job.id))
    assert steps == [1, 2, 3, 4]                                    # each step once: resumed, not restarted
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert f"Resuming from step {done}" in messages


def test_bad_requests_are_4xx_naming_the_problem(served):
    client = served.client()
    f = upload(client)
    bad_grader = {**GRADER, "evaluation_metric": "closeness"}
    with pytest.raises(openai.BadRequestError, match="evaluation_metric"):
        client.fine_tuning.jobs.create(model="base", training_file=f.id,
                                       method={"type": "reinforcement", "reinforcement": {"grader": bad_grader}})
    with pytest.raises(openai.BadRequestError, match="model must be the served base model"):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=f.id)
    with pytest.raises(openai.BadRequestError, match="training_file"):
        client.fine_tuning.jobs.create(model="base", training_file="file-nope")
    with pytest.raises(openai.BadRequestError, match="dpo is not supported"):
        client.fine_tuning.jobs.create(model="base", training_file=f.id, method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError, match="rftkit.reward is not an option"):
        client.fine_tuning.jobs.create(model="base", training_file=f.id, extra_body={"rftkit": {"reward": "x.py:f"}})
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        client.fine_tuning.jobs.create(model="base", training_file=f.id, hyperparameters={"n_epochs": -1})
    with pytest.raises(openai.BadRequestError, match="line 2 is not JSON"):
        client.files.create(file=("x.jsonl", io.BytesIO(b'{"a": 1}\nnope\n')), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").fine_tuning.jobs.list()
    assert client.files.delete(f.id).deleted and f.id not in [x.id for x in client.files.list()]
    assert httpx.get(served.url + "/ui").status_code == 200                         # the page itself holds no data
    assert served.get("/health").json()["status"] == "ok"                           # still serving


@pytest.mark.slow
def test_a_job_running_when_the_server_stops_resumes_at_the_next_start(world):
    root, _ = world
    first = start(*world)
    client = first.client()
    job = create(client, upload(client).id, steps=5)
    wait(client, job.id, lambda j: j.status == "running" and metric_events(client, j.id))
    first.stop()                                        # SIGTERM to the job: it checkpoints its step and exits
    with sqlite3.connect(root / "adapters-state" / "jobs.db") as db:
        assert db.execute("select status from jobs where id = ?", (job.id,)).fetchone()[0] == "running"
    second = start(*world)
    try:
        client = second.client()
        job = wait(client, job.id, lambda j: j.status in ("succeeded", "failed"))
        assert job.status == "succeeded", job.error
        assert sorted(e.data["step"] for e in metric_events(client, job.id)) == [1, 2, 3, 4, 5]
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any(m.startswith("The server restarted") for m in messages)
        assert any(m.startswith("Resuming from step") for m in messages)
        chat = client.chat.completions.create(model=job.fine_tuned_model, messages=MSG, max_tokens=4)
        assert chat.choices[0].message.content is not None
    finally:
        second.stop()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install -y chromium)")
def test_console_renders_jobs_and_curves_in_headless_chromium(served, tmp_path):
    """The console in a real browser, after a finished job: a screenshot of the right size, not blank, with the
    reward curve's colour drawn. RFTKIT_CONSOLE_PNG=docs/img/console.png keeps the screenshot."""
    from PIL import Image
    client = served.client()
    job = create(client, upload(client).id, steps=6, suffix="console")
    assert wait(client, job.id, lambda j: j.status in ("succeeded", "failed")).status == "succeeded"
    client.chat.completions.create(model=f"ft:base:console:{job.id}", messages=MSG, max_tokens=4)
    png = tmp_path / "console.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=8000",
                    f"--screenshot={png}", f"{served.url}/ui#key={KEY}"], check=True, timeout=120,
                   capture_output=True)
    img = Image.open(png).convert("RGB")
    assert img.size == (1280, 900)
    pixels = list(img.get_flattened_data())
    assert len(set(pixels)) > 50                                                   # not a blank page
    blue = sum(1 for r, g, b in pixels if abs(r - 0x25) < 30 and abs(g - 0x63) < 30 and abs(b - 0xeb) < 30)
    green = sum(1 for r, g, b in pixels if abs(r - 0x1a) < 20 and abs(g - 0x7f) < 20 and abs(b - 0x37) < 20)
    assert blue > 300, blue                 # the reward curve (3 px wide, points) in #2563eb
    assert green > 50, green                # the `succeeded` badge in #1a7f37
    if os.environ.get("RFTKIT_CONSOLE_PNG"):
        shutil.copy(png, os.environ["RFTKIT_CONSOLE_PNG"])


@pytest.mark.slow
def test_rft_serve_killed_mid_job_resumes_it_at_the_next_start(world, tmp_path):
    """The crash path through the real command: `rft serve` in its own process, SIGKILLed while a job trains
    (its worker, orphaned, checkpoints and exits); a new `rft serve` on the same folders finishes the job."""
    import signal
    import socket
    import sys
    root, base = world
    adapters, state = tmp_path / "adapters", tmp_path / "state"
    adapters.mkdir()

    def serve():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "rftkit.cli", "serve", "--model", str(base), "--adapters",
                                 str(adapters), "--state-dir", str(state), "--api-key", KEY, "--port", str(port),
                                 "--device", "cpu", "--max-seq-len", "512"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return proc, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            except httpx.HTTPError:
                time.sleep(0.25)
        proc.kill()
        raise AssertionError("rft serve did not start")
    proc, client = serve()
    try:
        job = create(client, upload(client).id, steps=5)
        wait(client, job.id, lambda j: j.status == "running" and metric_events(client, j.id))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, client = serve()
    try:
        job = wait(client, job.id, lambda j: j.status in ("succeeded", "failed"))
        assert job.status == "succeeded", job.error
        assert sorted(e.data["step"] for e in metric_events(client, job.id)) == [1, 2, 3, 4, 5]
        assert (adapters / f"ft-{job.id}" / "adapter_model.safetensors").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_model_ids_and_the_state_folder(tmp_path):
    from rftkit.jobs import adapter_name, model_of_adapter
    from rftkit.serve.app import ServeConfig
    from rftkit.serve.jobs import open_jobs
    jid = "ftjob-" + "ab" * 12
    for suffix, folder in (("adds", f"ft-adds-{jid}"), ("", f"ft-{jid}"), ("v1.2_x", f"ft-v1.2_x-{jid}")):
        model = f"ft:my-base:{suffix}:{jid}"
        assert adapter_name(model) == folder and model_of_adapter(folder, "my-base") == model
    assert adapter_name("alpha") is None and adapter_name(f"ft:b:a-b:{jid}") is None      # '-' is no suffix
    assert model_of_adapter("alpha", "b") == "alpha"
    (tmp_path / "adapters").mkdir()
    cfg = ServeConfig(adapters=str(tmp_path / "adapters"))
    assert open_jobs(cfg).store.root == tmp_path / "adapters-state"
    assert open_jobs(ServeConfig(adapters=str(tmp_path / "adapters"), max_jobs=0)) is None
    assert open_jobs(ServeConfig()) is None
    with pytest.raises(ValueError, match="must not be inside"):
        open_jobs(ServeConfig(adapters=str(tmp_path / "adapters"), state_dir=str(tmp_path / "adapters" / "s")))
    with pytest.raises(ValueError, match="needs --adapters"):
        open_jobs(ServeConfig(state_dir=str(tmp_path / "s")))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--max-jobs 0"):
        open_jobs(ServeConfig(adapters=str(tmp_path / "adapters"), state_dir=str(tmp_path / "file" / "s")))
