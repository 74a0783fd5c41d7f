"""Streamed text deltas add up to the decoded text, never splitting a character."""

from services.models.detokenizer import IncrementalDetokenizer
from services.models.loading import bundled_paths, load_tokenizer


def test_deltas_concatenate_to_the_decoded_text_with_multibyte_characters():
    tokenizer = load_tokenizer(bundled_paths().target)
    text = "naïve café — 東京 🚀 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_chunks_of_several_tokens_add_up_too():
    tokenizer = load_tokenizer(bundled_paths().target)
    text = "def f(x):\n    return x * 2  # ok ✓ — ünïcödé 🚀🚀"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(ids[i : i + 3]) for i in range(0, len(ids), 3)] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
