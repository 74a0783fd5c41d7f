"""Streamed text deltas add up to the decoded text, never splitting a character."""

from services.gateway.service import IncrementalDetokenizer
from services.models.loading import bundled_paths, load_tokenizer


def test_deltas_concatenate_to_the_decoded_text_with_multibyte_characters():
    tokenizer = load_tokenizer(bundled_paths().target)
    text = "naïve café — 東京 🚀 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
