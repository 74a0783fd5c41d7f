"""KV chunks rebuild a cache exactly: a target session prefilled from another's blocks
gives the logits of a cold prefill (a draft state's exports: test_paged_kv.py); block
names chain."""

import pytest
import torch
from tiny_models import tiny

from services.core.kv_chunks import block_names
from services.core.target import Feed, TargetRunner

TOKENS = [5, 17, 33, 2, 9, 40, 41, 7, 8, 12, 19]


def test_a_prefill_from_shared_blocks_equals_a_cold_prefill():
    model = tiny("llama", seed=0)
    cold, warm = TargetRunner(model), TargetRunner(model)
    cold.prefill("a", TOKENS, [])
    blocks = [cold.export("a", 0, 4), cold.export("a", 4, 8)]
    warm.prefill("b", TOKENS, blocks)
    assert warm.cached_positions() == len(TOKENS)
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
