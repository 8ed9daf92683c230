"""The inference engine: token ids in, token ids + log-probs out. No text, no HTTP.

    engine = Engine(model)
    outs = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=16, n=4))

`step()` = schedule -> forward -> sample -> update. A step decodes one token for every running sequence in
one batched forward, then prefills up to `prefill_chunk` prompt tokens of waiting requests in a second one (a
long prompt is split over steps, so running requests never stall behind it; rows of very different lengths
go to separate forwards instead of padding the short ones to the longest). Requests join and leave between
steps.

KV cache: paged. A pool of `block_size`-token blocks per layer, sized once within `kv_budget_bytes` (so the
budget cannot be exceeded); a sequence holds a table of blocks; attention gathers its blocks into a
contiguous view for a prefill chunk; a decode step reads them in place (a kernel on CPU). Pages buy three
things:
  - memory follows actual lengths (not max_seq_len per request), so more requests run at once;
  - prefix caching: full blocks of prompt tokens are kept, keyed by (adapter, every token up to the block's
    end), and a request whose prompt starts the same way (the chat template's system prompt) reuses them with
    no copy; unreferenced cached blocks are evicted least-recently-used;
  - the `n` samples of a request share their prompt's blocks (only the partial last block is copied).
    A waiting request whose first prompt block is being computed in this step's prefill waits one step and
    then hits the cache (64 requests with one system prompt compute it once, not once per request of a chunk).
When a running sequence needs a block and none is free, the newest sequence is preempted: its blocks are
freed and it is recomputed later (its prompt and generated tokens re-prefilled, mostly from the prefix cache),
continuing exactly where it stopped — its seeded generator and tokens are kept.

Adapters. A model with LoRA applied (rftkit.lora) generates with its live adapter — GRPO rollouts use the
adapter being trained, with no merge and no reload. For serving many adapters at once, `engine.adapters` is an
`rftkit.bank.AdapterBank`: `engine.adapters.register(name, folder)`, then `add_request(..., adapter=name)`;
the adapter takes a bank slot when its request is admitted (LRU eviction of slots no running request uses),
and each batch row uses its own request's adapter. The engine is single-threaded: call it from one thread.

Constrained decoding. A request whose params carry a `grammar` (rftkit.constrained: a JSON schema, forced tool
calls) gives each of its samples a matcher; a decode step computes the masks of those rows only, on a helper
thread while the forward runs, and the sampler applies them to those rows only (free rows: as if alone).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from rftkit import constrained, decode_stack, kernels
from rftkit.bank import AdapterBank
from rftkit.model import Transformer, attention, attention_mask
from rftkit.sampling import SamplingParams, sample


@dataclass
class Sequence:
    request_id: int
    index: int                       # which of the request's n samples
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)   # block table
    cached: int = 0                  # tokens whose keys/values are in the cache
    slot: int = 0                    # adapter bank slot (0 = base model)
    finish_reason: str | None = None
    matcher: object = None           # the grammar's state after `tokens` (params.grammar; rftkit.constrained)

    @property
    def length(self) -> int:         # tokens in the cache once the last sampled token is fed back
        return len(self.prompt) + len(self.tokens)

    @property
    def context(self) -> list[int]:  # what must be in the cache before the next decode (or first sample)
        return self.prompt + self.tokens[:-1] if self.tokens else self.prompt


@dataclass
class StepOutput:
    request_id: int
    index: int
    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    finish_reason: str | None
    top_logprobs: list | None = None
    error: str | None = None         # finish_reason "error": why the request could not run (its adapter)


@dataclass
class Completion:
    request_id: int
    index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    top_logprobs: list | None = None


class BlockPool:
    """Reference-counted KV blocks with a prefix cache of full prompt blocks. Block 0 is never handed out:
    it pads block tables (its keys sit at positions no query attends to)."""

    def __init__(self, n_blocks: int):
        self.free: deque[int] = deque(range(1, n_blocks))
        self.refs = [0] * n_blocks
        self.key_of: dict[int, tuple] = {}                      # block -> prefix key
        self.cached: dict[tuple, int] = {}                      # prefix key -> block
        self.idle: OrderedDict[int, None] = OrderedDict()       # cached blocks nobody holds, LRU first

    @property
    def available(self) -> int:
        return len(self.free) + len(self.idle)

    def alloc(self) -> int | None:
        if self.free:
            b = self.free.popleft()
        elif self.idle:
            b, _ = self.idle.popitem(last=False)                  # evict the least recently used cached block
            del self.cached[self.key_of.pop(b)]
        else:
            return None
        self.refs[b] = 1
        return b

    def hold(self, b: int) -> None:
        if self.refs[b] == 0:
            self.idle.pop(b, None)
        self.refs[b] += 1

    def drop(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0:
            if b in self.key_of:
                self.idle[b] = None
            else:
                self.free.append(b)

    def lookup(self, key: tuple) -> int | None:
        return self.cached.get(key)

    def publish(self, key: tuple, b: int) -> None:
        if key not in self.cached and b not in self.key_of:
            self.cached[key], self.key_of[b] = b, key

    def forget(self) -> None:
        """Empty the prefix cache (held blocks stay with their sequences and are freed when dropped)."""
        for b in self.idle:
            self.free.append(b)
        self.idle.clear()
        self.key_of.clear()
        self.cached.clear()


class PagedCache:
    """The model's cache protocol over the block pool; `bind` sets the rows of the next forward. A decode step
    (one query per row) runs the whole block stack in one kernel call where it can (`run_blocks`), else reads
    each row's blocks in place (rftkit.kernels.paged_attention); a prefill chunk gathers them into a contiguous
    view and runs the model's attention."""

    def __init__(self, n_layers, n_blocks, block_size, n_kv, head_dim, device, dtype):
        shape = (n_blocks * block_size, n_kv, head_dim)        # token-major: a block is block_size rows
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.block_size = block_size

    def bind(self, tables: list[list[int]], positions: torch.Tensor):
        """tables: each row's blocks; positions [B, T] of the tokens this forward writes (-1 = padding)."""
        bs, device = self.block_size, positions.device
        width = max(map(len, tables))
        self.table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)   # [B, nb]
        self.positions = positions
        self.decode = positions.shape[1] == 1 and bool((positions >= 0).all())
        blk = self.table.gather(1, (positions.clamp(min=0) // bs))
        rows = blk * bs + positions.clamp(min=0) % bs                                            # [B, T]
        if self.decode:
            self.write, self.qpos = rows[:, 0], positions[:, 0]                                  # [B]
            return
        valid = positions >= 0
        self.write, self.valid = rows[valid], valid                                              # [n]
        # the cache rows to read: every token of every block, in order   [B, nb * bs]
        B = len(tables)
        self.read = (self.table[:, :, None] * bs + torch.arange(bs, device=device)).reshape(B, -1)
        self.kpos = torch.arange(self.read.shape[1], device=device).expand(B, -1)
        self.masks: dict = {}

    def run_blocks(self, model, x, cos, sin) -> bool:
        """A decode step's whole block stack in one kernel call where it applies (rftkit.decode_stack)."""
        return self.decode and decode_stack.run(model, x, cos, sin, self)

    def attend(self, layer, q, k, v, positions, window):
        # q [B, H, T, hd]; k, v [B, Hkv, T, hd] -> [B, H, T, hd]
        K, V = self.k[layer], self.v[layer]
        if self.decode:
            K.index_copy_(0, self.write, k[:, :, 0])
            V.index_copy_(0, self.write, v[:, :, 0])
            out = kernels.paged_attention(q[:, :, 0], K, V, self.table, self.qpos, self.block_size, window)
            return out[:, :, None]
        K[self.write] = k.transpose(1, 2)[self.valid]
        V[self.write] = v.transpose(1, 2)[self.valid]
        if window not in self.masks:
            self.masks[window] = attention_mask(self.positions, self.kpos, window)
        return attention(q, K[self.read].transpose(1, 2), V[self.read].transpose(1, 2), self.masks[window])


def _padding_groups(lengths: list[int], waste: float = 0.25, slack: int = 64) -> list[list[int]]:
    """Indices of `lengths` split into forwards whose padding (each row padded to the group's longest) stays
    within `waste` of their real tokens or `slack` tokens, whichever is more (another forward reads every
    weight again): a prefill mixing 37-token prompts with 5-token prompt tails no longer pads every tail to 37
    (17 rows of 37, 629 token positions, computed for ~150 real tokens). Longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, cur, real = [], [], 0
    for i in order:
        total = real + lengths[i]
        if cur and lengths[cur[0]] * (len(cur) + 1) - total > max(waste * total, slack):
            groups.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    return groups + [cur] if cur else groups


class Engine:
    def __init__(self, model: Transformer, kv_budget_bytes: int = 1 << 30, max_seq_len: int = 1024,
                 max_batch: int = 64, prefill_chunk: int = 512, block_size: int = 16, seed: int = 0,
                 adapter_slots: int = 8, max_lora_rank: int = 64):
        cfg = model.cfg
        self.model = model
        self.device = model.device
        dtype = model.lm_head.weight.dtype
        self.max_seq_len = min(max_seq_len, cfg.max_seq_len or max_seq_len)
        self.max_batch, self.block_size, self.prefill_chunk = max_batch, block_size, prefill_chunk
        self.block_bytes = 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
        per_seq = -(-self.max_seq_len // block_size)
        # never more than max_batch full-length sequences need (a smaller budget is shared, with preemption)
        n_blocks = min(kv_budget_bytes // self.block_bytes, max_batch * per_seq + 1)
        if n_blocks < 2:
            raise ValueError(f"kv_budget_bytes={kv_budget_bytes} holds no {block_size}-token block "
                             f"({self.block_bytes} bytes each); raise the budget")
        self.pool = BlockPool(n_blocks)
        self.cache = PagedCache(cfg.n_layers, n_blocks, block_size, cfg.n_kv_heads, cfg.head_dim,
                                self.device, dtype)
        self.kv_bytes = n_blocks * self.block_bytes
        self.adapters = AdapterBank(model, adapter_slots)
        self.max_lora_rank = max_lora_rank
        self.waiting: deque[list[Sequence]] = deque()   # requests (or preempted sequences) not yet running
        self.prefilling: list[Sequence] | None = None
        self.running: list[Sequence] = []
        self.ids = itertools.count()
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "shared_prefill_tokens": 0,
                      "prefix_cache_hit_tokens": 0, "preemptions": 0, "steps": 0, "finished": 0, "aborted": 0,
                      "failed": 0}
        self._pending: list[StepOutput] = []
        self._params: list[torch.Tensor] = []
        self._idle = True
        self._weights = self._weights_version(refresh=True)

    def _weights_version(self, refresh: bool) -> int:
        # in-place updates (optimizer steps, load_state_dict, merges) bump a tensor's version counter: a trainer
        # stepping the live adapter between rollouts must not be served keys cached under the old weights.
        # Walking the module tree costs ~1 ms, so the tensor list is rebuilt only when the engine starts work
        # after being idle (where trainers change weights and modules); busy steps re-read its counters.
        if refresh:
            self._params = list(self.model.parameters()) + self.adapters.live_tensors()
        return sum(p._version for p in self._params)

    def clear_prefix_cache(self) -> None:
        self.pool.forget()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: int | None = None, adapter: str | None = None) -> int:
        params = params or SamplingParams()
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if adapter is not None and adapter not in self.adapters.registered:
            raise KeyError(f"adapter {adapter!r} is not registered")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                             f"exceeds the engine's context of {self.max_seq_len} tokens")
        blocks = -(-need // self.block_size)
        if blocks > len(self.pool.refs) - 1:
            raise ValueError(f"a sequence of {need} tokens needs {blocks} KV blocks but the budget holds "
                             f"{len(self.pool.refs) - 1}; raise kv_budget_bytes")
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n} exceeds the engine's max_batch of {self.max_batch}")
        rid = next(self.ids) if request_id is None else request_id
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            matcher = params.grammar.matcher() if params.grammar is not None else None
            seqs.append(Sequence(rid, i, list(prompt_ids), params, gen, adapter, matcher=matcher))
        self.waiting.append(seqs)
        return rid

    def abort(self, request_ids: int | Iterable[int]) -> None:
        """Drop these requests wherever they are (waiting, prefilling, running); one pass over the queues
        whatever their number, so a client aborting thousands of prompts costs one rebuild, not one each."""
        ids = {request_ids} if isinstance(request_ids, int) else set(request_ids)
        if not ids:
            return
        if any(g[0].request_id in ids for g in self.waiting):
            self.waiting = deque(g for g in self.waiting if g[0].request_id not in ids)
        if self.prefilling and self.prefilling[0].request_id in ids:
            for s in self.prefilling:
                self._free(s)
            self.prefilling = None
        gone = [s for s in self.running if s.request_id in ids]
        for s in gone:
            s.finish_reason = "abort"
            self._pending.append(StepOutput(s.request_id, s.index, [], [], True, "abort"))
            self._free(s)
        if gone:
            self.running = [s for s in self.running if s.request_id not in ids]
        self.stats["aborted"] += len(ids)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running) + (len(self.prefilling) if self.prefilling else 0)

    @property
    def kv_blocks_used(self) -> int:
        return len(self.pool.refs) - 1 - self.pool.available

    # ------------------------------------------------------------------ blocks
    def _free(self, seq: Sequence) -> None:
        for b in seq.blocks:
            self.pool.drop(b)
        seq.blocks, seq.cached = [], 0
        if seq.slot:
            self.adapters.release(seq.adapter)
            seq.slot = 0

    def _key(self, seq: Sequence, end: int) -> tuple:
        return (seq.adapter, tuple(seq.prompt[:end]))

    def _admit(self, group: list[Sequence], outputs: list) -> bool:
        """Give the group's first sequence its adapter slot and the blocks of its context (cached prefix
        blocks held, fresh ones allocated); False (nothing taken) if they do not fit now. An adapter that
        cannot be loaded (its files changed or vanished since it was registered) finishes this request with
        finish_reason "error" and the reason; the other requests go on."""
        first, bs = group[0], self.block_size
        ctx = first.context
        hits = []
        for end in range(bs, len(ctx), bs):          # full prompt blocks, leaving >= 1 token to compute
            if end > len(first.prompt):
                break
            b = self.pool.lookup(self._key(first, end))
            if b is None:
                break
            hits.append(b)
        fresh = -(-len(ctx) // bs) - len(hits)
        spare = len(group) - 1                        # the other samples' copies of the partial last block
        if self.pool.available - sum(self.pool.refs[b] == 0 for b in hits) < fresh + spare + 1:
            return False
        if first.adapter is not None:
            try:
                slot = self.adapters.acquire(first.adapter)
            except Exception as e:     # noqa: BLE001 - any failure to load it fails this request alone
                self.waiting.remove(group)
                for s in group:
                    s.finish_reason = "error"
                    outputs.append(StepOutput(s.request_id, s.index, [], [], True, "error",
                                              error=f"adapter {first.adapter!r} could not be loaded: {e}"))
                self.stats["failed"] += 1
                return False
            if slot is None:
                return False
            first.slot = slot
        for b in hits:
            self.pool.hold(b)
        first.blocks = hits + [self.pool.alloc() for _ in range(fresh)]
        first.cached = len(hits) * bs
        self.stats["prefix_cache_hit_tokens"] += first.cached
        return True

    def _preempt_newest(self) -> Sequence:
        victim = max(self.running, key=lambda s: (s.request_id, s.index))
        self.running.remove(victim)
        self._free(victim)
        self.waiting.appendleft([victim])
        self.stats["preemptions"] += 1
        return victim

    def _grow(self, seqs: list[Sequence]) -> list[Sequence]:
        """Each decoding sequence gets a block for the position it writes; preempt the newest when none is
        free. Returns the sequences still running."""
        for s in sorted(seqs, key=lambda s: (s.request_id, s.index)):
            while s in self.running and (s.length - 1) // self.block_size >= len(s.blocks):
                b = self.pool.alloc()
                if b is not None:
                    s.blocks.append(b)
                elif self._preempt_newest() is s:
                    break
        return [s for s in seqs if s in self.running]

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        self.stats["steps"] += 1
        version = self._weights_version(refresh=self._idle)
        if version != self._weights:
            self.clear_prefix_cache()
            self._weights = version
        outputs, self._pending = self._pending, []
        decoding = self._grow([s for s in self.running if s.tokens])
        if decoding:
            self._decode(decoding, outputs)
        self._prefill(outputs)
        self._idle = not self.has_unfinished()
        return outputs

    def _forward(self, seqs, ids, pos, **kw):
        self.cache.bind([s.blocks for s in seqs], pos)
        self.adapters.set_rows([s.slot for s in seqs], self.device)
        try:
            return self.model(ids, positions=pos, cache=self.cache, **kw)
        finally:
            self.adapters.set_rows(None)

    def _prefill(self, outputs):
        """Compute up to `prefill_chunk` context tokens, over as many waiting requests as fit, in one forward (or
        a few, grouped by length: _padding_groups)."""
        budget, batch = self.prefill_chunk, []                       # (group, start, end)
        computing: set[tuple] = set()                                # first-block keys computed in this forward
        skip = 0                                                     # waiting groups passed over this step
        while budget > 0:
            if self.prefilling is None:
                if skip >= len(self.waiting) or self.num_running + len(self.waiting[skip]) > self.max_batch:
                    break
                group = self.waiting[skip]
                head = self._first_block_key(group[0])
                if head is not None and head in computing and self.pool.lookup(head) is None:
                    # its prefix is being computed in this forward: next step it is a cache hit. Look past it
                    # (it keeps its place at the head of the queue); anything else that cannot start stops here
                    skip += 1
                    continue
                if not self._admit(group, outputs):
                    break
                del self.waiting[skip]
                self.prefilling = group
            first = self.prefilling[0]
            if first.cached == 0:
                computing.add(self._first_block_key(first))
            ctx = first.context
            start, end = first.cached, min(len(ctx), first.cached + budget)
            batch.append((self.prefilling, start, end))
            budget -= end - start
            first.cached = end
            if end < len(ctx):
                break                                                # the rest of it next step
            self.running.append(first)
            self.prefilling = None
        if not batch:
            return
        last_hidden = {}                                             # batch index -> hidden state of its last token
        for part in _padding_groups([e - s for _, s, e in batch]):
            T = max(batch[i][2] - batch[i][1] for i in part)
            ids = torch.zeros(len(part), T, dtype=torch.long)
            pos = torch.full((len(part), T), -1, dtype=torch.long)
            for row, i in enumerate(part):
                g, s, e = batch[i]
                ids[row, :e - s] = torch.tensor(g[0].context[s:e])
                pos[row, :e - s] = torch.arange(s, e)
            hidden, _ = self._forward([batch[i][0][0] for i in part], ids.to(self.device), pos.to(self.device),
                                      return_hidden=True)
            for row, i in enumerate(part):
                last_hidden[i] = hidden[row, batch[i][2] - batch[i][1] - 1]
        self.stats["prefill_tokens"] += sum(e - s for _, s, e in batch)
        done = [(i, g) for i, (g, s, e) in enumerate(batch) if e == len(g[0].context)]
        for _, g in done:
            self._publish(g[0])
        fresh = [(i, g) for i, g in done if not g[0].tokens]             # recomputed sequences need no sample
        if not fresh:
            return
        for _, g in fresh:
            self._share_prefill(g)
        last = torch.stack([last_hidden[i] for i, _ in fresh])                      # [b, D]
        logits = self.model.lm_head(last)
        seqs = [s for _, g in fresh for s in g if s in self.running]
        rows = torch.tensor([j for j, (_, g) in enumerate(fresh) for s in g if s in self.running])
        self._sample(seqs, logits[rows], outputs)

    def _first_block_key(self, seq: Sequence) -> tuple | None:
        """The prefix-cache key of the sequence's first prompt block, None when its prompt has no full block."""
        return self._key(seq, self.block_size) if len(seq.prompt) > self.block_size else None

    def _publish(self, seq: Sequence) -> None:
        """Offer the sequence's full prompt blocks to the prefix cache."""
        bs = self.block_size
        for j in range(len(seq.prompt) // bs):
            self.pool.publish(self._key(seq, (j + 1) * bs), seq.blocks[j])

    def _share_prefill(self, group):
        """The n samples of a request share the prompt's full blocks; each gets a copy of the partial last one.
        A sample that finds no free block waits, to be prefilled later (from the prefix cache)."""
        first, bs = group[0], self.block_size
        L = len(first.prompt)
        full = L // bs
        for s in group[1:]:
            blocks = first.blocks[:full]
            if L % bs:
                b = self.pool.alloc()
                if b is None:
                    self.waiting.appendleft([s])
                    continue
                for K in self.cache.k + self.cache.v:
                    K[b * bs:b * bs + L % bs] = K[first.blocks[full] * bs:first.blocks[full] * bs + L % bs]
                blocks = blocks + [b]
            if s.adapter is not None:
                s.slot = self.adapters.acquire(s.adapter)            # the slot is loaded and pinned already
            for b in first.blocks[:full]:
                self.pool.hold(b)
            s.blocks, s.cached = blocks, L
            self.running.append(s)
            self.stats["shared_prefill_tokens"] += L

    def _decode(self, seqs: list[Sequence], outputs):
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        pos = torch.tensor([[s.length - 1] for s in seqs], device=self.device)
        cons = [i for i, s in enumerate(seqs) if s.matcher is not None]   # masks for constrained rows only,
        pending = constrained.PendingMasks([seqs[i].params.grammar for i in cons],   # computed during the forward
                                           [seqs[i].matcher for i in cons], self.model.cfg.vocab_size) if cons else None
        logits, _ = self._forward(seqs, ids, pos)
        for s in seqs:
            s.cached = s.length
        self.stats["decode_tokens"] += len(seqs)
        self._sample(seqs, logits[:, -1], outputs, pending)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, outputs, pending=None):
        params = [s.params for s in seqs]
        cons = [i for i, s in enumerate(seqs) if s.matcher is not None]
        allowed = None
        if cons:
            masks = pending.result() if pending is not None else constrained.allowed(
                [seqs[i].params.grammar for i in cons], [seqs[i].matcher for i in cons], logits.shape[-1])
            allowed = {i: masks[j].to(logits.device) for j, i in enumerate(cons)}
        tokens, logps, tops = sample(logits, params, [s.generator for s in seqs], self.gen, allowed)
        for i, s in enumerate(seqs):
            t, lp = int(tokens[i]), float(logps[i])
            if s.matcher is not None:
                s.matcher.consume_token(t)     # a refused token leaves it broken: its mask is then EOS alone
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
                self.running.remove(s)

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
