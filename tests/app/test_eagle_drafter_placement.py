"""EAGLE-3 on the draft workers of a real local cluster (``eagle.placement: drafter``):
the verifier sends the target's fused features over the draft stream and the worker
drafts, pipelined; greedy output over the public gRPC API is target-only decoding."""

import pytest
from serving_cluster import serving_cluster, target_only
from services.gateway.client import make_request
from services.models.loading import bundled_paths
from services.models.pair import load_pair

PROMPTS = ["def parse_args(argv):", "class Stack:\n    def push(self, item):"]


@pytest.fixture(scope="module")
def server():
    # Every round drafts, whatever passes cost on this machine: the tests check what the
    # drafted rounds send.
    with serving_cluster({"eagle": {"placement": "drafter"}, "gamma_policy": "requested"}) as (client, _):
        yield client


@pytest.fixture(scope="module")
def pair():
    return load_pair(bundled_paths(), with_draft=False)


@pytest.mark.parametrize("tree", ["", "3,2,6"], ids=["saved-chain", "tree"])
def test_eagle_drafted_on_the_draft_worker_is_target_only_decoding(server, pair, tree):
    for prompt in PROMPTS:
        chunks = list(server.generate(make_request(prompt, 40, method="eagle", tree=tree), timeout=120))
        assert [t for c in chunks for t in c.token_ids] == target_only(pair, prompt, 40)
        stats = chunks[-1].stats
        # Drafts came over the stream (draft_bytes), features went the other way.
        assert stats.draft_bytes > 0 and stats.feature_bytes > 0 and stats.accepted > 0
        assert stats.draft_shape == ("eagle6:d3k2" if tree else "eagle4:d4k1")
        assert stats.pipeline_rounds > 0
        if not tree:  # the saved chain: early blocks drafted from the drafter's own features
            assert stats.branches_drafted > 0


def test_a_prompt_whose_prefix_is_cached_still_sends_every_positions_features(server, pair):
    """The second time, the prompt's KV blocks are in the shared prefix cache; EAGLE's
    drafter reads every position's features, which they do not hold, so the verifier
    computes the prompt again and sends the worker all of its features, not only the
    uncached tail's (which made it draft so poorly that drafting was switched off)."""
    prompt = "def merge_sorted(left, right):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n" * 6
    prompt_len = len(pair.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert prompt_len > 2 * 64  # two prefix blocks and more
    runs = [list(server.generate(make_request(prompt, 32, method="eagle", pipeline=False), timeout=120))
            for _ in range(2)]
    second = runs[1][-1].stats
    assert [t for c in runs[1] for t in c.token_ids] == [t for c in runs[0] for t in c.token_ids]
    assert second.cached_prefix_tokens == 0
    # The open alone sends every prompt position's feature but the last's (bf16, H each):
    # however many rounds later drafted, at least that much went.
    assert second.feature_bytes >= (prompt_len - 1) * 2 * pair.target.config.hidden_size
