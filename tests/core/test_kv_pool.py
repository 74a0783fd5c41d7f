"""The paged KV pool: a batched pass over pooled sessions gives each one exactly what
it would get alone with transformers' own cache; rollback is a length pointer; a pool
that is full refuses a session up front and changes nothing for the others."""

import pytest
import torch
from tiny_models import hf_greedy, noisy_copy, plain_logits, tiny

from services.bench.loopback import Loopback, run
from services.core.errors import PoolExhausted
from services.core.kv_pool import BLOCK_TOKENS, contiguous_run, kv_bytes_per_token
from services.core.target import Feed, TargetRunner


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
def test_a_pooled_batch_equals_each_session_alone(family):
    model = tiny(family, seed=0)
    g = torch.Generator().manual_seed(1)
    cached = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (0, 3, 21, 6)]  # 21 spans two blocks
    feeds = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (4, 1, 5, 9)]
    runner = TargetRunner(model, kv_cache_bytes=2**20)
    for i, prefix in enumerate(cached):
        if prefix:
            runner.forward([Feed(str(i), 0, prefix, 1)])
    got = runner.forward([Feed(str(i), len(p), f, len(f)) for i, (p, f) in enumerate(zip(cached, feeds))])
    for prefix, feed, logits in zip(cached, feeds, got):
        expected = plain_logits(model, prefix + feed)[-len(feed):]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_rollback_keeps_blocks_and_release_returns_them():
    model = tiny("llama", seed=0)
    runner = TargetRunner(model, kv_cache_bytes=2**20)
    free = len(runner.pool.free)
    runner.forward([Feed("a", 0, list(range(3, 40)), 1)])  # 37 positions: 3 blocks
    assert len(runner.sessions["a"].blocks) == 3 and len(runner.pool.free) == free - 3
    (after,) = runner.forward([Feed("a", 20, [7, 8], 1)])  # reject 17 positions: a length pointer
    assert len(runner.sessions["a"].blocks) == 3 and len(runner.sessions["a"]) == 22
    torch.testing.assert_close(after, plain_logits(model, list(range(3, 23)) + [7, 8])[-1:],
                               rtol=1e-5, atol=1e-5)
    runner.release(["a"])
    assert len(runner.pool.free) == free and runner.cached_positions() == 0


def test_a_lone_session_reads_the_pool_in_place_or_gathers_when_its_blocks_are_apart():
    """A pass over one session whose blocks are consecutive attends over a view of the
    pool; one whose blocks are not gathers them. Both give a cold forward's logits."""
    model = tiny("llama", seed=0)
    runner = TargetRunner(model, kv_cache_bytes=2**20)
    prompt = list(range(3, 3 + BLOCK_TOKENS - 2))
    runner.forward([Feed("a", 0, prompt, 1)])  # a: one block
    runner.forward([Feed("b", 0, prompt, 1)])  # b: the next block
    runner.forward([Feed("c", 0, prompt, 1)])
    runner.pool.reserve([runner.sessions["c"]], [3 * BLOCK_TOKENS])  # c: consecutive blocks
    runner.forward([Feed("a", len(prompt), [40, 41, 42, 43], 2)])  # a's second block is after c's
    a, c = runner.sessions["a"], runner.sessions["c"]
    assert contiguous_run(a, len(a)) is None and contiguous_run(c, 2 * BLOCK_TOKENS) is not None
    for session in ("a", "c"):
        seq = runner.sessions[session]
        (logits,) = runner.forward([Feed(session, len(seq), [50, 51, 52, 53, 54], 5)])
        cold = plain_logits(model, seq.tokens)[-5:]
        torch.testing.assert_close(logits, cold, rtol=1e-5, atol=1e-5)


def test_a_session_starts_from_blocks_another_one_computed():
    """Shared prefix blocks exported by one session are written into a new session's
    blocks (after the pool already served passes) and give the logits of a cold prefill."""
    model = tiny("qwen2", seed=0)
    runner = TargetRunner(model, kv_cache_bytes=2**20)
    runner.forward([Feed("a", 0, list(range(3, 40)), 1)])
    blocks = [runner.export("a", 0, 16), runner.export("a", 16, 32)]
    runner.prefill("b", list(range(3, 35)) + [60, 61], blocks)
    (warm,) = runner.forward([Feed("b", 34, [62], 1)])
    cold = plain_logits(model, list(range(3, 35)) + [60, 61, 62])[-1:]
    torch.testing.assert_close(warm, cold, rtol=1e-5, atol=1e-5)


def test_a_full_pool_refuses_up_front_and_changes_nothing():
    model = tiny("llama", seed=0)
    per_block = kv_bytes_per_token(model.config, model.dtype) * BLOCK_TOKENS
    runner = TargetRunner(model, kv_cache_bytes=5 * per_block)  # 4 usable blocks (one is scratch)
    runner.forward([Feed("a", 0, list(range(3, 35)), 1)])  # 2 blocks
    before = (list(runner.pool.free), list(runner.sessions["a"].blocks), list(runner.sessions["a"].tokens))
    with pytest.raises(PoolExhausted, match="free positions"):
        runner.forward([Feed("a", 32, [5], 1), Feed("b", 0, list(range(3, 50)), 1)])  # b needs 3
    assert (list(runner.pool.free), runner.sessions["a"].blocks, runner.sessions["a"].tokens) == before
    assert "b" not in runner.sessions
    (logits,) = runner.forward([Feed("a", 32, [5], 1)])  # "a" goes on, exactly
    torch.testing.assert_close(logits, plain_logits(model, list(range(3, 35)) + [5])[-1:],
                               rtol=1e-5, atol=1e-5)


def test_served_sessions_over_the_pool_are_refused_and_the_rest_unharmed():
    """A pool with room for two sessions' budgets: of three concurrent sessions one is
    refused at admission with the reason, the other two decode exactly."""
    target = tiny("llama", seed=1)
    draft = noisy_copy(target, 2, 0.3)
    prompt, new = [5, 17, 33, 2, 9], 40
    budget_blocks = -(-(len(prompt) + new + 17) // BLOCK_TOKENS)  # what a session reserves
    per_block = kv_bytes_per_token(target.config, target.dtype) * BLOCK_TOKENS

    async def go():
        import asyncio

        async with Loopback(target, draft, kv_cache_bytes=(2 * budget_blocks + 1) * per_block) as loop:
            results = await asyncio.gather(*[loop.generate(prompt, new, gamma=3) for _ in range(3)],
                                           return_exceptions=True)
            after = await loop.generate(prompt, new, gamma=3)  # the pool is free again
            pool = loop.verifier.engine.verifier.runner.pool
            for _ in range(200):  # a session's release is queued behind the passes
                if len(pool.free) == pool.num_blocks - 1:
                    break
                await asyncio.sleep(0.01)
            return results, after, len(pool.free) == pool.num_blocks - 1

    results, after, all_free = run(go())
    assert all_free  # every block came back
    refused = [r for r in results if isinstance(r, PoolExhausted)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) == 1 and "retry" in str(refused[0])
    expected = hf_greedy(target, prompt, new, eos=None)
    assert [tokens for tokens, _ in served] == [expected, expected] and after[0] == expected
