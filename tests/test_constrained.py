"""Constrained decoding in the engine: a JSON schema's mask makes a random model write valid JSON at
temperature 1, forced tool calls parse, and the masks of constrained rows never reach the free rows of a batch."""
import json

import jsonschema
import pytest
import torch

from tests.conftest import tiny_model

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", None]}}}
ADD = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["a", "b"],
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                   "b": {"type": "integer", "minimum": 0, "maximum": 999}}}}},
       {"type": "function", "function": {"name": "neg", "parameters": {
           "type": "object", "required": ["x"], "additionalProperties": False,
           "properties": {"x": {"type": "boolean"}}}}}]


@pytest.fixture
def setup(tok_dir):
    from rftkit.constrained import Grammars
    from rftkit.engine import Engine
    from rftkit.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tok_dir)
    model = tiny_model(vocab_size=258, max_seq_len=512)
    return Engine(model, max_seq_len=512, max_batch=32), tok, Grammars(tok, 258)


def _texts(engine, tok, prompts, params):
    return [[tok.decode(c.token_ids) for c in g] for g in engine.generate(prompts, params)]


def test_json_schema_mask_forces_valid_json_at_temperature_1(setup):
    from rftkit.sampling import SamplingParams
    engine, tok, grammars = setup
    g = grammars.json_schema(PERSON)
    prompts = [tok.encode_chat([{"role": "user", "content": f"person {i}"}]) for i in range(5)]
    params = SamplingParams(temperature=1.0, max_tokens=120, n=4, seed=3, grammar=g, stop_token_ids=[257])
    groups = engine.generate(prompts, params)
    assert all(c.finish_reason == "stop" for grp in groups for c in grp)        # every object closed, then EOS
    for grp in groups:
        for c in grp:
            jsonschema.validate(json.loads(tok.decode(c.token_ids)), PERSON)
            assert all(lp <= 0 and lp == lp for lp in c.logprobs)                # unmasked log-probs, finite
    free = engine.generate(prompts[:2], SamplingParams(temperature=1.0, max_tokens=40, seed=3, stop_token_ids=[257]))
    bad = 0
    for grp in free:                       # the same random model unmasked: not JSON (the mask did the work)
        try:
            json.loads(tok.decode(grp[0].token_ids))
        except ValueError:
            bad += 1
    assert bad == 2


def test_free_rows_of_a_mixed_batch_get_their_tokens_alone(setup):
    """Greedy and seeded free rows: exactly the tokens they get in a batch of free rows only."""
    from rftkit.sampling import SamplingParams
    engine, tok, grammars = setup
    prompts = [tok.encode_chat([{"role": "user", "content": f"say {i}" * (1 + i % 3)}]) for i in range(8)]
    free = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=24, ignore_eos=True)
            for i in range(8)]
    alone = _texts(engine, tok, prompts, free)
    g = grammars.json_schema(PERSON)
    mixed = [p if i % 2 == 0 or i == 1 else SamplingParams(temperature=0.0, max_tokens=60, grammar=g,
                                                           stop_token_ids=[257]) for i, p in enumerate(free)]
    both = _texts(engine, tok, prompts, mixed)
    for i in range(8):
        if mixed[i].grammar is None:
            assert both[i] == alone[i]
        else:
            json.loads(both[i][0])
            assert both[i] != alone[i]


def test_forced_tool_calls_parse_and_name_the_function(setup):
    from rftkit.sampling import SamplingParams
    from rftkit.tool_calls import parse_tool_calls
    engine, tok, grammars = setup
    prompt = [tok.encode_chat([{"role": "user", "content": "add 2 and 3"}])]
    counts = []
    for name, parallel in ((None, True), ("neg", False), ("add", False)):
        g = grammars.tool_calls(ADD, name=name, parallel=parallel)
        params = SamplingParams(temperature=1.0, max_tokens=300, n=6, seed=1, grammar=g, stop_token_ids=[257])
        for c in engine.generate(prompt, params)[0]:
            if parallel and c.finish_reason == "length":
                continue                   # parallel calls: the random model may go on calling
            parsed = parse_tool_calls(tok.decode(c.token_ids))
            assert c.finish_reason == "stop" and not parsed.errors and parsed.content == ""
            assert parsed.calls and (len(parsed.calls) == 1 or parallel)
            counts.append(len(parsed.calls))
            for call in parsed.calls:
                fn = next(t["function"] for t in ADD if t["function"]["name"] == call.name)
                assert name in (None, call.name)
                jsonschema.validate(call.arguments, fn["parameters"])
    assert len(counts) >= 14 and max(counts) > 1


def test_bad_grammars_are_errors_naming_them(setup):
    _, _, grammars = setup
    with pytest.raises(ValueError, match="response_format.*nonsense"):
        grammars.json_schema({"type": "nonsense"}, what="response_format")
    with pytest.raises(ValueError, match="no function named 'mul'"):
        grammars.tool_calls(ADD, name="mul")


def test_sampler_masks_only_the_listed_rows():
    """sample() with `allowed`: masked rows take allowed tokens only (greedy: the best allowed), free rows
    are untouched, and the log-probs are those of the unmasked distribution."""
    from rftkit.sampling import SamplingParams, sample
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=t) for t in (0.0, 0.0, 1.0, 1.0)]
    allowed = {1: torch.arange(50) % 7 == 3, 3: torch.arange(50) >= 45}
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    tokens, logps, _ = sample(logits, params, gens, None, allowed)
    assert int(tokens[0]) == int(logits[0].argmax())
    assert int(tokens[1]) == int(logits[1].masked_fill(~allowed[1], -1e9).argmax())
    assert int(tokens[3]) >= 45
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(logps, full.gather(1, tokens[:, None]).squeeze(1))
    for seed in range(30):        # a masked row never leaves its set, whatever the draw
        g = [torch.Generator().manual_seed(seed + k) for k in range(4)]
        t, _, _ = sample(logits, params, g, None, allowed)
        assert int(t[3]) >= 45 and int(t[1]) % 7 == 3


def test_grpo_rollouts_follow_response_format(tmp_path, tok_dir):
    """--response-format: every rollout completion is valid under the schema file; a bad value fails early."""
    from rftkit.constrained import response_grammar
    from rftkit.engine import Engine
    from rftkit.grpo import GRPOConfig, rollout
    from tests.conftest import digit_share, grpo_setup
    model, tok, task = grpo_setup(tok_dir)
    (tmp_path / "schema.json").write_text(json.dumps({"name": "person", "schema": PERSON}))
    cfg = GRPOConfig(prompts_per_step=2, group_size=4, max_tokens=80, steps=1,
                     response_format=str(tmp_path / "schema.json"))
    engine = Engine(model, max_seq_len=512, max_batch=8)
    grammar = response_grammar(cfg.response_format, tok, 258)
    batch, _, texts, _ = rollout(engine, tok, task, cfg, 0, {"task": digit_share}, {"task": 1.0}, {},
                                 grammar=grammar)
    assert len(texts) == 8 and not any(batch.truncated)
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)
    with pytest.raises(ValueError, match="response_format 'nope.json'"):
        GRPOConfig(response_format="nope.json")
