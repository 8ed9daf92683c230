"""Tokenizer wrapper: chat template equal to transformers', incremental decoding, stop strings."""
import json

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from rftkit.tokenizer import IncrementalDecoder, Tokenizer, find_stop

TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def tok_dir(tmp_path):
    # byte-level BPE with an empty merge list: every byte is a token (so UTF-8 splits across tokens)
    vocab = {c: i for i, c in enumerate(sorted(set(pre_tokenizers.ByteLevel.alphabet())))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tmp_path


def test_chat_template_matches_transformers(tok_dir):
    import transformers
    ours = Tokenizer.from_dir(tok_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for msgs in ([{"role": "user", "content": "What is 2 + 2?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Ça va?"}]):
        for gen in (True, False):
            expected = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == expected
            assert ours.encode_chat(msgs, gen) == ref(expected, add_special_tokens=False)["input_ids"]
    assert ours.eos_token_ids == [ours.backend.token_to_id("<|im_end|>")]


def test_incremental_decoding_joins_to_full_decode_without_broken_chars(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    text = "Grüße, 世界! 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)          # multi-byte characters span several tokens
    dec = IncrementalDecoder(tok)
    deltas = [dec.add([i]) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_find_stop_holds_back_partial_matches():
    assert find_stop("the answer is 4\n\nNext", ["\n\n"]) == (15, 0)
    assert find_stop("the answer is 4\n", ["\n\n"]) == (None, 1)       # could become "\n\n"
    assert find_stop("abc", ["xyz", "bcd"]) == (None, 2)
    assert find_stop("abc", []) == (None, 0)


def test_bad_messages_and_missing_files_named(tok_dir, tmp_path):
    tok = Tokenizer.from_dir(tok_dir)
    with pytest.raises(ValueError, match="message 0"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "bad")
