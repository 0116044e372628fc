"""Tokenizer, chat template and streaming detokenization."""
import pytest

from models.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Plain English with spaces.",
    "Héllo wörld — naïve café, 你好世界, emojis 🎉🐍👩‍💻 in a row",
    "def f(x):\n    return x  # two spaces\n\n\tindented",
    "   leading and trailing spaces   ",
    "URLs like https://example.com/a?b=c&d=e and numbers 3.14159",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("Say:")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detokenizer.add([i]) for i in ids]
    assert "".join(deltas) == tokenizer.decode(ids) == detokenizer.text
    assert not any("\ufffd" in d for d in deltas)


def test_several_tokens_at_once_stream_the_same(tokenizer):
    ids = tokenizer.encode(TEXTS[1])
    detokenizer = IncrementalDetokenizer(tokenizer)
    out = "".join(detokenizer.add(ids[i:i + 3]) for i in range(0, len(ids), 3))
    assert out == tokenizer.decode(ids)


def test_chat_template_is_chatml(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


def test_eos_is_im_end(tokenizer):
    assert tokenizer.convert_ids_to_tokens(sorted(tokenizer.eos_token_ids)) == ["<|im_end|>"]
