"""Batched forward passes give every sequence what it would get alone."""

import pytest
import torch
from tiny_models import plain_logits, tiny

from services.core.target import Feed, TargetRunner


def test_runner_keeps_sessions_apart_and_rolls_back_on_feed():
    model = tiny("llama", seed=0)
    runner = TargetRunner(model)
    runner.forward([Feed("a", 0, [5, 6, 7, 8], 1), Feed("b", 0, [9, 10], 1)])
    # "a" rejected its last two positions: keep 2 and feed a correction.
    (after_rollback, _) = runner.forward([Feed("a", 2, [40], 1), Feed("b", 2, [11], 1)])
    fresh = plain_logits(model, [5, 6, 40])[-1:]
    torch.testing.assert_close(after_rollback, fresh, rtol=1e-5, atol=1e-5)
    assert runner.sessions["a"].tokens == [5, 6, 40] and runner.sessions["b"].tokens == [9, 10, 11]
    with pytest.raises(ValueError, match="twice"):
        runner.forward([Feed("a", 3, [1], 1), Feed("a", 3, [2], 1)])
    with pytest.raises(ValueError, match="keep"):
        runner.forward([Feed("b", 9, [1], 1)])
    runner.release(["a", "b"])
    assert runner.sessions == {} and runner.cached_positions() == 0
