"""The drafter and verifier services wired over real gRPC on loopback, in one process
and without Ray: the protocol, the pipelined session loop and batched verification,
fast enough for statistical tests and for an in-process concurrency benchmark. The
Ray Serve deployments wrap exactly these services."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from ..core.eagle_relay import DEFAULT_WINDOW
from ..core.engine import SpeculativeEngine
from ..core.sampling import SamplingParams
from ..core.target import DEFAULT_KV_CACHE_BYTES, TargetRunner
from ..core.verifier import TargetVerifier
from ..drafter.service import DrafterService, make_proposers
from ..models.pair import eagle_relay
from ..rpc import internal_pb2, internal_pb2_grpc, outrider_pb2
from ..rpc.channels import SERVER_OPTIONS
from ..rpc.convert import METHOD_IDS, sampling_to_proto
from ..telemetry import tracing
from ..verifier.service import VerifierService


class Loopback:
    def __init__(self, target, draft, eos_token_id=None, max_context=256, max_batch_size=16,
                 kv_cache_bytes=DEFAULT_KV_CACHE_BYTES, measured_fanout=True, eagle=None,
                 feature_dtype="bfloat16", feature_window=DEFAULT_WINDOW, drafter_address=None, load_aware_gamma=True,
                 wait_first_block=False):
        """``measured_fanout`` False: the worker drafts the branches a request asks for,
        whatever its steps cost (a test of the cache, not of its policy). ``eagle``: an
        EAGLE-3 drafter on the draft worker (placement "drafter"), fed the features the
        verifier sends in ``feature_dtype``. ``drafter_address``: a draft worker served
        by another process (``serve_drafter``) instead of one in this process (``draft``
        unused). ``load_aware_gamma`` False: every round drafts the request's gamma (no
        goodput controller). ``wait_first_block``: sessions wait for their worker's first
        block (VerifierService)."""
        self.drafter_address = drafter_address
        self.drafter = None
        if drafter_address is None:
            proposers, steps = make_proposers(draft, max_batch_size=max_batch_size, eagle=eagle)
            self.drafter = DrafterService(proposers, steps=steps, measured_fanout=measured_fanout)
        engine = SpeculativeEngine(TargetVerifier(TargetRunner(target, kv_cache_bytes)), None, eos_token_id, max_context)
        relay = eagle_relay(eagle, feature_window) if eagle is not None else None
        self.verifier = VerifierService(engine, self._address, max_batch_size, load_aware_gamma, eagle_relay=relay,
                                        feature_dtype=feature_dtype, wait_first_block=wait_first_block)
        self.server = None
        self.port = None
        self.ttfts: list[float] = []  # each session's seconds from its start to its first tokens

    async def _address(self) -> str:
        return self.drafter_address or f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> "Loopback":
        if self.drafter is not None:
            self.server, self.port = await start_drafter_server(self.drafter)
        return self

    async def __aexit__(self, *exc) -> None:
        for channel in self.verifier.channels.values():
            await channel.close()
        if self.server is not None:
            await self.server.stop(None)

    async def generate(self, prompt, max_new, params=SamplingParams(seed=0), method="draft", gamma=4,
                       pipeline=True, adaptive=False, fanout=4, tree=""):
        """(tokens, final stats) of one session; also checks chunk framing."""
        req = internal_pb2.VerifyRequest(
            request_id=uuid.uuid4().hex, session_id=uuid.uuid4().hex, prompt_ids=prompt, max_new_tokens=max_new, sampling=sampling_to_proto(params),
            coupled=params.resolve_seed().coupled,  # as the gateway decides it
            speculation=outrider_pb2.Speculation(method=METHOD_IDS[method], gamma=gamma, adaptive=adaptive,
                                                 pipeline=pipeline, fanout=fanout, tree=tree),
        )
        # With tracing on, a request span stands in for the gateway's.
        span = tracing.start_span("outrider.generate", kind=tracing.SpanKind.SERVER)
        req.traceparent, req.tracestate = tracing.inject(span)
        tokens, stats = [], None
        start = time.perf_counter()
        try:
            async for chunk in self.verifier.verify(req):
                assert stats is None, "nothing may follow the stats chunk"
                if chunk.HasField("stats"):
                    stats = chunk.stats
                else:
                    assert len(chunk.token_ids) >= 1
                    if not tokens:
                        self.ttfts.append(time.perf_counter() - start)
                    tokens.extend(chunk.token_ids)
        finally:
            span.end()
        assert stats is not None and stats.emitted == len(tokens)
        return tokens, stats


async def start_drafter_server(drafter: DrafterService) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    internal_pb2_grpc.add_DrafterServicer_to_server(drafter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def serve_drafter(draft_path: str, device: str, dtype: str, threads: int, ports, max_batch_size: int = 16) -> None:
    """A draft worker in a process of its own (a ``multiprocessing`` target): loads the
    draft model, serves the Drafter service on a loopback port, puts the port on
    ``ports`` (a queue) and serves until the process is terminated."""
    import torch

    from ..models.loading import load_model

    torch.set_num_threads(threads)
    proposers, steps = make_proposers(load_model(draft_path, device, dtype, lean=True), max_batch_size=max_batch_size)

    async def main() -> None:
        server, port = await start_drafter_server(DrafterService(proposers, steps=steps))
        ports.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def run(coro):
    return asyncio.run(coro)
