"""Batched forward passes give every sequence what it would get alone."""

import pytest
import torch
from tiny_models import tiny

from services.core.kv import KVState, extend, extend_batch
from services.core.target import Feed, TargetRunner


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
def test_batched_extend_matches_each_sequence_alone(family):
    model = tiny(family, seed=0)
    g = torch.Generator().manual_seed(1)
    # Mixed cache lengths (one empty) and mixed feed lengths.
    cached = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (0, 3, 11, 6)]
    feeds = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (4, 1, 5, 9)]
    keep = [4, 1, 3, 9]
    alone, batched = [], []
    for prefix in cached:
        for kvs in (alone, batched):
            kv = KVState.empty(model)
            if prefix:
                extend(model, kv, prefix)
            kvs.append(kv)
    expected = [extend(model, kv, f, k) for kv, f, k in zip(alone, feeds, keep)]
    got = extend_batch(model, batched, feeds, keep)
    for e, r in zip(expected, got):
        torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-5)
    # The caches left behind continue exactly like the ones built alone.
    for a, b in zip(alone, batched):
        assert a.tokens == b.tokens and b.cache.get_seq_length() == len(b.tokens)
        torch.testing.assert_close(extend(model, b, [7, 8], 2), extend(model, a, [7, 8], 2), rtol=1e-5, atol=1e-5)


def test_runner_keeps_sessions_apart_and_rolls_back_on_feed():
    model = tiny("llama", seed=0)
    runner = TargetRunner(model)
    runner.forward([Feed("a", 0, [5, 6, 7, 8], 1), Feed("b", 0, [9, 10], 1)])
    # "a" rejected its last two positions: keep 2 and feed a correction.
    (after_rollback, _) = runner.forward([Feed("a", 2, [40], 1), Feed("b", 2, [11], 1)])
    fresh = extend(model, KVState.empty(model), [5, 6, 40], 1)
    torch.testing.assert_close(after_rollback, fresh, rtol=1e-5, atol=1e-5)
    assert runner.sessions["a"].tokens == [5, 6, 40] and runner.sessions["b"].tokens == [9, 10, 11]
    with pytest.raises(ValueError, match="twice"):
        runner.forward([Feed("a", 3, [1], 1), Feed("a", 3, [2], 1)])
    with pytest.raises(ValueError, match="keep"):
        runner.forward([Feed("b", 9, [1], 1)])
    runner.release(["a", "b"])
    assert runner.sessions == {} and runner.cached_positions() == 0
