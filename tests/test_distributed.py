"""Scale-out under torchrun (2 CPU processes, gloo) against the 1-process run as the reference: gradients of one
SFT step and of one GRPO step on fixed rollouts (examples of different lengths, uneven shards, a dropped
group), parameters after a few steps; `rft sft` and `rft train` unchanged under torchrun, only rank 0 writes,
a 2-process run resumes with 1 process; a hung rank ends the job within the collective timeout, named.

This file is also the worker script: `torchrun ... tests/test_distributed.py CASE OUTDIR`.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # as a torchrun worker script
    sys.path.insert(0, str(ROOT))

from rftkit import distributed as dist  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

SFT_STEPS, GRPO_STEPS = 3, 3


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 300, extra_env: dict | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ----------------------------------------------------------------------------------------------------------
# fixed problems, built identically by the workers and by the 1-process reference

def _sft_case():
    """A full-weight tiny model and SFT_STEPS global batches of 7 examples of lengths 5..40 (uneven shards)."""
    model = tiny_model(seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(SFT_STEPS):
        batch = []
        for _ in range(7):
            T = int(torch.randint(5, 41, (1,), generator=g))
            n_prompt = int(torch.randint(1, T - 1, (1,), generator=g))
            batch.append((torch.randint(0, 97, (T,), generator=g).tolist(), [0] * n_prompt + [1] * (T - n_prompt)))
        batches.append(batch)
    return model, batches


def _grpo_case():
    """A tiny model with LoRA (B random, so A has gradients too) and fixed rollouts: P=5 prompts of 3..9
    tokens, G=3 completions of 1..7 tokens, group 2's rewards all equal (dynamic sampling drops it)."""
    from rftkit.grpo import GRPOConfig, Rollouts
    from rftkit.lora import LoRAConfig, apply_lora
    model = tiny_model(seed=2)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    P, G = 5, 3
    prompts = [torch.randint(0, 97, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
               for _ in range(P)]
    comps = [torch.randint(0, 97, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
             for _ in range(P * G)]
    rewards = torch.rand(P, G, generator=g)
    rewards[2] = 0.5
    batch = Rollouts(prompts, comps, rewards, [[0.0] * len(c) for c in comps], [False] * (P * G))
    cfg = GRPOConfig(prompts_per_step=P, group_size=G, micro_batch_groups=2, lr=1e-2, loss_type="grpo")
    return model, batch, cfg


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_cases(outdir: Path | None = None) -> dict:
    """SFT and GRPO gradients of step 1 and parameters after a few steps, each process on its shard (the whole
    batch on one process). The steps are SGD with momentum: Adam divides by sqrt(v), which turns rounding noise
    in gradients near zero into full-size steps, so parameters after Adam steps would measure Adam's
    conditioning rather than the all-reduce (the CLI test below runs the loops' AdamW end to end)."""
    from rftkit.grpo import grpo_update
    from rftkit.sft import batch_backward
    out = {}
    model, batches = _sft_case()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    out["sft_start"] = _params(model)
    for step, batch in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        n_tokens = sum(sum(m[1:]) for _, m in batch)
        batch_backward(model, dist.shard(batch), 2, n_tokens, len(batch))
        dist.all_reduce_grads(params, f"sft step {step + 1}")
        if step == 0:
            out["sft_grads"] = _grads(model)
        opt.step()
    out["sft_params"] = _params(model)

    model, batch, cfg = _grpo_case()
    from rftkit.lora import lora_parameters
    opt = torch.optim.SGD(lora_parameters(model), lr=0.5, momentum=0.9)
    mine = dist.shard(list(range(cfg.prompts_per_step)))
    out["grpo_start"] = _params(model)
    grpo_update(model, opt, batch, cfg, step_optimizer=False, my_groups=mine)
    out["grpo_grads"] = _grads(model)
    for _ in range(GRPO_STEPS):
        stats = grpo_update(model, opt, batch, cfg, my_groups=mine)
    assert stats["groups_kept"] == 4 and stats["skipped"] == 0
    out["grpo_params"] = _params(model)
    if outdir is not None and dist.is_main():
        from safetensors.torch import save_file
        for name, tensors in out.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(outdir / f"{name}.safetensors"))
    return out


def run_fsdp_sft(outdir: Path) -> None:
    """run_cases' SFT part with the model sharded by FSDP2 (every rank runs the same number of passes)."""
    from rftkit.sft import _passes, batch_backward
    model, batches = _sft_case()
    dist.shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    out = {}
    for step, batch in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        n_tokens = sum(sum(m[1:]) for _, m in batch)
        batch_backward(model, dist.shard(batch), 2, n_tokens, len(batch), _passes(len(batch), 2, dist.world_size()))
        if step == 0:
            out["sft_grads"] = {n: dist.full_tensor(p.grad) for n, p in model.named_parameters()}
        opt.step()
    out["sft_params"] = {n: dist.full_tensor(p.detach()) for n, p in model.named_parameters()}
    local = {n: p.to_local().numel() for n, p in model.named_parameters()}
    whole = {n: p.numel() for n, p in model.named_parameters()}
    if dist.is_main():
        from safetensors.torch import save_file
        for name, tensors in out.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(outdir / f"fsdp_{name}.safetensors"))
        (outdir / "fsdp_shards.json").write_text(json.dumps({"local": local, "whole": whole}))


# ----------------------------------------------------------------------------------------------------------
# fast, one process

def test_shards_partition_the_batch_in_order():
    for n in (1, 5, 7, 16):
        for w in (1, 2, 3):
            if n < w:
                continue
            parts = [dist.shard(list(range(n)), r, w) for r in range(w)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_outside_torchrun_everything_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init(30) == (0, 1)
    assert dist.shard([1, 2, 3]) == [1, 2, 3]
    assert dist.all_reduce_floats([1.5, 2.0]) == [1.5, 2.0]
    assert dist.all_gather({"a": 1}) == [{"a": 1}]
    assert dist.is_main()


def test_bad_launch_environment_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two' is not an integer"):
        dist.init(30)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 is outside 0..WORLD_SIZE-1"):
        dist.init(30)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        dist.init(30)
    with pytest.raises(ValueError, match="dist_timeout must be > 0"):
        dist.init(0)


# ----------------------------------------------------------------------------------------------------------
# torchrun, 2 processes

@pytest.mark.slow
def test_two_processes_give_the_one_process_gradients_and_parameters(tmp_path):
    from safetensors.torch import load_file
    r = _torchrun([__file__, "cases", str(tmp_path)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = run_cases()                                        # the same batches on one process
    for name in ("sft_grads", "sft_params", "grpo_grads", "grpo_params"):
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert got.keys() == ref[name].keys() and got, name
        for k, v in ref[name].items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=f"{name} {k}")
    for kind in ("sft", "grpo"):                             # ... and the parameters moved far beyond that
        moved = max(float((ref[f"{kind}_params"][k] - v).abs().max()) for k, v in ref[f"{kind}_start"].items())
        assert moved > 0.05, (kind, moved)              # 0.35 (SFT) and 0.18 (GRPO) when written
    assert any(float(v.abs().max()) > 0 for v in ref["grpo_grads"].values())


@pytest.mark.slow
def test_fsdp_on_two_processes_gives_the_one_process_gradients_and_parameters(tmp_path):
    from safetensors.torch import load_file
    r = _torchrun([__file__, "fsdp", str(tmp_path)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    shards = json.loads((tmp_path / "fsdp_shards.json").read_text())
    # each rank holds half of every weight matrix (dim 0 split), not a copy
    assert shards["local"]["model.layers.0.mlp.up_proj.weight"] * 2 == shards["whole"]["model.layers.0.mlp.up_proj.weight"]
    ref = run_cases()
    for name in ("sft_grads", "sft_params"):
        got = load_file(str(tmp_path / f"fsdp_{name}.safetensors"))
        for k, v in ref[name].items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=f"{name} {k}")
    moved = max(float((ref["sft_params"][k] - v).abs().max()) for k, v in ref["sft_start"].items())
    assert moved > 0.05, moved


def _model_folder(tmp_path, tok_dir):
    from rftkit.loading.weights import save_model_folder
    model = tiny_model(vocab_size=258, max_seq_len=512)
    model.cfg.eos_token_id = [257]
    save_model_folder(model, tmp_path / "tiny", tokenizer_dir=tok_dir)
    return tmp_path / "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_rft_sft_under_torchrun_matches_one_process(tmp_path, tok_dir, fsdp):
    from safetensors.torch import load_file
    from rftkit.sft import SFTConfig, train
    folder = _model_folder(tmp_path, tok_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "q" * (1 + i % 5), "completion": "answer " * (1 + i % 4)}) + "\n"
                            for i in range(12)))
    args = dict(data=str(data), model=str(folder), steps=3, batch_size=5, micro_batch=2, lr=1e-2, warmup_steps=1,
                lora_r=4, lora_alpha=8, eval_fraction=0.2, checkpoint_every=2, device="cpu")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    r = _torchrun(["-m", "rftkit.cli", "sft", *flags, f"--output={tmp_path / 'two'}"] + ["--fsdp"] * fsdp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train(SFTConfig(**args, output=str(tmp_path / "one")), progress=False)
    for run in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    two = load_file(str(tmp_path / "two/checkpoints/step-0000003/weights.safetensors"))
    one = load_file(str(tmp_path / "one/checkpoints/step-0000003/weights.safetensors"))
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7, msg=k)
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3    # moved from B = 0
    rows = [json.loads(l) for l in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows] == [0, 1, 2, 3]              # one writer
    for a, b in zip(rows[1:], ref[1:]):                             # global loss, tokens, held-out loss
        assert a["completion_tokens"] == b["completion_tokens"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert rows[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], rel=1e-5)
    from rftkit.peft_format import read_adapter
    (_, mine), (_, theirs) = read_adapter(tmp_path / "two/adapter"), read_adapter(tmp_path / "one/adapter")
    for k, (A, B) in theirs.items():                                # the final adapter, gathered if sharded
        torch.testing.assert_close(mine[k][0], A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mine[k][1], B, rtol=1e-5, atol=1e-7)
    # the 2-process checkpoint of step 2 resumes on one process and lands on the uninterrupted step 3
    import shutil
    shutil.rmtree(tmp_path / "two/checkpoints/step-0000003")
    train(SFTConfig(**args, output=str(tmp_path / "two"), resume=True), progress=False)
    again = load_file(str(tmp_path / "two/checkpoints/step-0000003/weights.safetensors"))
    for k in one:
        torch.testing.assert_close(again[k], one[k], rtol=1e-5, atol=1e-7, msg=k)


def _rft_files(tmp_path, sleepy: bool = False):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "answer": str(i)}) + "\n" for i in range(60)))
    reward = tmp_path / "reward.py"
    reward.write_text("import os, time\n\n\ndef digits(completion, sample):\n"
                      + ("    if os.environ.get('RANK') == '1':\n        time.sleep(600)\n" if sleepy else "")
                      + "    return sum(c.isdigit() for c in completion) / max(1, len(completion))\n")
    return [f"--task=jsonl:{task}", f"--reward={reward}:digits", "--prompts-per-step=3", "--group-size=4",
            "--max-tokens=6", "--lora-r=4", "--lr=0.05", "--checkpoint-every=1", "--seed=5"]


@pytest.mark.slow
def test_rft_train_on_two_processes_writes_once_and_resumes_on_one(tmp_path, tok_dir):
    folder = _model_folder(tmp_path, tok_dir)
    common = [f"--model={folder}", *_rft_files(tmp_path), f"--output={tmp_path / 'run'}"]
    r = _torchrun(["-m", "rftkit.cli", "train", *common, "--steps=2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows] == [1, 2]                      # one writer, not one per rank
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert (run / "adapter/adapter_model.safetensors").is_file() and (run / "reward.png").is_file()
    assert all(len(r_["samples"]) == 2 for r_ in rows) and rows[0]["groups_kept"] >= 1

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "rftkit.cli", "train", *common, "--steps=3", "--resume"],
                       env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "(step 2," in r.stdout
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows] == [1, 2, 3]

    # the reference: the same 3 steps on one process, uninterrupted
    r = subprocess.run([sys.executable, "-m", "rftkit.cli", "train", *common[:-1], f"--output={tmp_path / 'one'}",
                        "--steps=3"], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = [json.loads(l) for l in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, ref):          # the same prompts, seeds and completions, whatever the process count
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["groups_kept"] == b["groups_kept"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    from safetensors.torch import load_file
    got = load_file(str(run / "checkpoints/step-0000003/weights.safetensors"))
    want = load_file(str(tmp_path / "one/checkpoints/step-0000003/weights.safetensors"))
    for k in want:                       # AdamW steps: 6e-7 apart after 2 steps when written, B moved 5e-2
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    assert max(float(v.abs().max()) for k, v in want.items() if "lora_B" in k) > 1e-2


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_within_the_timeout_and_is_named(tmp_path, tok_dir):
    folder = _model_folder(tmp_path, tok_dir)
    t0 = time.perf_counter()
    r = _torchrun(["-m", "rftkit.cli", "train", f"--model={folder}", *_rft_files(tmp_path, sleepy=True),
                   f"--output={tmp_path / 'run'}", "--steps=2", "--dist-timeout=10"], timeout=240)
    wall = time.perf_counter() - t0
    assert r.returncode != 0
    assert "rank(s) 1 did not reach step 1's rollouts within 10 s" in r.stderr, r.stderr[-3000:]
    assert wall < 60, wall                # 20 s here with startup; rank 1 sleeps 600 s


if __name__ == "__main__":              # torchrun worker: CASE OUTDIR
    torch.set_num_threads(1)
    case, outdir = sys.argv[1], Path(sys.argv[2])
    dist.init(60)
    if case == "cases":
        run_cases(outdir)
    elif case == "fsdp":
        run_fsdp_sft(outdir)
    dist.close()
