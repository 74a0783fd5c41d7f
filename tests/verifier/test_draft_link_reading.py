"""A session never waits for its draft worker's first block (verifier/draft_link.py
``still_reading``, ``catch_up``): while the worker reads the context the session
decodes without drafts, then tells it everything committed at once, and verifies the
rest of that block when those tokens were its own drafts. The output is target-only
decoding's either way (real gRPC on loopback)."""

import asyncio

import pytest
from draft_workers import PROMPT, close, greedy_request, start_worker
from pacing import drafting_pays
from tiny_models import hf_greedy, noisy_copy, tiny

from services.core.engine import SpeculativeEngine
from services.core.target import TargetRunner
from services.core.verifier import TargetVerifier
from services.drafter.service import DrafterService, make_proposers
from services.verifier.service import VerifierService

class HeldFirstBlock(DrafterService):
    """A draft worker that holds its first block back, once drafted (``drafted``), until
    ``release`` is set, as one busy reading other sessions' prompts would; it records
    every outcome it is told."""

    def __init__(self, proposers, steps):
        super().__init__(proposers, steps=steps)
        self.drafted, self.release, self.outcomes = asyncio.Event(), asyncio.Event(), []

    async def Draft(self, request_iterator, context):
        async def recording():
            async for command in request_iterator:
                if command.WhichOneof("command") == "outcome":
                    self.outcomes.append(command.outcome)
                yield command

        first = True
        async for block in super().Draft(recording(), context):
            if first:
                self.drafted.set()
                await self.release.wait()
                first = False
            yield block


def held(target, draft, gamma: int, plain_rounds: int, max_new: int = 60, planned: bool = True):
    """One greedy session whose worker holds its first block until the session has
    streamed ``plain_rounds`` chunks: (chunks, stats, outcomes the worker was told).
    ``planned`` False: no goodput controller, every block drafts ``gamma``."""

    async def go():
        service, server, address = await start_worker(HeldFirstBlock(*make_proposers(draft)))

        async def find_drafter():
            return address

        engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256)
        verifier = VerifierService(engine, find_drafter, load_aware_gamma=planned)
        if planned:
            drafting_pays(verifier)
        chunks, stats = [], None
        async for chunk in verifier.verify(greedy_request("held", max_new, gamma)):
            if chunk.HasField("stats"):
                stats = chunk.stats
            else:
                chunks.append(list(chunk.token_ids))
            if len(chunks) == plain_rounds:  # the target did not wait; no round runs until this loop asks
                await service.drafted.wait()
                service.release.set()
                await asyncio.sleep(0.05)  # for the block to reach the verifier
        await close(verifier, [server])
        return chunks, stats, service.outcomes

    return asyncio.run(go())


@pytest.fixture(scope="module")
def target():
    return tiny("llama", seed=1)


def test_a_session_decodes_without_drafts_while_its_worker_reads_the_prompt_then_tells_it_everything_at_once(target):
    plain_rounds = 6
    chunks, stats, outcomes = held(target, noisy_copy(target, seed=2, scale=0.3), 4, plain_rounds)
    assert sum(chunks, []) == hf_greedy(target, PROMPT, 60, eos=None)
    # One token a round while the block was held (the session never waited on it)...
    assert all(len(c) == 1 for c in chunks[:plain_rounds])
    # ...then one outcome with every token committed meanwhile, which says nothing of
    # the held block's drafts, and drafting from there: drafts accepted, same worker.
    caught_up = outcomes[0]
    assert caught_up.undrafted and caught_up.next_gamma > 0
    assert len(caught_up.committed) >= plain_rounds
    assert list(caught_up.committed) == sum(chunks, [])[: len(caught_up.committed)]
    assert caught_up.round == len(caught_up.committed) - 1  # rounds 0.. were plain, one token each
    assert not any(o.undrafted for o in outcomes[1:])
    assert stats.accepted > 0 and stats.draft_reconnects == 0 and stats.undrafted_rounds == 0
    assert stats.reading_rounds == caught_up.round + 1


def test_plain_rounds_that_committed_the_held_blocks_own_drafts_verify_the_rest_of_it(target):
    """A perfect draft: the plain rounds commit exactly the held block's first drafts, so
    its rest is the next round's block, verified at once and accepted whole."""
    gamma = 16
    chunks, stats, outcomes = held(target, target, gamma, 2, planned=False)
    assert sum(chunks, []) == hf_greedy(target, PROMPT, 60, eos=None)
    caught_up = outcomes[0]
    plain = len(caught_up.committed)
    assert caught_up.undrafted and caught_up.pipeline_hit and 2 <= plain < gamma  # the rest was taken
    assert all(len(c) == 1 for c in chunks[:plain])
    assert len(chunks[plain]) == gamma - plain + 1  # the rest, all accepted, and the bonus
    assert stats.reading_rounds == plain and stats.accepted == stats.drafted


class SlowFirstBlock(DrafterService):
    """A draft worker whose first block comes ``delay_s`` late."""

    def __init__(self, proposers, steps, delay_s: float):
        super().__init__(proposers, steps=steps)
        self.delay_s = delay_s

    async def Draft(self, request_iterator, context):
        first = True
        async for block in super().Draft(request_iterator, context):
            if first:
                await asyncio.sleep(self.delay_s)
                first = False
            yield block


def test_a_verifier_told_to_wait_for_the_first_block_drafts_from_the_first_round(target):
    """``wait_first_block`` (how `outrider bench --profile` measures a pair): no round
    is decoded while the worker reads, however late its first block."""

    async def go():
        service, server, address = await start_worker(SlowFirstBlock(*make_proposers(target), delay_s=0.3))

        async def find_drafter():
            return address

        engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256)
        verifier = VerifierService(engine, find_drafter, load_aware_gamma=False, wait_first_block=True)
        chunks, stats = [], None
        async for chunk in verifier.verify(greedy_request("slow", 40, 4)):
            if chunk.HasField("stats"):
                stats = chunk.stats
            else:
                chunks.append(list(chunk.token_ids))
        await close(verifier, [server])
        return chunks, stats

    chunks, stats = asyncio.run(go())
    assert sum(chunks, []) == hf_greedy(target, PROMPT, 40, eos=None)
    # A perfect draft: the first round verified the first block, all accepted, and the bonus.
    assert len(chunks[0]) == 5
    assert stats.reading_rounds == 0 and stats.undrafted_rounds == 0 and stats.accepted == stats.drafted
