"""Streamed text deltas add up to the decoded text, never splitting a character."""

from services.models.detokenizer import IncrementalDetokenizer, StopScanner
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


def scan(stops, ids, chunk, min_tokens=0, earlier=()):
    """Feeds ``ids`` ``chunk`` at a time; (tokens kept, text streamed, the stop matched)."""
    tokenizer = load_tokenizer(bundled_paths().target)
    scanner = StopScanner(tokenizer, stops, min_tokens, list(earlier))
    kept, text = [], []
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        kept += part[: scanner.feed(part)]
        text.append(scanner.text_out())
        if scanner.matched is not None:
            break
    text.append(scanner.text_out(final=True))
    return kept, "".join(text), scanner.matched


def test_a_stop_inside_a_multibyte_character_sequence_ends_at_the_token_completing_it():
    tokenizer = load_tokenizer(bundled_paths().target)
    text = 'x = "日本" + y and more'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # 日 and 本 are three byte-tokens each
    for chunk in (1, 4, len(ids)):  # token by token, across rounds, one round
        kept, streamed, matched = scan(("本",), ids, chunk)
        assert matched == "本" and streamed == 'x = "日'
        assert tokenizer.decode(kept).endswith("本") and not tokenizer.decode(kept[:-1]).endswith("本")


def test_streamed_text_never_shows_a_stop_split_across_rounds():
    tokenizer = load_tokenizer(bundled_paths().target)
    text = "def f(x):\n    return x\n\nprint(f(2))"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for chunk in (1, 2, 3, 5):
        kept, streamed, matched = scan(("\n\n", "zzz"), ids, chunk)
        assert (streamed, matched) == ("def f(x):\n    return x", "\n\n")
        assert tokenizer.decode(kept) == "def f(x):\n    return x\n\n"
    kept, streamed, matched = scan(("never",), ids, 3)
    assert (kept, streamed, matched) == (ids, text, None)


def test_stops_count_from_min_tokens_and_across_a_resume():
    tokenizer = load_tokenizer(bundled_paths().target)
    ids = tokenizer("a, b, c, d", add_special_tokens=False)["input_ids"]
    first_comma = next(i for i, t in enumerate(ids) if "," in tokenizer.decode([t]))
    kept, _, matched = scan((",",), ids, 2, min_tokens=first_comma + 2)  # the first comma is too early
    assert matched == "," and len(kept) > first_comma + 1
    # A stream resumed after "a": the output so far is primed, and the stop still found.
    head = tokenizer("x = 日", add_special_tokens=False)["input_ids"]
    tail = tokenizer("本 ok", add_special_tokens=False)["input_ids"]
    kept, streamed, matched = scan(("日本",), tail, 1, earlier=head)
    assert matched == "日本" and len(kept) <= len(tail)
