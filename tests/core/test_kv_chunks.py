"""KV chunks rebuild a cache exactly: a restored cache gives the logits of the original,
for every supported family whose layers can be shared; block names chain."""

import pytest
import torch
from tiny_models import tiny

from services.core.kv import KVState, extend
from services.core.kv_chunks import block_names, export_chunk, exportable, restore_kv
from services.core.target import TargetRunner

TOKENS = [5, 17, 33, 2, 9, 40, 41, 7, 8, 12, 19]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_chunks_restore_a_cache_with_the_same_next_logits(family):
    model = tiny(family, seed=0)
    kv = KVState.empty(model)
    extend(model, kv, TOKENS)
    chunks = [export_chunk(kv, 0, 4), export_chunk(kv, 4, 9)]
    restored = restore_kv(model, chunks)
    assert restored.tokens == TOKENS[:9] and restored.cache.get_seq_length() == 9
    expected = extend(model, kv_prefix(model, 9), [50, 51])
    torch.testing.assert_close(extend(model, restored, [50, 51]), expected, rtol=1e-5, atol=1e-5)
    # A chunk is a copy: the live cache growing or rolling back does not change it.
    before = chunks[0].keys[0].clone()
    kv.truncate(2)
    extend(model, kv, [60, 61, 62])
    assert torch.equal(chunks[0].keys[0], before)


def kv_prefix(model, n):
    kv = KVState.empty(model)
    extend(model, kv, TOKENS[:n])
    return kv


def test_restore_refuses_gaps_and_other_models():
    model = tiny("llama", seed=0)
    kv = kv_prefix(model, 8)
    with pytest.raises(ValueError, match="contiguous"):
        restore_kv(model, [export_chunk(kv, 0, 3), export_chunk(kv, 4, 8)])
    with pytest.raises(ValueError, match="layers"):
        restore_kv(tiny("llama", seed=0, layers=3), [export_chunk(kv, 0, 3)])
    with pytest.raises(ValueError, match="outside"):
        export_chunk(kv, 5, 9)


def test_sliding_window_caches_are_shared_exactly():
    """A sliding-window model's cache keeps every position (core/kv.py), so its chunks
    restore a cache with the original's logits, past the window too."""
    model = tiny("mistral", seed=0)
    model.config.sliding_window = 4
    kv = KVState.empty(model)
    extend(model, kv, TOKENS)
    assert exportable(kv)
    restored = restore_kv(model, [export_chunk(kv, 0, 6), export_chunk(kv, 6, len(TOKENS))])
    torch.testing.assert_close(extend(model, restored, [3])[-1], extend(model, kv, [3])[-1], rtol=1e-5, atol=1e-5)
    plain = KVState.empty(tiny("llama", seed=0))
    assert not exportable(plain)  # nothing cached yet


def test_a_prefill_from_shared_blocks_equals_a_cold_prefill():
    model = tiny("llama", seed=0)
    cold, warm = TargetRunner(model), TargetRunner(model)
    cold.prefill("a", TOKENS, [])
    blocks = [cold.export("a", 0, 4), cold.export("a", 4, 8)]
    warm.prefill("b", TOKENS, blocks)
    assert warm.cached_positions() == len(TOKENS)
    from services.core.target import Feed

    torch.testing.assert_close(warm.forward([Feed("b", len(TOKENS), [3, 4], 2)])[0],
                               cold.forward([Feed("a", len(TOKENS), [3, 4], 2)])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        warm.prefill("c", [1, 2, 3, 4, 5, 6, 7, 8, 9], blocks)
    assert cold.export("missing", 0, 4) is None and cold.export("a", 0, 99) is None


def test_block_names_chain_over_the_whole_prefix_and_the_model():
    a = block_names(list(range(20)), 8, "m1")
    assert len(a) == 2  # full blocks only
    assert block_names(list(range(17)), 8, "m1") == a
    # Same second block after a different first one: a different name.
    assert block_names([99] + list(range(1, 20)), 8, "m1")[1] != a[1]
    assert block_names(list(range(20)), 8, "m2") != a
