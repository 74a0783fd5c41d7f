"""Concurrent sessions on one verifier replica are verified together in one forward
pass, and each one's output is exactly what it would be alone."""

import asyncio

import pytest
import torch

from services.bench.loopback import Loopback, run
from services.core.proposals import Proposal
from services.core.sampling import SamplingParams
from tiny_models import hf_greedy, noisy_copy, tiny

# Mixed prompt lengths, so the batch pads caches and feeds of different lengths.
PROMPTS = [[5, 17, 33, 2, 9], [40], [7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [3, 4],
           [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77], [21, 22, 23], [90, 2, 90], [11] * 9]
METHODS = [("draft", 4), ("draft", 2), ("ngram", 4), ("none", 0), ("draft", 6), ("ngram", 3), ("draft", 4), ("none", 0)]


@pytest.fixture(scope="module")
def pair():
    target = tiny("llama", seed=1)
    return target, noisy_copy(target, seed=2, scale=0.3)


def test_eight_concurrent_sessions_match_each_run_alone(pair):
    target, draft = pair

    async def go():
        async with Loopback(target, draft) as loop:
            results = await asyncio.gather(*[
                loop.generate(prompt, 30 + 3 * i, method=method, gamma=gamma or 1)
                for i, (prompt, (method, gamma)) in enumerate(zip(PROMPTS, METHODS))
            ])
            await loop.verifier.batcher.run(None, lambda: None)  # releases are queued: let them run
            return results, loop.verifier.batcher.batch_sizes, loop.verifier.engine.verifier.runner.sessions

    results, batch_sizes, left = run(go())
    for i, (prompt, (tokens, _)) in enumerate(zip(PROMPTS, results)):
        assert tokens == hf_greedy(target, prompt, 30 + 3 * i, eos=None), f"session {i}"
    assert max(batch_sizes) >= 4, "sessions were not verified together"
    assert left == {}, "finished sessions must free their target KV"


def test_sampled_sessions_reproduce_their_seeded_output_when_batched(pair):
    target, draft = pair
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(6)]

    async def go(concurrent):
        async with Loopback(target, draft) as loop:
            calls = [loop.generate(PROMPTS[i], 24, params=p) for i, p in enumerate(params)]
            if concurrent:
                return [tokens for tokens, _ in await asyncio.gather(*calls)]
            return [(await call)[0] for call in calls]

    assert run(go(True)) == run(go(False))


def test_a_session_that_fails_does_not_fail_its_batch(pair):
    target, _ = pair

    async def go():
        async with Loopback(target, target) as loop:
            engine, batcher = loop.verifier.engine, loop.verifier.batcher
            seqs = [engine.start(p, 8, SamplingParams()) for p in PROMPTS[:4]]
            await asyncio.gather(*[batcher.run(s, engine.prefill, s) for s in seqs])
            outside = Proposal(tokens=torch.tensor([1, 10**6]))  # a token the target has no embedding for
            proposals = [Proposal.empty(), outside, Proposal.empty(), Proposal.empty()]
            return await asyncio.gather(*[batcher.verify(s, p) for s, p in zip(seqs, proposals)],
                                        return_exceptions=True)

    results = run(go())
    assert isinstance(results[1], IndexError)
    for i in (0, 2, 3):
        assert results[i].tokens == hf_greedy(target, PROMPTS[i], 1, eos=None)


def test_a_controller_that_fails_to_observe_a_pass_hangs_no_session(pair, monkeypatch):
    target, draft = pair

    def broken(*args, **kwargs):
        raise RuntimeError("a planning bug")

    async def go():
        async with Loopback(target, draft) as loop:
            monkeypatch.setattr(loop.verifier.controller, "observe_pass", broken)
            return await asyncio.wait_for(asyncio.gather(*[loop.generate(p, 12, gamma=3) for p in PROMPTS[:3]]), 120)

    for prompt, (tokens, _) in zip(PROMPTS[:3], run(go())):
        assert tokens == hf_greedy(target, prompt, 12, eos=None)
