"""The inference engine: token ids in, token ids + log-probs out. No text, no HTTP.

    engine = Engine(model)
    outs = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=16, n=4))

`step()` = schedule -> forward -> sample -> update. Each step prefills at most one chunk of a waiting
request (so a long prompt never stalls running requests for long) and decodes one token for every running
request in a single batched forward. Requests join and leave between steps.

KV cache: one contiguous slot per running sequence, `[slots, Hkv, S, hd]` per layer, allocated once within
`kv_budget_bytes` (so the budget can never be exceeded; requests wait for a free slot). Running sequences
always occupy slots 0..B-1 (a finished sequence's slot is refilled by moving the last one into it), so the
decode step attends over a view of the cache, with no gather. The `n` samples of a request share one
prefill: its prompt's keys/values are copied to the other n-1 slots.

Adapters: the engine runs the model as it is. A model with LoRA applied (rftkit.lora) generates with its
live adapter — that is how GRPO rollouts use the adapter being trained, with no merge and no reload.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from rftkit.model import Transformer
from rftkit.sampling import SamplingParams, sample


@dataclass
class Sequence:
    request_id: int
    index: int                       # which of the request's n samples
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    slot: int = -1
    prefilled: int = 0               # prompt tokens already in the cache
    finish_reason: str | None = None

    @property
    def length(self) -> int:         # tokens in the cache once the last sampled token is fed back
        return len(self.prompt) + len(self.tokens)


@dataclass
class StepOutput:
    request_id: int
    index: int
    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    finish_reason: str | None
    top_logprobs: list | None = None


@dataclass
class Completion:
    request_id: int
    index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    top_logprobs: list | None = None


class SlotCache:
    """The model's cache protocol over preallocated slots; `rows` maps the batch rows to slots."""

    def __init__(self, n_layers, slots, n_kv, seq_len, head_dim, device, dtype):
        shape = (slots, n_kv, seq_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.seq_len = seq_len
        self.rows: torch.Tensor | None = None      # [B] slot ids of the current forward
        self.contiguous = False                    # rows == 0..B-1: attend over a view
        self.kpos: torch.Tensor | None = None

    def bind(self, rows: list[int], max_len: int, device):
        self.rows = torch.tensor(rows, device=device)
        self.contiguous = rows == list(range(len(rows)))
        self.max_len = max_len
        self.kpos = torch.arange(max_len, device=device).expand(len(rows), max_len)

    def update(self, layer, k, v, positions):
        # k, v [B, Hkv, T, hd]; positions [B, T]; keys past a row's length sit at positions > its queries,
        # so causality masks them: every row can attend over the same max_len keys
        K, V = self.k[layer], self.v[layer]
        idx = (self.rows[:, None], slice(None), positions)
        K[idx] = k.transpose(1, 2)
        V[idx] = v.transpose(1, 2)
        if self.contiguous:
            B = len(self.rows)
            return K[:B, :, :self.max_len], V[:B, :, :self.max_len], self.kpos
        return K[self.rows, :, :self.max_len], V[self.rows, :, :self.max_len], self.kpos

    def copy_slot(self, src: int, dst: int, length: int):
        for K, V in zip(self.k, self.v):
            K[dst, :, :length] = K[src, :, :length]
            V[dst, :, :length] = V[src, :, :length]


class Engine:
    def __init__(self, model: Transformer, kv_budget_bytes: int = 1 << 30, max_seq_len: int = 1024,
                 max_batch: int = 64, prefill_chunk: int = 512, seed: int = 0):
        cfg = model.cfg
        self.model = model
        self.device = model.device
        dtype = model.lm_head.weight.dtype
        self.max_seq_len = min(max_seq_len, cfg.max_seq_len or max_seq_len)
        per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * self.max_seq_len * cfg.head_dim * dtype.itemsize
        self.n_slots = min(max_batch, kv_budget_bytes // per_slot)
        if self.n_slots < 1:
            raise ValueError(f"kv_budget_bytes={kv_budget_bytes} holds no sequence of {self.max_seq_len} "
                             f"tokens ({per_slot} bytes each); raise the budget or lower max_seq_len")
        self.cache = SlotCache(cfg.n_layers, self.n_slots, cfg.n_kv_heads, self.max_seq_len, cfg.head_dim,
                               self.device, dtype)
        self.kv_bytes = per_slot * self.n_slots
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[list[Sequence]] = deque()   # requests (their n sequences) not yet prefilled
        self.prefilling: list[Sequence] | None = None
        self.running: list[Sequence] = []               # running[i] sits in slot i
        self.ids = itertools.count()
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "shared_prefill_tokens": 0, "steps": 0,
                      "finished": 0, "aborted": 0}
        self._pending: list[StepOutput] = []

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: int | None = None) -> int:
        params = params or SamplingParams()
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                             f"exceeds the engine's context of {self.max_seq_len} tokens")
        if params.n > self.n_slots:
            raise ValueError(f"n={params.n} exceeds the engine's {self.n_slots} sequence slots")
        rid = next(self.ids) if request_id is None else request_id
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seqs.append(Sequence(rid, i, list(prompt_ids), params, gen))
        self.waiting.append(seqs)
        return rid

    def abort(self, request_id: int) -> None:
        self.waiting = deque(g for g in self.waiting if g[0].request_id != request_id)
        if self.prefilling and self.prefilling[0].request_id == request_id:
            self._release(self.prefilling)
            self.prefilling = None
        for s in [s for s in self.running if s.request_id == request_id]:
            s.finish_reason = "abort"
            self._pending.append(StepOutput(s.request_id, s.index, [], [], True, "abort"))
            self._free(s)
        self.stats["aborted"] += 1

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ slots
    def _free(self, seq: Sequence) -> None:
        """Remove a running sequence; the last running sequence moves into its slot."""
        i = seq.slot
        last = self.running.pop()
        if last is not seq:
            self.cache.copy_slot(last.slot, i, last.length)
            last.slot = i
            self.running[i] = last
        seq.slot = -1

    def _release(self, seqs):
        for s in seqs:
            if s.slot >= 0 and s in self.running:
                self._free(s)

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        self.stats["steps"] += 1
        outputs, self._pending = self._pending, []
        decoding = [s for s in self.running if s.tokens]          # sequences with a token to feed back
        if decoding:
            self._decode(decoding, outputs)
        self._prefill(outputs)
        return outputs

    def _prefill(self, outputs):
        """Prefill up to `prefill_chunk` prompt tokens, over as many waiting requests as fit, in one forward."""
        budget, batch = self.prefill_chunk, []                       # (group, start, end)
        while budget > 0:
            if self.prefilling is None:
                if not self.waiting or len(self.running) + len(self.waiting[0]) > self.n_slots:
                    break
                self.prefilling = self.waiting.popleft()
                first = self.prefilling[0]
                first.slot = len(self.running)
                self.running.append(first)
            first = self.prefilling[0]
            start = first.prefilled
            end = min(len(first.prompt), start + budget)
            batch.append((self.prefilling, start, end))
            budget -= end - start
            first.prefilled = end
            if end < len(first.prompt):
                break                                                # the rest of it next step
            self.prefilling = None                                   # slots for its n samples below
        if not batch:
            return
        T = max(e - s for _, s, e in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        pos = torch.full((len(batch), T), -1, dtype=torch.long)
        for i, (g, s, e) in enumerate(batch):
            ids[i, :e - s] = torch.tensor(g[0].prompt[s:e])
            pos[i, :e - s] = torch.arange(s, e)
        ids, pos = ids.to(self.device), pos.to(self.device)
        self.cache.bind([g[0].slot for g, _, _ in batch], max(e for _, _, e in batch), self.device)
        hidden, _ = self.model(ids, positions=pos, cache=self.cache, return_hidden=True)
        self.stats["prefill_tokens"] += sum(e - s for _, s, e in batch)
        done = [(i, g, e - s) for i, (g, s, e) in enumerate(batch) if e == len(g[0].prompt)]
        if not done:
            return
        for _, g, _ in done:
            self._share_prefill(g)
        last = torch.stack([hidden[i, n - 1] for i, _, n in done])                    # [b, D]
        logits = self.model.lm_head(last)
        seqs = [s for _, g, _ in done for s in g]
        rows = torch.tensor([j for j, (_, g, _) in enumerate(done) for _ in g])
        self._sample(seqs, logits[rows], outputs)

    def _share_prefill(self, group):
        """The n samples of a request share its prompt's keys/values: copy them into n-1 more slots."""
        first = group[0]
        for s in group[1:]:
            s.slot = len(self.running)
            self.running.append(s)
            self.cache.copy_slot(first.slot, s.slot, len(s.prompt))
            s.prefilled = len(s.prompt)
            self.stats["shared_prefill_tokens"] += len(s.prompt)

    def _decode(self, seqs: list[Sequence], outputs):
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        pos = torch.tensor([[s.length - 1] for s in seqs], device=self.device)
        self.cache.bind([s.slot for s in seqs], max(s.length for s in seqs), self.device)
        logits, _ = self.model(ids, positions=pos, cache=self.cache)
        self.stats["decode_tokens"] += len(seqs)
        self._sample(seqs, logits[:, -1], outputs)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, outputs):
        params = [s.params for s in seqs]
        tokens, logps, tops = sample(logits, params, [s.generator for s in seqs], self.gen)
        for i, s in enumerate(seqs):
            t, lp = int(tokens[i]), float(logps[i])
            s.tokens.append(t)
            s.logprobs.append(lp)
            top = tops[i] if tops else None
            if top is not None:
                s.top_logprobs.append(top)
            if not s.params.ignore_eos and t in s.params.stop_token_ids:
                s.finish_reason = "stop"
            elif len(s.tokens) >= s.params.max_tokens:
                s.finish_reason = "length"
            outputs.append(StepOutput(s.request_id, s.index, [t], [lp], s.finish_reason is not None,
                                      s.finish_reason, [top] if top is not None else None))
        for s in seqs:
            if s.finish_reason is not None:
                self.stats["finished"] += 1
                self._free(s)

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[list[Completion]]:
        """All completions, grouped per prompt in input order (n per prompt)."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        order = {rid: i for i, rid in enumerate(rids)}
        seqs: dict[tuple[int, int], Completion] = {}
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            for j in range(sp.n):
                seqs[(rids[i], j)] = Completion(rids[i], j, list(p), [], [], "", [] if sp.logprobs else None)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(seqs), desc="generate", unit="seq", leave=False)
        while self.has_unfinished():
            for out in self.step():
                if out.request_id not in order:
                    continue
                c = seqs[(out.request_id, out.index)]
                c.token_ids.extend(out.token_ids)
                c.logprobs.extend(out.logprobs)
                if out.top_logprobs is not None and c.top_logprobs is not None:
                    c.top_logprobs.extend(out.top_logprobs)
                if out.finished:
                    c.finish_reason = out.finish_reason
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [[seqs[(rid, j)] for j in range(sp.n)] for rid, sp in zip(rids, plist)]
