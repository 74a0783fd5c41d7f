"""Stateless draft workers: a session whose draft worker goes away mid-stream continues
on another one, which starts from the session's saved draft KV chunks (real gRPC on
loopback, a real Ray session store); the output is exactly target-only decoding."""

import asyncio
import uuid

import grpc
import pytest
import ray
import torch
from pacing import drafting_pays, slow_prefill
from tiny_models import hf_greedy, noisy_copy, random_eagle, tiny

from services.core.engine import SpeculativeEngine
from services.core.target import TargetRunner
from services.core.verifier import TargetVerifier
from services.drafter.service import DrafterService, make_proposers
from services.rpc import internal_pb2, internal_pb2_grpc, outrider_pb2
from services.rpc.convert import METHOD_IDS, features_to_proto, sampling_to_proto
from services.core.sampling import SamplingParams
from services.state.client import PrefixSharing, StateClient
from services.state.store import SessionStore
from services.verifier.service import VerifierService

PROMPT = [5, 17, 33, 2, 9]


@pytest.fixture(scope="module")
def store():
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="error")
    yield ray.remote(SessionStore).options(num_cpus=0).remote(2**20, 600.0)
    ray.shutdown()


async def start_worker(draft, state, prefixes=None, reopen_grace_s=30.0):
    service = DrafterService(make_proposers(draft)[0], state=state, chunk_tokens=4, prefixes=prefixes,
                             reopen_grace_s=reopen_grace_s)
    server = grpc.aio.server()
    internal_pb2_grpc.add_DrafterServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return service, server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_session_continues_on_another_worker_from_its_saved_chunks(store, pipeline):
    target = tiny("llama", seed=1)
    draft = noisy_copy(target, seed=2, scale=0.3)

    async def go():
        first_state, second_state = StateClient(store), StateClient(store)
        first, first_server, first_address = await start_worker(draft, first_state)
        # The default 30 s grace: the finished session's stream is half-closed, not
        # cancelled, so the worker learns it ended and forgets its chunks at once.
        second, second_server, second_address = await start_worker(draft, second_state)
        workers = [first_address]
        saved, save_chunk = [], first_state.save_chunk  # chunks the first worker saved

        def saving(session, chunk):
            saved.append(chunk)
            save_chunk(session, chunk)
        first_state.save_chunk = saving

        async def find_drafter():
            return workers[-1]

        engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256)
        verifier = VerifierService(engine, find_drafter)
        # The first worker drafts from the first round, so has chunks to save: its first
        # call to the store (the actor starting) does not hold back its first block.
        await first_state.session_chunks("warm-up")
        slow_prefill(verifier, 0.5)
        drafting_pays(verifier)
        req = internal_pb2.VerifyRequest(
            request_id=uuid.uuid4().hex, session_id=uuid.uuid4().hex, prompt_ids=PROMPT, max_new_tokens=60,
            sampling=sampling_to_proto(SamplingParams(seed=0)),
            speculation=outrider_pb2.Speculation(method=METHOD_IDS["draft"], gamma=3, pipeline=pipeline),
        )
        tokens, stats = [], None
        async for chunk in verifier.verify(req):
            if chunk.HasField("stats"):
                stats = chunk.stats
                continue
            tokens += chunk.token_ids
            # (The session decodes without drafts until the first worker's first block
            # comes, which in a fresh process can take a while: it saves nothing before.)
            if len(tokens) >= 25 and saved and len(workers) == 1:
                await first_state.flush()  # its chunks are saved by now
                workers.append(second_address)
                await first_server.stop(None)  # the first worker goes away mid-stream
        await asyncio.sleep(0.5)  # the second worker's stream ends
        await second_state.flush()
        await second_server.stop(None)
        for channel in verifier.channels.values():
            await channel.close()
        return tokens, stats, second_state.fetched_bytes, second_state.cached_bytes

    tokens, stats, fetched, cached = asyncio.run(go())
    assert tokens == hf_greedy(target, PROMPT, 60, eos=None)
    assert stats.draft_reconnects >= 1
    assert fetched > 0, "the second worker started from the saved chunks"
    # The session ended: the chunks the worker fetched and saved for it left its cache.
    assert cached == 0
    assert stats.accepted > 0 and stats.rounds < 60  # it kept speculating after the move


def test_a_prompt_prefix_drafted_on_one_worker_is_reused_on_another(store):
    target = tiny("llama", seed=1)
    draft = noisy_copy(target, seed=2, scale=0.3)
    prompt = [(7 * i + 3) % 90 + 2 for i in range(37)]  # four 8-token blocks before the last token

    async def go():
        states = [StateClient(store), StateClient(store)]
        workers = [await start_worker(draft, st, PrefixSharing(st, 8, "draft-under-test")) for st in states]
        engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), None, None, 256)
        results = []
        for service, server, address in workers:  # the same prompt, on one worker then the other
            async def find_drafter(address=address):
                return address

            verifier = VerifierService(engine, find_drafter)
            await states[0].session_chunks("warm-up")  # the store's actor started
            slow_prefill(verifier, 0.5)  # each worker drafts from the prompt, before the session ends
            req = internal_pb2.VerifyRequest(
                request_id=uuid.uuid4().hex, session_id=uuid.uuid4().hex, prompt_ids=prompt, max_new_tokens=20,
                sampling=sampling_to_proto(SamplingParams(seed=0)),
                speculation=outrider_pb2.Speculation(method=METHOD_IDS["draft"], gamma=3, pipeline=True),
            )
            tokens = [t async for chunk in verifier.verify(req) for t in chunk.token_ids]
            results.append(tokens)
            await states[0].flush()  # the first worker's blocks are published by now
            for channel in verifier.channels.values():
                await channel.close()
        for _, server, _ in workers:
            await server.stop(None)
        return results, states[1].fetched_bytes, ray.get(store.usage.remote())["prefix_blocks"]

    (first, second), fetched, blocks = asyncio.run(go())
    assert first == second == hf_greedy(target, prompt, 20, eos=None)
    assert blocks >= 4 and fetched > 0  # the second worker started from the first one's blocks


@pytest.mark.parametrize("case", ["malformed", "missing", "not-eagle", "bad-tree"])
def test_bad_features_or_trees_are_refused_with_the_reason(case):
    """EAGLE's features come from the verifier; a stream that sends them wrong is
    refused INVALID_ARGUMENT (another worker would refuse it too), never UNKNOWN."""
    target = tiny("llama", seed=1)
    eagle = random_eagle(target, 1)
    width = eagle.config.hidden_size
    reasons = {"malformed": "malformed features", "missing": "more feature rows", "not-eagle": "does not read them",
               "bad-tree": "EAGLE tree"}

    async def go():
        service = DrafterService(make_proposers(target, eagle=eagle)[0])
        server = grpc.aio.server()
        internal_pb2_grpc.add_DrafterServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await refused(port)
        finally:
            await server.stop(None)

    async def refused(port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = internal_pb2_grpc.DrafterStub(channel).Draft()
            opened = internal_pb2.DraftOpen(
                session_id="s", prompt_ids=PROMPT, max_new_tokens=8, sampling=sampling_to_proto(SamplingParams(seed=0)),
                method=METHOD_IDS["draft" if case == "not-eagle" else "eagle"], gamma=3, feature_rows=4,
                tree="0,2,8" if case == "bad-tree" else "")
            await call.write(internal_pb2.DraftCommand(open=opened))
            features = features_to_proto(0, torch.randn(4, width), "float32")
            if case == "malformed":
                features.data = features.data[:-4]
            if case == "missing":
                await call.write(internal_pb2.DraftCommand(outcome=internal_pb2.RoundOutcome(round=0, committed=[3])))
            else:
                await call.write(internal_pb2.DraftCommand(features=features))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            return err.value

    error = asyncio.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reasons[case] in error.details()


@pytest.mark.parametrize("prompt_len", [5, 70])
def test_a_worker_whose_draft_kv_pool_is_full_hands_the_session_back(prompt_len):
    """A draft worker's KV pool of 64 positions: a session that outgrows it mid-stream
    (prompt 5, 100 new tokens) or never fits (prompt 70) is refused at capacity, so
    its verifier decodes the rest without drafts: the output is target-only decoding's."""
    from services.bench.loopback import Loopback, run
    from services.core.kv_pool import BLOCK_TOKENS, kv_bytes_per_token

    target = tiny("llama", seed=1)
    draft = noisy_copy(target, seed=2, scale=0.3)
    prompt = torch.randint(3, 90, (prompt_len,), generator=torch.Generator().manual_seed(3)).tolist()

    class Counting(DrafterService):
        opened = 0

        async def Draft(self, request_iterator, context):
            self.opened += 1
            async for block in super().Draft(request_iterator, context):
                yield block

    async def go():
        loop = Loopback(target, draft)
        small = 5 * BLOCK_TOKENS * kv_bytes_per_token(draft.config, draft.dtype)  # 4 usable blocks
        loop.drafter = Counting(make_proposers(draft, kv_cache_bytes=small)[0])
        async with loop:
            drafting_pays(loop.verifier)  # (so that the session drafts until the pool runs out)
            return await loop.generate(prompt, 100, gamma=4), loop.drafter

    (tokens, stats), worker = run(go())
    assert tokens == hf_greedy(target, prompt, 100, None)
    # Refused at capacity, not taken for a lost worker again and again (8 reconnects).
    # Once in a while the refusal races the verifier's write of an outcome, and gRPC
    # reports the failed write (INTERNAL) instead: then one reopen, refused the same way.
    assert stats.undrafted_rounds > 0 and worker.opened <= 2 and worker.active_sessions == 0
    assert (stats.drafted > 0) == (prompt_len < 64)  # the short prompt drafted until the pool ran out
