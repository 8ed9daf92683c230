"""Multi-turn rollouts: a tool call parsed, run and fed back token-exactly; the loss mask on exactly the model's
tokens; turn and token limits; the engine's log-probs equal a full forward of the whole conversation; a
multi-turn GRPO step equal to a per-conversation reference in loss and gradients."""
import pytest
import torch

from rftkit.environments import Environment, ToolEnvironment
from rftkit.grpo import GRPOConfig, Rollouts, grpo_update, train
from rftkit.lora import LoRAConfig, apply_lora, lora_parameters
from rftkit.multiturn import Conversation, Limits, TurnCodec, run_conversations
from rftkit.sampling import SamplingParams
from rftkit.tokenizer import Tokenizer
from rftkit.tools import Toolbox, calculator
from tests.conftest import grpo_config, grpo_setup, tiny_model

EOS = 257                           # <|im_end|> in tok_dir's tokenizer


class ScriptedEngine:
    """Answers each conversation's turns from a script of texts (the model's tokens, EOS appended), and keeps
    every prompt it was sent."""

    def __init__(self, tok, script):
        self.tok, self.script, self.prompts = tok, script, []

    def generate(self, prompts, params):
        from rftkit.engine import Completion
        outs = []
        for p, sp in zip(prompts, params):
            self.prompts.append(list(p))
            ids = self.tok.encode(self.script.pop(0)) + [EOS]
            outs.append([Completion(0, 0, list(p), ids, [-0.5] * len(ids), "stop")])
        return outs


def _params(i, turn, max_tokens):
    return SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=100 * i + turn, stop_token_ids=[EOS])


def test_a_tool_call_is_run_and_its_result_fed_back_token_exactly(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    codec = TurnCodec(tok)
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>'
    engine = ScriptedEngine(tok, [call, "408"])
    sample = {"messages": [{"role": "user", "content": "What is 12 * 34?"}], "answer": "408"}
    conv = Conversation.start(ToolEnvironment(Toolbox([calculator])), sample, codec)
    assert "calculator" in tok.decode(conv.prompt)             # the tool's schema is shown (system text)
    run_conversations(engine, codec, [conv], Limits(max_turns=4, max_tokens=64, max_total_tokens=400), _params)
    assert conv.done and not conv.truncated and conv.turns == 2 and conv.last_text == "408"
    assert conv.messages[-2] == {"role": "tool", "content": "408"}        # the result, fed back
    first = tok.encode(call) + [EOS]
    # the second turn continues from the first turn's tokens as sampled, plus the tool's turn
    assert engine.prompts[1][:len(conv.prompt) + len(first)] == conv.prompt + first
    tool_turn = engine.prompts[1][len(conv.prompt) + len(first):]
    assert tok.decode(tool_turn, skip_special_tokens=False) == (
        "\n<|im_start|>tool\n<tool_response>\n408\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert conv.tokens == first + tool_turn + tok.encode("408") + [EOS]
    assert conv.mask == [1] * len(first) + [0] * len(tool_turn) + [1] * (len(tok.encode("408")) + 1)
    assert conv.logprobs == [-0.5] * len(first) + [0.0] * len(tool_turn) + [-0.5] * (len(tok.encode("408")) + 1)
    # the whole conversation is exactly what the template renders for it
    whole = codec._render(conv.messages, conv.env.tools, False)
    assert tok.decode(conv.prompt + conv.tokens, skip_special_tokens=False) == whole.rstrip("\n")


class Echo(Environment):
    """Never done: answers every turn with "again" (a reward of 0.25 each)."""

    def reset(self, sample):
        return [{"role": "user", "content": "Say something."}]

    def step(self, text):
        return [{"role": "user", "content": "again"}], False, 0.25

    def reward(self, messages):
        return 1.0


def _tiny_engine():
    from rftkit.engine import Engine
    model = tiny_model(vocab_size=258, max_seq_len=512)
    return model, Engine(model, max_seq_len=512, max_batch=8)


def test_turn_and_token_limits_are_enforced_and_recorded(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    codec = TurnCodec(tok)
    _, engine = _tiny_engine()
    convs = [Conversation.start(Echo(), {}, codec) for _ in range(3)]
    run_conversations(engine, codec, convs, Limits(max_turns=3, max_tokens=5, max_total_tokens=400), _params)
    for c in convs:
        assert c.truncated == "turns" and c.turns == 3 and sum(c.mask) <= 15
        assert c.reward() == pytest.approx(3 * 0.25 + 1.0)
    convs = [Conversation.start(Echo(), {}, codec) for _ in range(3)]
    run_conversations(engine, codec, convs, Limits(max_turns=50, max_tokens=5, max_total_tokens=60), _params)
    for c in convs:
        assert c.truncated == "tokens" and len(c.tokens) <= 60 and c.turns < 50
    with pytest.raises(ValueError, match="max_turns must be >= 1, got 0"):
        Limits(max_turns=0)


def test_engine_logprobs_of_a_conversation_equal_a_full_forward(tok_dir):
    # several turns through the engine (prefix cache, batched turns); every model token's log-prob must be the
    # one a single forward of the whole conversation gives: the conversation is the sequence the policy saw
    tok = Tokenizer.from_dir(tok_dir)
    codec = TurnCodec(tok)
    model, engine = _tiny_engine()
    convs = [Conversation.start(Echo(), {}, codec) for _ in range(4)]
    run_conversations(engine, codec, convs, Limits(max_turns=3, max_tokens=6, max_total_tokens=300), _params)
    for c in convs:
        ids = c.prompt + c.tokens
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)
        full = [float(lp[len(c.prompt) - 1 + t, tok_id]) for t, tok_id in enumerate(c.tokens)]
        model_tokens = [i for i, m in enumerate(c.mask) if m]
        assert c.turns == 3 and 0 < len(model_tokens) < len(c.tokens)
        for i in model_tokens:
            assert c.logprobs[i] == pytest.approx(full[i], abs=1e-4)


# ---- the multi-turn GRPO step against a per-conversation reference
PROMPTS = [[5, 6, 7, 8], [1, 2]]
COMPLETIONS = [[12, 13, 40, 41, 14], [15, 42, 16], [17, 18],       # group 0 (40.., 42: environment tokens)
               [19, 43, 44, 20, 21], [22], [23, 45, 24, 25]]       # group 1
MASKS = [[1, 1, 0, 0, 1], [1, 0, 1], [1, 1],
         [1, 0, 0, 1, 1], [1], [1, 0, 1, 1]]
REWARDS = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])


def _model():
    model = tiny_model(seed=1)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)
    return model


def _reference(model, loss_type, importance, L_max):
    """Each conversation on its own: a full forward, log-probs of its model tokens only, the papers'
    normalisers over model tokens."""
    terms, n_model = [], 0
    for g in range(2):
        r = REWARDS[g]
        adv = (r - r.mean()) / (r.std() + 1e-4)
        for j in range(3):
            row = g * 3 + j
            ids = PROMPTS[g] + COMPLETIONS[row]
            lp = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)
            lp = torch.stack([lp[len(PROMPTS[g]) - 1 + t, tok] for t, tok in enumerate(COMPLETIONS[row])
                              if MASKS[row][t]])                     # the model's tokens, nothing else
            ratio = torch.exp(lp - lp.detach())
            if importance == "sequence":
                ratio = torch.exp((lp - lp.detach()).mean().detach() + lp - lp.detach())
            terms.append(-torch.minimum(ratio * adv[j], ratio.clamp(0.8, 1.28) * adv[j]))
            n_model += len(lp)
    if loss_type == "grpo":
        return sum(t.mean() for t in terms) / len(terms)
    if loss_type == "dr_grpo":
        return sum(t.sum() for t in terms) / (len(terms) * L_max)
    return sum(t.sum() for t in terms) / n_model


@pytest.mark.parametrize("loss_type,importance", [("grpo", "token"), ("dapo", "token"), ("dr_grpo", "token"),
                                                  ("dapo", "sequence")])
def test_multi_turn_grpo_step_equals_the_per_conversation_reference(loss_type, importance):
    model = _model()
    cfg = GRPOConfig(loss_type=loss_type, importance=importance, tools=["calculator"], max_tokens=4, max_turns=2,
                     max_total_tokens=16, grad_clip=0.0, micro_batch_groups=1)
    assert cfg.spec().max_completion_len == 8                       # L_max: 2 turns x 4 tokens
    batch = Rollouts(PROMPTS, COMPLETIONS, REWARDS, [[0.0] * len(c) for c in COMPLETIONS], [False] * 6, MASKS,
                     [2, 2, 1, 2, 1, 2])
    stats = grpo_update(model, torch.optim.SGD(lora_parameters(model), lr=0.0), batch, cfg, step_optimizer=False)
    fast = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad()
    ref = _reference(model, loss_type, importance, 8)
    assert stats["loss"] == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-6)
    ref.backward()
    for a, p in zip(fast, lora_parameters(model)):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in fast) > 1e-3
    # the environment's tokens matter: without the mask the gradient differs
    model.zero_grad()
    grpo_update(model, torch.optim.SGD(lora_parameters(model), lr=0.0),
                Rollouts(PROMPTS, COMPLETIONS, REWARDS, batch.old_logprobs, batch.truncated), cfg,
                step_optimizer=False)
    assert max(float((a - p.grad).abs().max()) for a, p in zip(fast, lora_parameters(model))) > 1e-4


def test_rft_train_with_tools_runs_conversations(tmp_path, tok_dir):
    import json
    _, tok, task = grpo_setup(tok_dir)
    model = tiny_model(vocab_size=258, max_seq_len=1024)        # the byte tokenizer spells the tool schema out
    train(grpo_config(tmp_path, steps=2, tools=["calculator"], max_turns=2, max_total_tokens=40), model, tok, task,
          progress=False)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 1 <= r["turns"] <= 2 and 0 < r["model_token_frac"] <= 1 and "reward/env" in r
    with pytest.raises(ValueError, match="max_total_tokens must be >= 1, got 0"):
        grpo_config(tmp_path, tools=["calculator"], max_total_tokens=0)
