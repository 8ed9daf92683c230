"""Reinforcement fine-tuning with the GRPO family, as one flat loop.

    rft train --task arithmetic --steps 100 --output runs/add
    train(GRPOConfig(task="arithmetic", time_budget=600))

Each step: take P prompts from the task's train split; sample G completions of each with the engine, which
runs the model with its live LoRA adapter (no merge, no reload); score them with the rewards; turn rewards
into group advantages; drop groups whose rewards are all equal (they carry no signal); then update the
adapter on the clipped policy loss (rftkit.grpo_loss), with each prompt processed once per group
(rftkit.group_logprobs). The loss is normalised over the whole batch, so micro-batching changes nothing and
there is no divisibility rule to satisfy: any P, any G >= 2.

`grpo_update(model, optimizer, rollouts, cfg)` is the update alone, callable on given rollouts. Rollouts are
seeded by (seed, step, prompt), and checkpoints hold the adapter, the optimizer state and the step, so a
killed run resumes exactly.

Under torchrun (rftkit.distributed) each process samples and scores the groups of its share of the step's
prompts (a group never spans processes), the processes exchange their rollouts so that each holds the whole
batch (advantages, dropped groups and normalisers are those of one process), each computes the gradient of
its own groups, and the gradients are summed before clipping. Only rank 0 writes; the step is global, so a
run resumes with any number of processes.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from rftkit import distributed as dist
from rftkit.group_logprobs import group_logprobs
from rftkit.grpo_loss import LossSpec, Totals, group_advantages, policy_loss
from rftkit.loading.checkpoint import load_checkpoint, newest_readable_checkpoint, save_checkpoint
from rftkit.lora import LoRAConfig, apply_lora, lora_disabled, lora_modules, lora_parameters, save_lora
from rftkit.lr_schedule import lr_at
from rftkit.memory import keep_freed_memory
from rftkit.metrics import MetricsLog, plot_curves
from rftkit.precision import adapter_to_fp32, check_base_bits, prepare_base, resolve_device, resolve_dtype
from rftkit.preemption import StopRequest
from rftkit.run_folder import prepare_output
from rftkit.run_summary import write_summary
from rftkit.tracking import check_report_to
from rftkit.train_eval import BestAdapter, eval_row


@dataclass
class GRPOConfig:
    model: str | None = None             # model folder / .gguf / None = embedded smollm2-135m-instruct
    task: str = "arithmetic"             # arithmetic, countdown, jsonl:FILE, rg:NAME (or give --data)
    data: str | None = None              # training rows, every one trains: .jsonl/.json/.csv/.parquet or a dataset
                                         # folder, with `messages` or `prompt` (docs/data.md)
    eval_data: str | None = None         # validation rows (default: none, or --eval-fraction of --data)
    test_data: str | None = None         # test rows
    eval_fraction: float = 0.0           # share of --data held out for validation when --eval-data is not given
    columns: list[str] = field(default_factory=list)  # column renames NAME=COLUMN, e.g. prompt=question,answer=sol
    init_adapter: str | None = None      # start from this PEFT adapter (SFT -> RFT, RFT -> RFT); its rank, alpha
                                         # and targets must equal --lora-r, --lora-alpha, --lora-targets
    from_logs: str | None = None         # train on the chat prompts `rft serve --log-requests DIR` logged (DIR);
                                         # score them with --task-reward or --grader (docs/traffic.md)
    logs_adapter: str = ""               # only the traffic of this served model id (adapter name or base id); it
                                         # is also the warm start when --init-adapter is not given
    logs_since: str = ""                 # only requests since then: 24h, 30m, 7d ago, or an ISO time (UTC)
    logs_until: str = ""                 # only requests before then (same forms)
    logs_feedback: str = "any"           # any, with, without, score>=X (also >, <=, <, =) or label=NAME
    task_reward: str = ""                # replaces the task's own reward (e.g. "code" for a JSONL of tests)
    grader: str = ""                     # OpenAI grader JSON file: replaces the task's own reward (try it with
                                         # rft grade; judge endpoint from $RFTKIT_JUDGE_BASE_URL: docs/graders.md)
    reward: list[str] = field(default_factory=list)   # extra rewards (built-in names or file.py:fn), added to
                                         # the task's
    reward_weights: list[float] = field(default_factory=list)  # weights of the extra rewards (default 1)
    output: str = "rft-run"              # run folder: metrics, checkpoints, adapter, plots
    steps: int = 100                     # training steps at most (0 = no limit)
    time_budget: float = 0.0             # training seconds at most (0 = no limit)
    prompts_per_step: int = 8            # P
    group_size: int = 8                  # G completions per prompt
    max_tokens: int = 32                 # new tokens per completion
    temperature: float = 1.0             # rollout sampling temperature
    top_p: float = 1.0                   # rollout nucleus mass
    lr: float = 2e-4                     # AdamW learning rate of the adapter (chosen on the validation split:
                                         # docs/experiments.md)
    warmup_steps: int = 3                # linear warm-up
    weight_decay: float = 0.0            # AdamW weight decay
    grad_clip: float = 1.0               # max gradient norm (0 = off)
    lora_r: int = 16                     # LoRA rank
    lora_alpha: float = 32.0             # LoRA alpha
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])  # LoRA target modules
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"  # loss aggregation
    eps_low: float = 0.2                 # clip range below 1
    eps_high: float = 0.28               # clip range above 1 (clip-higher)
    importance: Literal["token", "sequence"] = "token"      # sequence = GSPO
    beta: float = 0.0                    # KL to the base model (adapter off); 0 = none
    scale_rewards: Literal["group", "batch", "none"] = "group"  # advantage std scaling
    iterations: int = 1                  # optimisation passes per batch (old policy = engine log-probs)
    dynamic_sampling: bool = True        # drop groups whose rewards are all equal
    mask_truncated: bool = False         # no loss on completions cut at max_tokens
    ignore_eos: bool = False             # sample exactly max_tokens tokens, past EOS (benchmarks)
    response_format: str = ""            # "json_object" or a JSON schema file: rollouts decode constrained to it
    micro_batch_groups: int = 4          # groups per forward/backward (memory only: same gradients)
    seed: int = 0                        # seeds rollouts (per step) and LoRA init
    checkpoint_every: int = 10           # steps between checkpoints
    resume: bool = False                 # continue from the latest checkpoint in output
    overwrite: bool = False              # replace the run already in output (its metrics, checkpoints, adapter)
    on_reward_error: Literal["raise", "count"] = "raise"   # a raising reward stops the run, or is counted
    log_samples: int = 2                 # completions shown per step in the metrics log
    eval_every: int = 0                  # steps between greedy evaluations on the task's validation split (0 = none);
                                         # the best adapter on it is kept as output/adapter-best
    eval_n: int = 200                    # validation problems per evaluation (at most the split's size)
    report_to: list[str] = field(default_factory=list)   # also log to tensorboard, trackio, wandb, mlflow (none
                                         # by default; metrics.jsonl is the record): docs/tracking.md
    log_completions_every: int = 10      # steps between tables of the step's completions sent to --report-to
    dist_timeout: float = 1800.0         # under torchrun: seconds a process waits for the others before failing
    device: str = "auto"                 # cpu, cuda, cuda:N, or auto (CUDA is untested: docs/benchmarks.md)
    dtype: Literal["fp32", "bf16"] = "fp32"   # the base weights' dtype; the adapter stays fp32 (bf16: half the
                                         # memory, for GPUs; far slower than fp32 on CPUs)
    base_bits: int = 0                   # 4 = QLoRA: the frozen base linears in int4 (groups of 32), LoRA on top
                                         # (8 = int8); 0 = the base as loaded
    grad_checkpointing: bool = False     # recompute each block in backward instead of keeping its activations
    tools: list[str] = field(default_factory=list)   # multi-turn with tools: built-in names (calculator, python),
                                         # FILE.py (its public functions) or FILE.py:fn1+fn2 (docs/agents.md)
    env: str = ""                        # multi-turn environment FILE.py:ClassName (rftkit.environments)
    env_trl: bool = False                # --env is a class written for TRL's environment_factory
    max_turns: int = 4                   # multi-turn: model turns per conversation
    max_total_tokens: int = 256          # multi-turn: tokens after the prompt (model and environment turns)
    tool_timeout: float = 10.0           # seconds a tool call may take; a slower one answers the model an error

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare completions), got {self.group_size}")
        for name in ("prompts_per_step", "max_tokens", "micro_batch_groups", "iterations", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps <= 0 and self.time_budget <= 0:
            raise ValueError("set steps > 0 or time_budget > 0, or training never ends")
        if self.grader and self.task_reward:
            raise ValueError(f"grader {self.grader!r} and task_reward {self.task_reward!r} both replace the task's "
                             f"reward: give one")
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ValueError(f"{len(self.reward_weights)} reward weights for {len(self.reward)} rewards")
        for name in ("eval_every", "eval_n", "log_completions_every"):
            if getattr(self, name) < (0 if name == "eval_every" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'eval_every' else 1}, got {getattr(self, name)}")
        if self.response_format not in ("", "json_object") and not Path(self.response_format).is_file():
            raise ValueError(f'response_format {self.response_format!r}: give "json_object" or a JSON schema file')
        resolve_dtype(self.dtype)
        check_base_bits(self.base_bits, self.dtype)
        self.report_to = check_report_to(self.report_to)    # a missing package fails now, not after training
        if self.multi_turn:
            self.limits()                 # validates the turn and token limits
            if self.response_format:
                raise ValueError(f"response_format {self.response_format!r} constrains single-turn completions; "
                                 f"multi-turn runs (tools/env) write tool calls between turns: drop one of them")
        self.spec()  # validates loss settings

    @property
    def multi_turn(self) -> bool:
        return bool(self.tools or self.env)

    def limits(self):
        from rftkit.multiturn import Limits
        return Limits(self.max_turns, self.max_tokens, self.max_total_tokens)

    def spec(self) -> LossSpec:
        # dr_grpo's L_max: the most tokens a completion can carry loss on (all turns of a conversation)
        l_max = min(self.max_turns * self.max_tokens, self.max_total_tokens) if self.multi_turn else self.max_tokens
        return LossSpec(self.loss_type, self.eps_low, self.eps_high, self.importance, self.beta, l_max)


@dataclass
class Rollouts:
    prompts: list[list[int]]             # P prompts' token ids
    completions: list[list[int]]         # P·G completions, group-major
    rewards: torch.Tensor                # [P, G] total reward
    old_logprobs: list[list[float]]      # the engine's log-probs of each completion token
    truncated: list[bool]                # cut at max_tokens (multi-turn: stopped by a turn or token limit)
    loss_masks: list[list[int]] | None = None   # multi-turn: 1 on the tokens the model sampled, 0 on the
                                         # environment's (None: every completion token is the model's)
    turns: list[int] | None = None       # multi-turn: model turns of each conversation


def _now(device: torch.device) -> float:
    """A clock reading after the device's queued work (so timers split a GPU step honestly)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _pad_rows(rows: list[list[float]], T: int) -> torch.Tensor:
    out = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r[:T])
    return out


def grpo_update(model, optimizer, batch: Rollouts, cfg: GRPOConfig, totals: Totals | None = None,
                step_optimizer: bool = True, my_groups: list[int] | None = None) -> dict:
    """One update of the policy on given rollouts. `totals` defaults to this batch's own. `my_groups`: the
    prompts (indices into the batch) this process computes, default all; under torchrun each process passes
    its share of the whole batch, and gradients and statistics are summed over processes before clipping."""
    P, G = batch.rewards.shape
    spec = cfg.spec()
    adv = group_advantages(batch.rewards, cfg.scale_rewards)                       # [P, G]
    keep = list(range(P))
    if cfg.dynamic_sampling:
        keep = [i for i in range(P) if batch.rewards[i].std() > 0] if G > 1 else keep
    stats = {"groups_kept": len(keep), "zero_std_frac": 1 - len(keep) / P if cfg.dynamic_sampling else
             float(sum(batch.rewards[i].std() == 0 for i in range(P))) / P}
    rows = [i * G + j for i in keep for j in range(G)]
    valid_len = [len(batch.completions[r]) if batch.loss_masks is None else sum(batch.loss_masks[r]) for r in rows]
    if cfg.mask_truncated:
        valid_len = [0 if batch.truncated[r] else n for r, n in zip(rows, valid_len)]
    if totals is None:
        totals = Totals(n_seqs=len(rows), n_tokens=sum(valid_len))
    if totals.n_seqs == 0:
        return {**stats, "skipped": 1}
    if my_groups is not None:
        mine = set(my_groups)
        keep = [i for i in keep if i in mine]
    sums = {"clip_low_tokens": 0.0, "clip_high_tokens": 0.0, "kl_sum": 0.0, "entropy_sum": 0.0, "loss": 0.0}
    clock = {"forward_s": 0.0, "backward_s": 0.0, "optim_s": 0.0}     # where the update's time goes
    for _ in range(cfg.iterations):
        optimizer.zero_grad(set_to_none=True)
        for c in range(0, len(keep), cfg.micro_batch_groups):
            groups = keep[c:c + cfg.micro_batch_groups]
            mb_rows = [i * G + j for i in groups for j in range(G)]
            t0 = _now(model.device)
            prompts = [batch.prompts[i] for i in groups]
            comps = [batch.completions[r] for r in mb_rows]
            ref = None
            if spec.beta > 0:
                with torch.no_grad(), lora_disabled(model):
                    ref = group_logprobs(model, prompts, comps, G, cfg.temperature)[0]
            logp, mask, ent, aux = group_logprobs(model, prompts, comps, G, cfg.temperature, with_entropy=True)
            if batch.loss_masks is not None:          # the environment's tokens carry no loss
                mask = mask * _pad_rows([batch.loss_masks[r] for r in mb_rows], mask.shape[1]).to(mask.device)
            if cfg.mask_truncated:
                mask = mask * torch.tensor([0.0 if batch.truncated[r] else 1.0 for r in mb_rows],
                                           device=mask.device)[:, None]
            old = logp.detach() if cfg.iterations == 1 else _pad_rows(
                [batch.old_logprobs[r] for r in mb_rows], logp.shape[1]).to(mask.device) * mask
            a = adv[groups].flatten().to(logp.device)
            loss, st = policy_loss(logp, old, a, mask, spec, totals, ref)
            for name, value in aux.items():   # MoE balancing losses, weighted by this share of the batch
                loss = loss + value * len(mb_rows) / totals.n_seqs
            t1 = _now(model.device)
            loss.backward()
            clock["forward_s"] += t1 - t0
            clock["backward_s"] += _now(model.device) - t1
            for k in ("clip_low_tokens", "clip_high_tokens", "kl_sum"):
                sums[k] += st[k]
            sums["entropy_sum"] += float((ent * mask).sum())
            sums["loss"] += float(loss.detach())
        t0 = _now(model.device)
        dist.all_reduce_grads(lora_parameters(model), "the gradient all-reduce")
        if cfg.grad_clip > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(lora_parameters(model), cfg.grad_clip))
        if step_optimizer:
            optimizer.step()
        clock["optim_s"] += _now(model.device) - t0
    sums = dict(zip(sums, dist.all_reduce_floats(list(sums.values()), what="update statistics")))
    n = max(totals.n_tokens, 1) * cfg.iterations
    stats.update(loss=sums["loss"] / cfg.iterations, clip_frac=(sums["clip_low_tokens"] + sums["clip_high_tokens"]) / n,
                 kl=sums["kl_sum"] / n, entropy=sums["entropy_sum"] / n, skipped=0,
                 **{k: round(v, 3) for k, v in clock.items()})
    return stats


def _seed(*parts) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def rollout(engine, tok, task, cfg: GRPOConfig, step: int, rewards: dict, weights: dict, errors: dict,
            indices: list[int] | None = None, clock: dict | None = None, grammar=None, make_env=None):
    """Sample G completions for the step's P training prompts (or those of them at `indices`) and score them;
    `clock` gets the seconds spent generating ("gen_s") and scoring ("reward_s"); `grammar` (--response-format,
    rftkit.constrained) constrains every completion. With `make_env` (multi-turn: a fresh
    rftkit.environments.Environment per call) each completion is a whole conversation."""
    from rftkit.rewards import score_batch
    from rftkit.sampling import SamplingParams
    P, G = cfg.prompts_per_step, cfg.group_size
    indices = list(range(P)) if indices is None else indices
    samples = [task.sample("train", step * P + i, seed=cfg.seed) for i in indices]
    if make_env is not None:
        return conversation_rollout(engine, tok, samples, indices, cfg, step, rewards, weights, errors, clock,
                                    make_env)
    prompts = [tok.encode_chat(s["messages"]) for s in samples]
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, n=G,
                             seed=_seed(cfg.seed, step, i), stop_token_ids=list(tok.eos_token_ids),
                             ignore_eos=cfg.ignore_eos, grammar=grammar)
              for i in indices]
    t0 = time.perf_counter()
    groups = engine.generate(prompts, params)
    comps = [c for g in groups for c in g]
    texts = [tok.decode(c.token_ids) for c in comps]
    expanded = [s for s in samples for _ in range(G)]
    t1 = time.perf_counter()
    scores = score_batch(rewards, texts, expanded, on_error=cfg.on_reward_error, errors=errors)
    if clock is not None:
        clock.update(gen_s=t1 - t0, reward_s=time.perf_counter() - t1)
    total = sum(torch.tensor(v) * weights[k] for k, v in scores.items()).view(len(indices), G)
    batch = Rollouts(prompts, [c.token_ids for c in comps], total.float(), [c.logprobs for c in comps],
                     [c.finish_reason == "length" for c in comps])
    return batch, scores, texts, expanded


def conversation_rollout(engine, tok, samples, indices, cfg: GRPOConfig, step: int, rewards: dict, weights: dict,
                         errors: dict, clock: dict | None, make_env):
    """`rollout` for multi-turn tasks (rftkit.multiturn): G conversations per sample, the run's rewards on the
    model's last turn plus the environment's reward (as reward "env"); texts are the whole conversations."""
    from rftkit.multiturn import Conversation, TurnCodec, run_conversations
    from rftkit.rewards import score_batch
    from rftkit.sampling import SamplingParams
    G, codec = cfg.group_size, TurnCodec(tok)
    convs = [Conversation.start(make_env(), s, codec) for s in samples for _ in range(G)]
    for k in range(0, len(convs), G):
        if any(c.prompt != convs[k].prompt for c in convs[k:k + G]):
            raise ValueError(f"the environment's reset() gave different first messages for one sample "
                             f"({samples[k // G].get('id', k // G)!r}): a group's G conversations must start alike "
                             f"(draw randomness from the sample, not in reset)")

    def params(i: int, turn: int, max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=max_tokens,
                              seed=_seed(cfg.seed, step, indices[i // G], i % G, turn),
                              stop_token_ids=list(tok.eos_token_ids))
    t0 = time.perf_counter()
    run_conversations(engine, codec, convs, cfg.limits(), params)
    t1 = time.perf_counter()
    expanded = [c.sample for c in convs]
    scores = score_batch(rewards, [c.last_text for c in convs], expanded, on_error=cfg.on_reward_error,
                         errors=errors)
    scores["env"] = [c.reward() for c in convs]
    if clock is not None:
        clock.update(gen_s=t1 - t0, reward_s=time.perf_counter() - t1)
    total = sum(torch.tensor(v) * weights.get(k, 1.0) for k, v in scores.items()).view(len(indices), G)
    batch = Rollouts([convs[k].prompt for k in range(0, len(convs), G)], [c.tokens for c in convs], total.float(),
                     [c.logprobs for c in convs], [bool(c.truncated) for c in convs], [c.mask for c in convs],
                     [c.turns for c in convs])
    return batch, scores, [tok.decode(c.tokens) for c in convs], expanded


def gather_rollouts(batch: Rollouts, scores: dict, texts: list, samples: list, errors: dict, what: str):
    """Every process's rollouts, scores, texts, samples and reward errors, joined in prompt order."""
    parts = dist.all_gather((batch, scores, texts, samples, errors), what)
    b = [p[0] for p in parts]
    joined = Rollouts(sum((x.prompts for x in b), []), sum((x.completions for x in b), []),
                      torch.cat([x.rewards for x in b]), sum((x.old_logprobs for x in b), []),
                      sum((x.truncated for x in b), []),
                      None if b[0].loss_masks is None else sum((x.loss_masks for x in b), []),
                      None if b[0].turns is None else sum((x.turns for x in b), []))
    all_errors: dict = {}
    for p in parts:
        for name, e in p[4].items():
            all_errors.setdefault(name, {**e, "count": 0})["count"] += e["count"]
    return (joined, {k: sum((p[1][k] for p in parts), []) for k in scores}, sum((p[2] for p in parts), []),
            sum((p[3] for p in parts), []), all_errors)


def train(cfg: GRPOConfig, model=None, tok=None, task=None, progress: bool = True, on_step=None,
          summary: bool = True) -> dict:
    """Run GRPO; returns {"steps", "seconds", "adapter", "best" (adapter-best's best.json or None), ...}.
    `on_step(step, row)` is called after each step (and its evaluation). `summary`: write summary.png and
    report.md at the end (rft demo writes its own)."""
    from rftkit.engine import Engine
    from rftkit.loading import load
    from rftkit.data import task_from_flags
    from rftkit.rewards import load_reward, reward_metrics
    from rftkit.traffic_log import log_query, served_adapter
    rank, world = dist.init(cfg.dist_timeout)          # (0, 1) outside torchrun
    main = rank == 0                                    # only rank 0 writes
    keep_freed_memory()                                 # no page faults re-allocating each step's activations
    if cfg.prompts_per_step < world:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} is smaller than the {world} processes: each "
                         f"needs at least one prompt per step")
    mine = dist.shard(list(range(cfg.prompts_per_step)))   # this process's prompts, whole groups
    import rftkit.graders  # registers the grader:, judge-api:, judge-group: and http(s) reward specs
    logs = log_query(cfg)
    if logs is not None and not cfg.init_adapter:          # warm start from the adapter that served the traffic
        cfg = replace(cfg, init_adapter=served_adapter(logs))      # (None: the base model served it)
    if task is None:                                       # task and rewards first: a bad name fails in seconds
        if (cfg.eval_data or cfg.test_data) and not cfg.data:
            raise ValueError("rft train needs training rows: give --data FILE with --eval-data / --test-data")
        task, about = task_from_flags(cfg.task, "arithmetic", cfg.data, cfg.eval_data, cfg.test_data, cfg.columns,
                                      cfg.eval_fraction, cfg.seed, need_answer=not (cfg.task_reward or cfg.grader),
                                      logs=logs)
        if about and main:
            print(f"rft train: {about}")
    rewards = {"task": load_reward(cfg.task_reward) if cfg.task_reward else task.default_reward}
    if cfg.grader:
        rewards["task"] = rftkit.graders.load_grader(cfg.grader)
    weights = {"task": 1.0}
    for i, spec in enumerate(cfg.reward):
        rewards[spec] = load_reward(spec)
        weights[spec] = cfg.reward_weights[i] if cfg.reward_weights else 1.0
    make_env = None
    if cfg.multi_turn:                      # a bad tools or environment file fails here, before the model loads
        from rftkit.environments import environment_factory
        make_env = environment_factory(cfg.env, cfg.tools, cfg.tool_timeout, cfg.env_trl)
    out = prepare_output(Path(cfg.output), cfg.resume, cfg.overwrite, "rft train")
    if model is None:
        device = resolve_device(cfg.device, dist.local_rank() if world > 1 else None)
        model, tok = load(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype))
    prepare_base(model, cfg.base_bits, cfg.grad_checkpointing)
    torch.manual_seed(cfg.seed)
    if not lora_modules(model):
        apply_lora(model, LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets))
        adapter_to_fp32(model)
    if cfg.init_adapter:
        from rftkit.warm_start import init_from_adapter
        about = init_from_adapter(model, cfg.init_adapter, LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha,
                                                                      targets=cfg.lora_targets))
        if main:
            print(f"rft train: {about}")
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    log = MetricsLog(out / "metrics.jsonl", report_to=cfg.report_to if main else [], config=asdict(cfg),
                     resume=cfg.resume)
    base_name = cfg.model or "smollm2-135m-instruct"
    best = BestAdapter(out / "adapter-best", base_name) if cfg.eval_every and main else None
    evaluated = set()

    def evaluate_now(step: int, elapsed: float) -> None:
        """Greedy on the validation split (rank 0); the row to the log, the adapter kept if it is the best."""
        erow = eval_row(model, tok, task, step, elapsed, cfg.eval_n, cfg.max_tokens, rewards, seed=cfg.seed,
                        make_env=make_env, limits=cfg.limits() if make_env else None)
        log.write(erow)
        best.offer(model, step, erow["eval/accuracy"])
        evaluated.add(step)
        if bar is not None:
            bar.write(f"rft train: step {step}: validation accuracy {erow['eval/accuracy']:.3f} on {erow['eval/n']} "
                      f"problems ({erow['eval/seconds']:.1f} s); best {best.value:.3f} at step {best.step}")
    start, elapsed = 0, 0.0
    if cfg.resume:
        ckpt, read = newest_readable_checkpoint(out / "checkpoints")
        found = dist.all_gather(str(ckpt), "resume")
        if len(set(found)) > 1:
            raise ValueError(f"processes see different latest checkpoints {found}: --output must be a folder "
                             f"all of them share")
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer, read)
            start, elapsed = state["step"], state["elapsed"]
            if main:
                print(f"rft train: resumed from {ckpt} (step {start}, {elapsed:.0f} s trained)")
    if main:
        log.rewind(start)           # rows logged after the checkpoint would otherwise appear twice
    if main:
        (out / "config.json").write_text(__import__("json").dumps(asdict(cfg), indent=1))
    if make_env is None:
        longest_prompt = max(len(tok.encode_chat(task.sample("train", i, cfg.seed)["messages"])) for i in range(64))
        room = cfg.max_tokens
    else:
        from rftkit.multiturn import TurnCodec, longest_prompt as longest
        longest_prompt = longest(make_env, TurnCodec(tok), [task.sample("train", i, cfg.seed) for i in range(64)])
        room = cfg.max_total_tokens
    engine = Engine(model, max_seq_len=longest_prompt * 2 + room + 64,
                    max_batch=len(mine) * cfg.group_size, kv_budget_bytes=4 << 30)
    grammar = None
    if cfg.response_format:
        from rftkit.constrained import response_grammar
        grammar = response_grammar(cfg.response_format, tok, model.cfg.vocab_size)
    errors: dict = {}
    total_steps = cfg.steps if cfg.steps > 0 else None
    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps or None, initial=start, desc="rft train", unit="step", dynamic_ncols=True)
    step = start
    stopping = False
    with StopRequest() as stop:         # SIGTERM: finish the step, checkpoint, exit 143
        try:
            while (cfg.steps <= 0 or step < cfg.steps) and (cfg.time_budget <= 0 or elapsed < cfg.time_budget) \
                    and not stopping:
                t0 = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, total_steps)
                model.eval()
                clock: dict = {}
                batch, scores, texts, samples = rollout(engine, tok, task, cfg, step, rewards, weights, errors, mine,
                                                        clock, grammar, make_env)
                t_gen = clock["gen_s"]
                all_errors = errors
                if world > 1:      # every process holds the whole batch; each computes the gradient of its groups
                    batch, scores, texts, samples, all_errors = gather_rollouts(batch, scores, texts, samples, errors,
                                                                                f"step {step + 1}'s rollouts")
                model.train()
                upd = grpo_update(model, optimizer, batch, cfg, my_groups=mine)
                model.eval()
                step += 1
                dt = dist.all_reduce_floats([time.perf_counter() - t0], "max", "step time")[0]   # one clock for all
                elapsed += dt
                n_tok = sum(len(c) for c in batch.completions)
                row = {"step": step, "time": round(elapsed, 2), "lr": optimizer.param_groups[0]["lr"],
                       "reward": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std()),
                       "accuracy": float(sum(v >= 1 for v in scores["task"]) / len(texts)),
                       "completion_len": n_tok / len(texts), "truncated_frac": sum(batch.truncated) / len(texts),
                       "gen_s": round(t_gen, 3), "reward_s": round(clock["reward_s"], 3), "step_s": round(dt, 3),
                       "tok_per_s": round(n_tok / t_gen, 1),
                       **{f"reward/{k}": sum(v) / len(v) for k, v in scores.items()}, **upd,
                       "samples": [{"completion": texts[i], "reward": float(batch.rewards.flatten()[i])}
                                   for i in range(min(cfg.log_samples, len(texts)))]}
                if batch.turns is not None:
                    row.update(turns=sum(batch.turns) / len(batch.turns),
                               model_token_frac=sum(map(sum, batch.loss_masks)) / max(n_tok, 1))
                row.update(reward_metrics(rewards))   # judges: requests, cache hits, tokens (this process's)
                if all_errors:
                    row["reward_errors"] = {k: dict(v) for k, v in all_errors.items()}
                if main:
                    log.write(row)
                    if log.reporters and step % cfg.log_completions_every == 0:
                        flat = batch.rewards.flatten()
                        log.table("completions", ["prompt", "completion", "reward", *scores],
                                  [[s["messages"][-1]["content"], t, float(flat[i]), *(v[i] for v in scores.values())]
                                   for i, (s, t) in enumerate(zip(samples, texts))], step)
                    if best is not None and step % cfg.eval_every == 0:
                        evaluate_now(step, elapsed)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}",
                                    len=f"{row['completion_len']:.0f}", s=f"{dt:.1f}")
                if on_step is not None:
                    on_step(step, row)
                stopping = dist.all_reduce_floats([float(stop.requested)], "max", "a stop request")[0] > 0
                if main and step % cfg.checkpoint_every == 0 and not stopping:
                    save_checkpoint(out / "checkpoints", step, model, optimizer, {"elapsed": elapsed})
        except BaseException:
            # a raising reward, Ctrl-C, ...: the adapter and optimizer are as of the last completed step; keep them
            if main and step > start:
                save_checkpoint(out / "checkpoints", step, model, optimizer, {"elapsed": elapsed})
            print(f"\nrft train: stopped after step {step}; checkpoint and metrics kept in {out} "
                  f"(continue with --resume)", file=sys.stderr)
            log.close()
            raise
    if best is not None and not stopping and step > start and step not in evaluated:
        evaluate_now(step, elapsed)                  # the last adapter gets its validation score too
    if bar is not None:
        bar.close()
    if main:
        save_checkpoint(out / "checkpoints", step, model, optimizer, {"elapsed": elapsed})
    if stopping:                    # preempted: the checkpoint is the result; --resume continues it
        if main:
            print(f"\nrft train: stopped by SIGTERM after step {step}; checkpoint saved in {out / 'checkpoints'} "
                  f"(continue with --resume)", file=sys.stderr)
        log.close()
        return {"steps": step, "seconds": elapsed, "adapter": None, "reward_errors": errors, "stopped": "SIGTERM"}
    if main:
        save_lora(model, out / "adapter", base=base_name)
    log.close()
    rows = log.read() if main else []
    kept = best.info() if best is not None else None
    if rows:
        plot_curves(rows, "step", ["reward", "accuracy"], out / "reward.png", title="GRPO training")
        if summary:
            write_summary(out, f"rft train: GRPO on {task.name}", rows, kept)
    return {"steps": step, "seconds": elapsed, "adapter": str(out / "adapter"), "reward_errors": errors,
            "best": kept, "best_adapter": str(out / "adapter-best") if kept else None}


def run_grpo(cfg: GRPOConfig) -> int:
    result = train(cfg)
    main = dist.is_main()
    dist.close()
    if result.get("stopped"):
        return StopRequest.EXIT_STATUS
    if main:
        print(f"rft train: {result['steps']} steps in {result['seconds']:.0f} s; adapter saved to "
              f"{result['adapter']}")
        if result["best"]:
            b = result["best"]
            print(f"rft train: best on validation: step {b['step']} ({b['metric']} {b['value']:.3f}), saved to "
                  f"{result['best_adapter']}")
    return 0
