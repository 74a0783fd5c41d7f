"""The served session loop (verifier <-> draft worker over real gRPC on loopback):
greedy output is exactly target-only decoding with pipelining on and off, sampling is
reproducible and exactly the target's distribution, and sessions are freed."""

import asyncio
import time

import grpc
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from services.bench.loopback import Loopback, run
from services.drafter.service import DrafterService, make_proposers
from services.verifier.draft_link import MAX_READ_S, OPEN_S
from services.core.draft_q import MAX_SUPPORT
from services.core.errors import InvalidRequest
from services.core.sampling import SamplingParams, adjusted_probs
from pacing import drafting_pays, slow_prefill
from tiny_models import hf_greedy, noisy_copy, tiny

PROMPT = [5, 17, 33, 2, 9]


@pytest.fixture(scope="module")
def pair():
    target = tiny("llama", seed=1)
    return target, noisy_copy(target, seed=2, scale=0.3)


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("method,gamma", [("draft", 1), ("draft", 3), ("draft", 6), ("ngram", 4), ("suffix", 6)])
def test_greedy_is_target_only_decoding(pair, method, gamma, pipeline):
    target, draft = pair
    expected = hf_greedy(target, PROMPT, 40, eos=None)

    async def go():
        async with Loopback(target, draft, load_aware_gamma=False) as loop:  # every round drafts its gamma
            return await loop.generate(PROMPT, 40, method=method, gamma=gamma, pipeline=pipeline)

    tokens, stats = run(go())
    assert tokens == expected
    assert stats.rounds < 40 if method == "draft" else stats.rounds <= 40
    if pipeline and method == "draft":  # lookups run on the verifier: no draft hop to pipeline
        # (rounds decoded while the worker read the prompt had nothing in flight)
        assert stats.pipeline_rounds == stats.rounds - 1 - stats.reading_rounds
    else:
        assert stats.pipeline_rounds == 0 and stats.pipeline_hits == 0


def test_a_tree_adds_the_workers_runner_up_tokens_as_leaves(pair):
    """The worker's chain comes with its likeliest tokens at each depth (DraftOpen.alternatives):
    a runner-up leaf is accepted now and then, and the output is still target-only's."""
    target, draft = pair

    async def go():
        async with Loopback(target, draft) as loop:
            return await loop.generate(PROMPT, 40, method="tree", tree="draft", gamma=4)

    tokens, stats = run(go())
    assert tokens == hf_greedy(target, PROMPT, 40, eos=None)
    assert len(stats.accepted_per_rank) > 1 and stats.accepted_per_rank[1] > 0


def test_a_perfect_draft_makes_every_early_block_usable():
    target = tiny("llama", seed=3)

    async def go():
        async with Loopback(target, target) as loop:
            drafting_pays(loop.verifier)  # (a tiny target's passes make no draft pay: every round drafts here)
            return await loop.generate(PROMPT, 48, gamma=4)

    tokens, stats = run(go())
    assert tokens == hf_greedy(target, PROMPT, 48, eos=None)
    # Every draft is accepted and the bonus is the draft's own guess: every round after
    # the first drafted one runs on the branch drafted for that outcome while the
    # previous one was verified (the verifier held it already, or the worker sent it at
    # once). Rounds decoded while the worker read the prompt had nothing in flight, and
    # the round before a last one with no room to draft (1 token left) has no branch.
    assert stats.pipeline_rounds == stats.rounds - 1 - stats.reading_rounds
    assert stats.pipeline_rounds - 1 <= stats.cache_hits == stats.cache_hits_full <= stats.pipeline_rounds
    assert stats.pipeline_hits <= stats.cache_hits
    assert stats.accepted == stats.drafted


def test_stops_at_eos_and_reports_it():
    target = tiny("llama", seed=1)
    expected = hf_greedy(target, PROMPT, 60, eos=None)
    eos = expected[7]  # make a token the model emits early the stop token

    async def go():
        async with Loopback(target, noisy_copy(target, 2, 0.3), eos_token_id=eos) as loop:
            return await loop.generate(PROMPT, 60, gamma=4)

    tokens, stats = run(go())
    assert tokens == expected[: expected.index(eos) + 1]
    assert stats.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_seed_dependent(pair):
    target, draft = pair
    params = SamplingParams(temperature=1.0, seed=123)

    async def go():
        async with Loopback(target, draft) as loop:
            a = await loop.generate(PROMPT, 30, params, gamma=3)
            b = await loop.generate(PROMPT, 30, params, gamma=3)
            c = await loop.generate(PROMPT, 30, SamplingParams(temperature=1.0, seed=124), gamma=3)
            return a[0], b[0], c[0]

    a, b, c = run(go())
    assert a == b
    assert a != c


def test_sessions_are_freed_after_completion_and_cancellation(pair):
    target, draft = pair

    async def settle(loop):
        # The draft worker learns that a session ended one message later.
        for _ in range(200):
            if loop.verifier.active_sessions == loop.drafter.active_sessions == 0:
                break
            await asyncio.sleep(0.01)
        return loop.verifier.active_sessions, loop.drafter.active_sessions

    async def go():
        async with Loopback(target, draft) as loop:
            await loop.generate(PROMPT, 10)
            done = await settle(loop)

            async def consume_forever():
                await loop.generate(PROMPT, 200, gamma=2)

            task = asyncio.create_task(consume_forever())
            while loop.drafter.active_sessions == 0:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return done, await settle(loop)

    done, cancelled = run(go())
    assert done == (0, 0)
    assert cancelled == (0, 0)


def test_the_speculation_cache_changes_no_token():
    """Six streams at once, greedy and seeded-sampled: the same tokens with the cache
    drafting up to 8 branches a round, with one guess, and with no pipelining; and the
    8-branch runs did use blocks drafted for rejected-draft outcomes."""
    target = tiny("llama", seed=5)
    draft = noisy_copy(target, seed=6, scale=0.4)
    params = [SamplingParams(seed=0)] * 2 + [SamplingParams(temperature=0.8, top_p=0.95, seed=s) for s in range(4)]

    async def go(**speculation):
        async with Loopback(target, draft, measured_fanout=False, load_aware_gamma=False) as loop:
            return await asyncio.gather(*[loop.generate(PROMPT, 40, p, gamma=4, **speculation) for p in params])

    cached, one_guess, serial = run(go(fanout=8)), run(go(fanout=1)), run(go(pipeline=False))
    assert [t for t, _ in cached] == [t for t, _ in one_guess] == [t for t, _ in serial]
    assert sum(s.cache_hits_partial for _, s in cached) > 0 and sum(s.cache_hits_partial for _, s in one_guess) == 0
    assert sum(s.branches_drafted for _, s in cached) > sum(s.branches_drafted for _, s in one_guess)


# --- Exactness of pipelined sampling --------------------------------------------------

V = 5
NEW = 6  # gamma 2: round 0 emits up to 3 tokens, round 1 can run on an early block
N = 1500
ALPHA = 1e-3


def _exact_marginals(target, prompt, params, positions):
    """P(token at position k) under the target's adjusted distribution, by enumeration."""
    marginals = []
    seqs, probs = [[]], torch.ones(1, dtype=torch.float64)
    for _ in range(positions):
        with torch.no_grad():
            logits = target(torch.tensor([prompt + s for s in seqs])).logits[:, -1]
        p = adjusted_probs(logits, params).double()  # [len(seqs), V]
        joint = probs[:, None] * p
        marginals.append(joint.sum(0).numpy())
        seqs = [s + [t] for s in seqs for t in range(V)]
        probs = joint.reshape(-1)
    return marginals


def test_pipelined_sampling_reproduces_the_target_distribution():
    target = tiny("llama", seed=5, vocab=V)
    draft = noisy_copy(target, seed=6, scale=0.4)
    params = SamplingParams(temperature=1.0)
    prompt = [2, 3, 4]
    # A verification slower than a branch's drafting, as with a real target: branches are
    # ready when their outcomes come, so they are used whatever this machine's speed
    # (with both tiny models as fast as each other, the count of cached blocks used
    # depended on timing: 37-41 of 1,500 on some runs, over 150 on others).
    target.register_forward_pre_hook(lambda *_: time.sleep(0.004))

    async def go():
        # Every session drafts the 4 branches it asks for, whatever the load and the steps'
        # cost, and every round drafts: priced as a tiny target, drafting never pays, and
        # the goodput controller had stopped it for most sessions on some runs (43 blocks used).
        async with Loopback(target, draft, measured_fanout=False, load_aware_gamma=False) as loop:
            outs, hits = [], 0
            for start in range(0, N, 25):
                batch = await asyncio.gather(*[
                    # Rejection sampling (not coupled): the draws the cache's branches must not bias.
                    loop.generate(prompt, NEW, SamplingParams(temperature=1.0, seed=seed, coupled=False), gamma=2,
                                  fanout=4)
                    for seed in range(start, start + 25)
                ])
                outs += [tokens for tokens, _ in batch]
                hits += sum(stats.cache_hits_partial for _, stats in batch)
            return np.array(outs), hits

    samples, hits = run(go())
    # Blocks drafted for rejected-draft outcomes (the speculation cache's own branches,
    # beyond plain pipelining's guess) were used, and often.
    assert hits > N * 0.1, "too few cached blocks were used to test them"
    expected = _exact_marginals(target, prompt, params, NEW)
    for k in range(NEW):
        counts = np.bincount(samples[:, k], minlength=V)
        p = chisquare(counts, expected[k] / expected[k].sum() * N).pvalue
        assert p > ALPHA, f"position {k}: p = {p:.2e}, counts {counts}, expected {expected[k] * N}"


class FreezingDrafter(DrafterService):
    """A draft worker that stops answering after a few blocks, its stream still open:
    what a SIGSTOPped or partitioned worker looks like from the verifier."""

    def __init__(self, proposers, blocks_before_freeze: int):
        super().__init__(proposers)
        self.left = blocks_before_freeze

    async def Draft(self, request_iterator, context):
        async for block in super().Draft(request_iterator, context):
            if self.left <= 0:
                await asyncio.sleep(3600)
            self.left -= 1
            yield block


def test_a_frozen_draft_worker_costs_one_read_deadline_then_decoding_goes_on(pair):
    target, draft = pair

    async def go():
        loop = Loopback(target, draft)
        loop.drafter = FreezingDrafter(make_proposers(draft)[0], blocks_before_freeze=4)
        async with loop:
            # Priced to pay, so the blocks before the freeze are drafted and verified: where a
            # tiny target's passes make no draft pay, the session stops and is not probed.
            drafting_pays(loop.verifier)
            started = time.perf_counter()
            tokens, stats = await loop.generate(PROMPT, 40, gamma=3)
            return tokens, stats, time.perf_counter() - started

    tokens, stats, elapsed = run(go())
    assert tokens == hf_greedy(target, PROMPT, 40, eos=None)
    assert stats.draft_reconnects >= 1  # it looked for another worker, found only the frozen one
    assert stats.undrafted_rounds > 0  # and said how many rounds went without drafts
    assert stats.accepted > 0 and stats.rounds > stats.drafted_per_position[0]  # drafted, then decoded alone
    assert elapsed < MAX_READ_S + OPEN_S + 3.0


# --- Real vocabularies through the served path ----------------------------------------

@pytest.fixture(scope="module")
def real_vocab_pairs():
    from services.models.shapes import random_pair

    return {shape: random_pair(shape, layers=1, hidden=64) for shape in ("llama3", "qwen2")}


@pytest.mark.parametrize("shape", ["llama3", "qwen2"])
def test_sampled_requests_at_real_vocabularies_succeed_at_every_gamma(real_vocab_pairs, shape):
    """V = 128,256 and 151,936, sampled at T = 1.0 (the widest q) and top-k 50, gamma 1
    to 16 over real gRPC: every request completes, and a round's draft block stays in
    tens of KB (a dense float32 q was gamma x V x 4 bytes: 9.7 MB at gamma 16)."""
    target, draft = real_vocab_pairs[shape]
    prompt = list(range(100, 120))

    async def go():
        async with Loopback(target, draft, max_context=1024) as loop:
            slow_prefill(loop.verifier)  # so that every request drafts from its first round...
            drafting_pays(loop.verifier)  # ...and goes on drafting
            out = {}
            for gamma in range(1, 17):  # T = 1.0 at odd gammas, top-k 50 at even ones
                # Not coupled: a coupled draft sends no q.
                params = SamplingParams(temperature=1.0, top_k=50 * (gamma % 2 == 0), seed=gamma, coupled=False)
                out[gamma, params.top_k] = await loop.generate(prompt, 18, params, gamma=gamma)  # room for 16 drafts
            return out

    for (gamma, top_k), (tokens, stats) in run(go()).items():
        assert len(tokens) == 18 and stats.drafted > 0
        per_round = stats.draft_bytes / stats.rounds
        assert per_round < gamma * MAX_SUPPORT * 3 + 1024, (gamma, top_k, per_round)
        if top_k:
            assert per_round < gamma * 50 * 4 + 1024, (gamma, per_round)


@pytest.mark.parametrize("shape", ["llama3", "qwen2"])
def test_seeded_requests_at_real_vocabularies_are_target_only_decoding(real_vocab_pairs, shape):
    """Coupled sampling at V = 128,256 and 151,936 over real gRPC, after a 600-token
    prompt: a seeded request drafted at gamma 4 and 8, at T = 1.0 and with top-k 50
    (noise on the support only), commits target-only decoding's tokens."""
    target, draft = real_vocab_pairs[shape]
    prompt = [(7 * i) % 5000 + 100 for i in range(600)]

    async def one(params, **speculation):
        # A fresh verifier a request: the goodput controller's measurements carry over none.
        async with Loopback(target, draft, max_context=1024) as loop:
            return await loop.generate(prompt, 16, params, **speculation)

    async def go():
        out = []
        for params in (SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0.8, top_k=50, seed=4)):
            plain, _ = await one(params, method="none")
            out.append((plain, [await one(params, gamma=gamma) for gamma in (4, 8)]))
        return out

    for plain, drafted in run(go()):
        assert len(plain) == 16
        for tokens, stats in drafted:
            assert tokens == plain and stats.drafted > 0


class RefusingDrafter(DrafterService):
    """A worker that refuses a session the way an oversized block is refused."""

    def __init__(self, proposers):
        super().__init__(proposers)
        self.opened = 0

    async def Draft(self, request_iterator, context):
        self.opened += 1
        # Read the open first, as the real worker does: a worker that aborted before the
        # verifier's write of it completed would fail that write with a bare INTERNAL.
        await anext(request_iterator.__aiter__())
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "a draft block of 99 bytes is over the limit")
        yield  # an async generator, like the real one


def test_a_refused_session_fails_with_the_reason_and_is_not_retried(pair):
    target, draft = pair

    async def go():
        loop = Loopback(target, draft)
        loop.drafter = RefusingDrafter(make_proposers(draft)[0])
        async with loop:
            with pytest.raises(InvalidRequest, match="over the limit"):
                await loop.generate(PROMPT, 10, gamma=3)
            return loop.drafter.opened

    assert run(go()) == 1  # not mistaken for a lost worker
