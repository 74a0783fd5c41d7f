"""A tensor-parallel target (TP=2, gloo on CPU, fp32) over real Ray actors: same
logits as TP=1, speculative greedy output identical to target-only, and a dead rank
fails the group promptly instead of hanging it."""

import asyncio
import time
from contextlib import contextmanager

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from tiny_models import hf_greedy, noisy_copy, tiny

from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.proposers import DraftModelProposer
from services.core.errors import PoolExhausted
from services.core.kv_pool import BLOCK_TOKENS, kv_bytes_per_token
from services.core.draft_q import SparseQ, compact
from services.core.proposals import Proposal
from services.core.sampling import Penalties, SamplingParams
from services.core.shaping import ContextCounts
from services.core.target import Feed, TargetRunner
from services.core.verifier import TargetVerifier, VerifyRequest
from services.state.client import ShardedPrefixSharing, StateClient
from services.state.store import SessionStore
from services.verifier.tensor_parallel import RankFailed, TensorParallelTarget

PROMPTS = [[5, 17, 33, 2, 9], [40, 41], [7, 8, 9, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    model = tiny("llama", seed=1)  # 4 attention heads, 2 KV heads: splits over 2 ranks
    path = tmp_path_factory.mktemp("target")
    model.save_pretrained(path)
    return model, str(path)


@contextmanager
def tp_group(path, **kwargs):
    """A TP=2 target in its own placement group, torn down afterwards."""
    group = placement_group([{"CPU": 0.1}] + [{"CPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(group.ready())
    tp = TensorParallelTarget(2, path, "cpu", "float32", False, rank_cpus=1, threads=1, group=group, **kwargs)
    try:
        yield tp
    finally:
        tp.shutdown()
        remove_placement_group(group)


def test_tp2_logits_match_tp1(cluster, target):
    model, path = target
    with tp_group(path) as tp:
        local = TargetRunner(model)
        rounds = [
            [Feed("a", 0, [5, 6, 7, 8, 9], 2), Feed("b", 0, [10, 11, 12], 3)],  # batched, mixed lengths
            [Feed("a", 4, [40, 41], 2), Feed("b", 3, [13], 1)],  # after a rollback of "a"
            [Feed("b", 4, [14, 15, 16], 3)],  # alone
        ]
        for feeds in rounds:
            for got, expected in zip(tp.forward(feeds), local.forward(feeds)):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # KV stays on the ranks, sharded; releasing it reaches every rank.
        assert tp.cached_positions() == local.cached_positions() == 6 + 7
        tp.release(["a", "b"])
        assert tp.cached_positions() == 0


def test_tp2_speculative_greedy_is_tp2_target_only(cluster, target):
    model, path = target
    with tp_group(path) as tp:
        draft = noisy_copy(model, seed=2, scale=0.3)
        plain = SpeculativeEngine(TargetVerifier(tp), None, None, 256)
        spec = SpeculativeEngine(TargetVerifier(tp), DraftModelProposer(draft), None, 256, GammaSchedule(4))
        for prompt in PROMPTS:
            expected = plain.generate(prompt, 30).token_ids
            result = spec.generate(prompt, 30)
            assert result.token_ids == expected
            assert expected == hf_greedy(model, prompt, 30, eos=None)  # and TP=1 agrees
            assert result.stats.rounds < 30  # drafts were accepted: it really speculated
        assert tp.cached_positions() == 0  # generate() releases its sessions


def _round(verifier, sessions, committed, params, gen):
    """One verification round of gamma 3 for each row, its outcome committed: drafts
    sampled from a random compact q (rows with a seed), or without q (greedy rows)."""
    V = 96  # tiny_models.VOCAB
    batch = []
    for kv, context, p in zip(sessions, committed, params):
        qs = [compact(torch.softmax(torch.randn(V, generator=gen) * 2, -1)) for _ in range(3)]
        tokens = torch.stack([torch.multinomial(q.dense()[0], 1, generator=gen)[0] for q in qs])
        proposal = Proposal(tokens, SparseQ.stack(qs) if not p.greedy else None)
        batch.append(VerifyRequest(kv, list(context), proposal, p, len(context), logprobs=2,
                                   counts=ContextCounts() if p.penalties.active else None))
    outcomes = verifier.verify(batch)
    for context, outcome in zip(committed, outcomes):
        context += outcome.tokens
    return outcomes


def test_tp2_accepts_on_rank_0_as_tp1_does(cluster, target):
    """Rank 0 accepts on the logits its last all-reduce left it and sends back only the
    outcomes: greedy, rejection-sampled, coupled and penalized rows with logprobs, in one
    batch, commit what TP=1 commits. A row acceptance fails on is the caller's error,
    and the group serves on."""
    model, path = target
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=3, coupled=False),
              SamplingParams(temperature=0.8, top_k=5, seed=4, coupled=True),
              SamplingParams(temperature=1.0, seed=5, coupled=False, prompt_len=2,
                             penalties=Penalties(1.3, 0.2, 0.1, ((7, 2.0),)))]
    with tp_group(path) as tp:
        remote, local = TargetVerifier(tp), TargetVerifier(TargetRunner(model))
        assert hasattr(tp, "verify")  # the path under test: acceptance on rank 0
        tp_sessions, local_sessions = [remote.new_state() for _ in params], [local.new_state() for _ in params]
        tp_committed, local_committed = [list(p) for p in PROMPTS + PROMPTS[:1]], [list(p) for p in PROMPTS + PROMPTS[:1]]
        accepted = 0
        for round in range(4):
            got = _round(remote, tp_sessions, tp_committed, params, torch.Generator().manual_seed(round))
            want = _round(local, local_sessions, local_committed, params, torch.Generator().manual_seed(round))
            assert [(o.num_accepted, o.tokens, o.path) for o in got] == [(o.num_accepted, o.tokens, o.path) for o in want]
            for g, w in zip(got, want):
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
            accepted += sum(o.num_accepted for o in got)
        assert accepted > 0, "some drafts were accepted"
        with pytest.raises(ValueError, match="seed resolved"):  # an unresolved seed: a bug upstream
            _round(remote, [remote.new_state()], [[5, 6, 7]], [SamplingParams(temperature=1.0)], torch.Generator())
        tp.check()
        got = _round(remote, tp_sessions, tp_committed, params, torch.Generator().manual_seed(9))
        want = _round(local, local_sessions, local_committed, params, torch.Generator().manual_seed(9))
        assert [o.tokens for o in got] == [o.tokens for o in want]


def test_a_pass_the_pool_cannot_hold_is_refused_and_the_group_serves_on(cluster, target):
    """Every rank refuses it alike (rank 0 leads, the others follow): RESOURCE_EXHAUSTED
    for that pass, and the next pass runs on every rank, the same as TP=1."""
    model, path = target
    per_token = kv_bytes_per_token(model.config, torch.float32, tp_size=2)
    with tp_group(path, kv_cache_bytes=per_token * BLOCK_TOKENS * 4) as tp:  # 3 usable blocks
        with pytest.raises(PoolExhausted):
            tp.forward([Feed("big", 0, list(range(2, 2 + 4 * BLOCK_TOKENS)), 1)])
        feeds = [Feed("a", 0, [5, 6, 7, 8, 9], 2)]
        torch.testing.assert_close(tp.forward(feeds)[0], TargetRunner(model).forward(feeds)[0], rtol=1e-5, atol=1e-5)
        tp.check()


def test_a_dead_rank_fails_the_group_instead_of_hanging(cluster, target):
    _, path = target
    with tp_group(path) as tp:
        tp.forward([Feed("a", 0, [5, 6, 7], 1)])
        tp.check()
        ray.kill(tp.ranks[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(RankFailed):
            tp.forward([Feed("a", 3, [8], 1)])
        assert time.monotonic() - start < 30, "the surviving rank must not be left waiting in a collective"
        with pytest.raises(RankFailed):
            tp.check()  # what Serve's health check calls


def test_tp2_prefill_starts_from_shards_another_group_published(cluster, target):
    model, path = target
    store = ray.remote(SessionStore).options(num_cpus=0).remote(2**24, 600.0)
    tokens = [(5 * i + 3) % 90 + 2 for i in range(14)]  # three full 4-token blocks

    async def lookup():
        return await ShardedPrefixSharing(StateClient(store), 4, "tp-test", 2).lookup(tokens)

    sharing = ShardedPrefixSharing(StateClient(store), 4, "tp-test", 2)
    with tp_group(path) as first:
        names, cached = asyncio.run(lookup())
        assert len(names) == 3 and cached == []
        first.prefill("a", tokens, cached)
        assert len(sharing.export(first, "a", names, 0)) == 3  # every rank published its shards
    # The group that computed the blocks is gone; its shards (3 blocks x 2 ranks) stay.
    assert ray.get(store.usage.remote())["prefix_blocks"] == 6
    with tp_group(path) as second:
        names, cached = asyncio.run(lookup())
        assert len(cached) == 3 and all(len(block.refs) == 2 for block in cached)
        second.prefill("b", tokens, cached)
        assert second.cached_positions() == len(tokens)
        cold = TargetRunner(model)
        cold.prefill("b", tokens, [])
        torch.testing.assert_close(second.forward([Feed("b", len(tokens), [7, 8], 2)])[0],
                                   cold.forward([Feed("b", len(tokens), [7, 8], 2)])[0], rtol=1e-5, atol=1e-5)
