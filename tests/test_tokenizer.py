"""Tokenizer wrapper: chat templates render as transformers renders them, incremental decoding joins to the full
decode without broken characters, stop strings hold back partial matches."""
import json
import random
import shutil

import jinja2
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers

from rftkit.tokenizer import IncrementalDecoder, Tokenizer, find_stop
from tests.conftest import CHAT_TEMPLATE

TEMPLATE = CHAT_TEMPLATE

# exercises what transformers sets up: trim/lstrip blocks, namespace, loop controls, raise_exception, tojson
# without HTML escaping, the {% generation %} tag, named special tokens, None keys dropped, reasoning aliases
KITCHEN_SINK = """{%- set ns = namespace(system=none, n=0) -%}
{{ bos_token }}
{% if tools %}
<tools>{{ tools | tojson }}</tools>
{% endif %}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m.role) }}
    {% endif %}
    {% if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <|im_start|>{{ m.role }} #{{ ns.n }}
    {% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>
    {% endif %}
    {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}
    {% if m.name is defined %}(name={{ m.name }}){% endif %}
<|im_end|>
{% endfor %}
{% if ns.system %}[system: {{ ns.system | tojson }}]{% endif %}
{% if add_generation_prompt %}<|im_start|>assistant{% if enable_thinking is false %} /no_think{% endif %}
{% endif %}
{{ pad_token }}|{{ unk_token is defined }}|{{ strftime_now('%Y') }}|{{ dict(a=1) | tojson }}"""


def _metaspace_dir(path):
    """A SentencePiece-style tokenizer (Llama 2 / Mistral): metaspace, byte fallback, leading space stripped."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    merges = [("a", "t"), ("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "c"), ("▁c", "at"),
              ("▁", "s"), ("▁s", "at")]
    pieces += ["▁", "a", "t", "c", "s", "m", "o", "n", "h", "e"] + ["".join(m) for m in merges]
    backend = Backend(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                                 byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<s>", "</s>"])
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def _ref(folder):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_chat_template_matches_transformers(tok_dir):
    ours, ref = Tokenizer.from_dir(tok_dir), _ref(tok_dir)
    for msgs in ([{"role": "user", "content": "What is 2 + 2?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Ça va?"}]):
        for gen in (True, False):
            expected = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == expected
            assert ours.encode_chat(msgs, gen) == ref(expected, add_special_tokens=False)["input_ids"]
    assert ours.eos_token_ids == [ours.backend.token_to_id("<|im_end|>")]


def test_template_environment_matches_transformers(tok_dir):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {**config, "chat_template": KITCHEN_SINK, "pad_token": "<|im_end|>"}))
    ours, ref = Tokenizer.from_dir(tok_dir), _ref(tok_dir)
    tools = [{"name": "add", "description": "a <b> & 'c' — ü", "parameters": {"x": {"type": "int"}}}]
    msgs = [{"role": "system", "content": "Sys <&>"}, {"role": "user", "content": "Hi", "name": None},
            {"role": "assistant", "content": "Hello", "thinking": "greet back", "name": "bot"},
            {"role": "user", "content": "Ça va?"}]
    for kwargs in ({}, {"tools": tools}, {"enable_thinking": False}):
        for gen in (True, False):
            expected = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kwargs)
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen, **kwargs) == expected
    assert "<think>greet back</think>" in expected and "(name=bot)" in expected and "name=None" not in expected
    assert "assistant /no_think" in ours.apply_chat_template(msgs, enable_thinking=False)
    bad = msgs + [{"role": "tool_x", "content": "?"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role tool_x") as theirs:
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(type(theirs.value), match="unknown role tool_x"):
        ours.apply_chat_template(bad)


def test_eos_ids_include_generation_config(tok_dir):
    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 5]}))
    (tok_dir / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.from_dir(tok_dir).eos_token_ids == [257, 5, 7]


def _stream(tok, ids, chunk):
    dec = IncrementalDecoder(tok)
    return [dec.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [dec.flush()]


def test_incremental_decoding_joins_to_full_decode_without_broken_chars(tok_dir, tmp_path):
    tok = Tokenizer.from_dir(tok_dir)
    text = "Grüße, 世界! 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)          # multi-byte characters span several tokens
    for chunk in (1, 2, 5):
        deltas = _stream(tok, ids, chunk)
        assert "".join(deltas) == tok.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)
    sp = Tokenizer.from_dir(_metaspace_dir(tmp_path / "sp"))
    text = "the cat sat on the mat 😺 — ok"
    ids = sp.encode(text)
    assert sp.backend.id_to_token(ids[0]) == "▁the" and any(sp.backend.id_to_token(i) == "<0xF0>" for i in ids)
    deltas = _stream(sp, ids, 1)
    assert "".join(deltas) == sp.decode(ids) == text and not any("\ufffd" in d for d in deltas)


def test_incremental_decoding_of_random_ids_equals_full_decode(tok_dir, tmp_path):
    rng = random.Random(0)
    for tok in (Tokenizer.from_dir(tok_dir), Tokenizer.from_dir(_metaspace_dir(tmp_path / "sp"))):
        for _ in range(200):     # random ids: invalid UTF-8, special tokens, lone spaces
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
            for skip in (True, False):
                dec = IncrementalDecoder(tok, skip_special_tokens=skip)
                deltas = [dec.add([i]) for i in ids] + [dec.flush()]
                assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), ids


def test_find_stop_holds_back_partial_matches():
    assert find_stop("the answer is 4\n\nNext", ["\n\n"]) == (15, 0)
    assert find_stop("the answer is 4\n", ["\n\n"]) == (None, 1)       # could become "\n\n"
    assert find_stop("abc", ["xyz", "bcd"]) == (None, 2)
    assert find_stop("x STOP y END", ["END", "STOP"]) == (2, 0)          # earliest, not first listed
    assert find_stop("abc", []) == (None, 0)
    # streaming: feed text in pieces, cut at the stop string wherever the pieces split it
    for cut in range(1, 12):
        full, shown = "12 + 34 = 46</ans> more", ""
        pending = ""
        for piece in (full[:cut], full[cut:]):
            pending += piece
            at, hold = find_stop(pending, ["</ans>"])
            if at is not None:
                shown += pending[:at]
                break
            shown, pending = shown + pending[:len(pending) - hold], pending[len(pending) - hold:]
        assert shown == "12 + 34 = 46"


def test_bad_messages_and_missing_files_named(tok_dir, tmp_path):
    tok = Tokenizer.from_dir(tok_dir)
    with pytest.raises(ValueError, match="message 0"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(FileNotFoundError, match="nowhere/tokenizer.json: no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad/tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "bad")
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="bad/tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path / "bad")


@pytest.mark.slow
def test_real_tokenizer_matches_transformers():
    from rftkit.loading.embedded import ensure_embedded
    folder = ensure_embedded()
    ours, ref = Tokenizer.from_dir(folder), _ref(folder)
    msgs = [{"role": "user", "content": "What is 12 + 34? Answer with just the number."}]
    for gen in (True, False):
        expected = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == expected
    text = "Grüße, 世界! 🙂  def f(x):\n\treturn x**2  # ok"
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.eos_token_ids == [ref.eos_token_id] == [2] and ours.vocab_size == len(ref) == 49152
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(40)]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        dec = IncrementalDecoder(ours)
        assert "".join([dec.add([i]) for i in ids] + [dec.flush()]) == ours.decode(ids)
