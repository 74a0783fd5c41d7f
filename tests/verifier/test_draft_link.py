"""Draft-worker admission: a worker at capacity refuses a session at once; the verifier
drafts on another worker, or decodes without drafts when none has room. The output is
exactly target-only decoding either way (real gRPC on loopback)."""

import asyncio
import uuid

import grpc
import pytest
from tiny_models import hf_greedy, noisy_copy, tiny

from services.core.engine import SpeculativeEngine
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


async def start_worker(draft, max_sessions):
    proposers, steps = make_proposers(draft)
    service = DrafterService(proposers, max_sessions=max_sessions, steps=steps)
    server = grpc.aio.server()
    internal_pb2_grpc.add_DrafterServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return service, server, f"127.0.0.1:{port}"


def serve(target, draft, capacities):
    """One greedy session against workers with these capacities, offered in turn by the
    routing; (tokens, stats, each worker's sessions opened)."""

    async def go():
        workers = [await start_worker(draft, c) for c in capacities]
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
        req = internal_pb2.VerifyRequest(
            request_id=uuid.uuid4().hex, session_id=uuid.uuid4().hex, prompt_ids=PROMPT, max_new_tokens=40,
            sampling=sampling_to_proto(SamplingParams(seed=0)),
            speculation=outrider_pb2.Speculation(method=METHOD_IDS["draft"], gamma=3, pipeline=True),
        )
        tokens, stats = [], None
        async for chunk in verifier.verify(req):
            if chunk.HasField("stats"):
                stats = chunk.stats
            tokens += chunk.token_ids
        for channel in verifier.channels.values():
            await channel.close()
        for _, server, _ in workers:
            await server.stop(None)
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
