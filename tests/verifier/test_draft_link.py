"""Draft-worker admission: a worker at capacity refuses a session at once; the verifier
drafts on another worker, or decodes without drafts when none has room. The output is
exactly target-only decoding either way (real gRPC on loopback)."""

import asyncio
import uuid

import grpc
import pytest
from tiny_models import VOCAB, hf_greedy, noisy_copy, tiny

from services.core.engine import SpeculativeEngine
from services.core.goodput import PassCost
from services.core.sampling import SamplingParams
from services.core.target import TargetRunner
from services.core.verifier import TargetVerifier
from services.drafter.service import DrafterService, make_proposers
from services.rpc import internal_pb2, internal_pb2_grpc, outrider_pb2
from services.rpc.convert import METHOD_IDS, sampling_to_proto
from services.verifier.service import VerifierService

PROMPT = [5, 17, 33, 2, 9]


@pytest.fixture(scope="module")
def pair():
    target = tiny("llama", seed=1)
    return target, noisy_copy(target, seed=2, scale=0.3)


async def start_worker(service):
    """``service`` on a loopback gRPC server: (service, server, address)."""
    server = grpc.aio.server()
    internal_pb2_grpc.add_DrafterServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return service, server, f"127.0.0.1:{port}"


def worker(draft, max_sessions: int = 256) -> DrafterService:
    proposers, steps = make_proposers(draft)
    return DrafterService(proposers, max_sessions=max_sessions, steps=steps)


async def generate(verifier, session_id: str, max_new: int, gamma: int):
    """One greedy session through ``verifier``: (tokens, final stats)."""
    req = internal_pb2.VerifyRequest(
        request_id=session_id, session_id=session_id, prompt_ids=PROMPT, max_new_tokens=max_new,
        sampling=sampling_to_proto(SamplingParams(seed=0)),
        speculation=outrider_pb2.Speculation(method=METHOD_IDS["draft"], gamma=gamma, pipeline=True))
    tokens, stats = [], None
    async for chunk in verifier.verify(req):
        if chunk.HasField("stats"):
            stats = chunk.stats
        tokens += chunk.token_ids
    return tokens, stats


async def close(verifier, servers) -> None:
    for channel in verifier.channels.values():
        await channel.close()
    for server in servers:
        await server.stop(None)


def serve(target, draft, capacities):
    """One greedy session against workers with these capacities, offered in turn by the
    routing; (tokens, stats, each worker's sessions opened)."""

    async def go():
        workers = [await start_worker(worker(draft, c)) for c in capacities]
        opened = [0] * len(workers)
        asked = [0]

        async def find_drafter():
            n = asked[0] % len(workers)
            asked[0] += 1
            return workers[n][2]

        for n, (service, _, _) in enumerate(workers):  # count the streams each worker admitted
            original = service._open

            def counting(msg, n=n, original=original):
                opened[n] += 1
                return original(msg)
            service._open = counting
        verifier = VerifierService(SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256), find_drafter)
        tokens, stats = await generate(verifier, uuid.uuid4().hex, 40, 3)
        await close(verifier, [server for _, server, _ in workers])
        return tokens, stats, opened

    return asyncio.run(go())


def test_a_full_worker_refuses_and_the_session_drafts_on_another(pair):
    target, draft = pair
    tokens, stats, opened = serve(target, draft, [0, 4])
    assert tokens == hf_greedy(target, PROMPT, 40, eos=None)
    assert opened == [0, 1]  # refused before anything was set up, admitted by the other
    assert stats.accepted > 0 and stats.undrafted_rounds == 0


def test_with_every_worker_full_the_session_decodes_without_drafts(pair):
    target, draft = pair
    tokens, stats, opened = serve(target, draft, [0, 0, 0])
    assert tokens == hf_greedy(target, PROMPT, 40, eos=None)
    assert opened == [0, 0, 0]
    assert stats.drafted == 0 and stats.undrafted_rounds == stats.rounds == 40


class FixedCost(PassCost):
    def __init__(self, a, b):
        super().__init__()
        self.line = (a, b)

    def fit(self):
        return self.line


class SabotagingDrafter(DrafterService):
    """A draft worker whose drafts for one session are always wrong (every token shifted
    by one): that session's acceptance collapses, the others' does not."""

    def __init__(self, proposers, steps, bad_session: str):
        super().__init__(proposers, steps=steps)
        self.bad_session = bad_session

    async def Draft(self, request_iterator, context):
        commands = request_iterator.__aiter__()
        first = await anext(commands)
        bad = first.open.session_id == self.bad_session

        async def replay():
            yield first
            async for command in commands:
                yield command

        async for block in super().Draft(replay(), context):
            if bad:
                shifted = [(t + 1) % VOCAB for t in block.tokens]
                del block.tokens[:]
                block.tokens.extend(shifted)
            yield block


def test_a_session_whose_drafts_are_rejected_stops_drafting_while_another_in_its_batch_keeps_on(pair):
    target, draft = pair
    bad, good = uuid.uuid4().hex, uuid.uuid4().hex

    async def go():
        _, server, address = await start_worker(SabotagingDrafter(*make_proposers(draft), bad))

        async def find_drafter():
            return address

        verifier = VerifierService(SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 512), find_drafter)
        # Passes priced as a real target's (20 ms + 4 ms a position), not as this tiny
        # one's, whose pass costs less than the draft hop: at that price no draft pays.
        verifier.controller.cost = FixedCost(0.020, 0.004)

        # Verified together, in one batch.
        results = await asyncio.gather(generate(verifier, bad, 200, 4), generate(verifier, good, 200, 4))
        await close(verifier, [server])
        return results

    (bad_tokens, bad_stats), (good_tokens, good_stats) = asyncio.run(go())
    want = hf_greedy(target, PROMPT, 200, eos=None)
    assert bad_tokens == want and good_tokens == want
    drafting = lambda stats: stats.drafted_per_position[0] / stats.rounds  # noqa: E731  rounds that drafted
    # The bad session stopped drafting, re-probed now and then; the good one drafts, and
    # most of its tokens are accepted drafts (both may stop at first: one rejected
    # first round says little, until a probe accepts).
    assert bad_stats.accepted == 0 and drafting(bad_stats) < 0.25
    assert good_stats.accepted > 0.5 * good_stats.emitted and drafting(good_stats) > 2 * drafting(bad_stats)
