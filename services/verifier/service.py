"""The verifier's session loop: one ``Verify`` call per request. Knows nothing of Serve.

A session drives its rounds from here, so that the per-round hop is verifier <->
draft worker over one gRPC bidi stream and nothing else: the gateway only receives the
committed tokens as they come. With pipelining, the worker drafts round k+1 while this
side verifies round k (see core/pipeline.py).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

import grpc

from ..core.engine import SequenceState, SpeculativeEngine
from ..core.gamma import GammaSchedule, LoadAwareGamma, draft_budget
from ..core.pipeline import DraftBlock, pipeline_hit
from ..core.proposals import Proposal
from ..rpc import internal_pb2, internal_pb2_grpc
from ..rpc.convert import METHOD_IDS, METHODS, block_from_proto, sampling_from_proto, stats_to_proto
from .batcher import RoundBatcher


class DraftLink:
    """The verifier's end of one session's Drafter.Draft stream."""

    def __init__(self, call, seq: SequenceState, device):
        self.call, self.seq, self.device = call, seq, device

    async def receive(self, round: int, speculative: bool) -> DraftBlock:
        """Wait for the block for ``round``; blocks the verifier no longer wants (early
        blocks after a miss) are skipped. Waiting is charged to exposed draft compute
        up to the block's own draft time, and the rest to transport."""
        stats = self.seq.stats
        t0 = time.perf_counter()
        while True:
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                raise ConnectionError("the draft worker closed the session")
            block = block_from_proto(msg, self.device)
            stats.draft_time_s += block.draft_s
            if block.round == round and block.speculative == speculative:
                break
        waited = time.perf_counter() - t0
        exposed = min(waited, block.draft_s)
        stats.exposed_draft_time_s += exposed
        stats.transport_time_s += waited - exposed
        return block

    async def report(self, round: int, committed: list[int], hit: bool, next_gamma: int) -> None:
        """Tell the worker what round ``round`` committed; it drafts the next round with
        ``next_gamma`` (0: it drafts nothing until told otherwise)."""
        outcome = internal_pb2.RoundOutcome(
            round=round, committed=committed, pipeline_hit=hit, next_gamma=next_gamma, finished=self.seq.finished
        )
        await self.call.write(internal_pb2.DraftCommand(outcome=outcome))


class VerifierService:
    def __init__(self, engine: SpeculativeEngine, find_drafter: Callable[[], Awaitable[str]],
                 max_batch_size: int = 16, load_aware_gamma: bool = True):
        self.engine = engine
        self.find_drafter = find_drafter
        self.device = engine.verifier.device
        self.max_batch_size = max_batch_size
        # Under load, drafts get shorter (down to none) when verifying them costs more
        # than they save; measured online from this replica's own passes.
        self.gamma_policy = LoadAwareGamma() if load_aware_gamma else None
        # Concurrent sessions' rounds are verified together in one forward pass.
        self.batcher = RoundBatcher(engine, max_batch_size, self.gamma_policy, sessions=lambda: self.active_sessions)
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.active_sessions = 0

    async def verify(self, req: internal_pb2.VerifyRequest) -> AsyncIterator[internal_pb2.VerifyChunk]:
        params = sampling_from_proto(req.sampling)
        spec = req.speculation
        schedule = GammaSchedule(initial=spec.gamma, adaptive=spec.adaptive)
        seq = self.engine.start(list(req.prompt_ids), req.max_new_tokens, params, schedule)
        seq.stats.queue_time_s += max(0.0, time.time() - req.received_at)
        self.active_sessions += 1
        try:
            method = METHODS[spec.method]
            rounds = self._target_only(seq) if method == "none" else self._speculative(seq, req, method)
            # Closed explicitly, so a cancelled session cancels its draft stream at once.
            async with aclosing(rounds) as committed:
                async for tokens in committed:
                    yield internal_pb2.VerifyChunk(token_ids=tokens)
            finish = "stop" if seq.committed[-1] == self.engine.eos_token_id else "length"
            yield internal_pb2.VerifyChunk(stats=stats_to_proto(seq.stats, finish))
        finally:
            self.batcher.release(seq)
            self.active_sessions -= 1

    async def _target_only(self, seq: SequenceState) -> AsyncIterator[list[int]]:
        empty = Proposal.empty(self.device)
        while not seq.finished:
            yield (await self.batcher.verify(seq, empty)).tokens

    async def _speculative(self, seq: SequenceState, req, method: str) -> AsyncIterator[list[int]]:
        pipeline = req.speculation.pipeline
        # The target's prefill overlaps finding a draft replica and drafting round 0.
        prefill = asyncio.ensure_future(self.batcher.run(seq, self.engine.prefill, seq))
        try:
            link = await self._open_link(seq, req, method)
        except BaseException:
            prefill.cancel()
            raise
        try:
            await prefill
            exposed = seq.stats.exposed_draft_time_s
            told = seq.effective_gamma  # the gamma the draft worker drafts with
            block = await link.receive(0, speculative=False)
            round = 0
            while True:
                result = await self.batcher.verify(seq, block.proposal)
                if not req.pinned_gamma:
                    self._limit_gamma(seq, block, result.num_accepted, seq.stats.exposed_draft_time_s - exposed)
                exposed = seq.stats.exposed_draft_time_s
                early = None
                full = result.num_accepted == len(block.proposal)
                # The worker drafts ahead whenever it drafts at all (told > 0); the
                # block is worth waiting for only after a fully accepted round.
                if pipeline and told > 0 and not seq.finished:
                    seq.stats.pipeline_rounds += 1
                    if full and draft_budget(told, seq.remaining) > 0:
                        early = await link.receive(round + 1, speculative=True)
                hit = not seq.finished and pipeline_hit(block.proposal, result.num_accepted, result.tokens[-1], early)
                seq.stats.pipeline_hits += hit
                told = seq.effective_gamma
                await link.report(round, result.tokens, hit, told)
                yield result.tokens
                if seq.finished:
                    return
                round += 1
                if hit:
                    block = early
                elif told > 0:
                    block = await link.receive(round, speculative=False)
                else:  # no drafting at this load: a plain decoding step, no hop
                    block = DraftBlock(round, Proposal.empty(self.device), False, None, 0.0)
        finally:
            link.call.cancel()

    def _limit_gamma(self, seq: SequenceState, block: DraftBlock, accepted: int, exposed_s: float) -> None:
        if self.gamma_policy is None:
            return
        if len(block.proposal):
            self.gamma_policy.observe_round(len(block.proposal), accepted, exposed_s)
        batch = min(self.active_sessions, self.max_batch_size)
        # A lone session drafts what its request asked for; the cap protects throughput
        # under load only.
        seq.gamma_cap = self.gamma_policy.cap(batch) if batch > 1 else None

    async def _open_link(self, seq: SequenceState, req, method: str) -> DraftLink:
        address = await self.find_drafter()
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address)
        call = internal_pb2_grpc.DrafterStub(self.channels[address]).Draft()
        opened = internal_pb2.DraftOpen(
            session_id=req.request_id,
            prompt_ids=seq.committed,
            max_new_tokens=seq.max_new_tokens,
            sampling=req.sampling,
            method=METHOD_IDS[method],
            gamma=seq.gamma,
            pipeline=req.speculation.pipeline,
        )
        await call.write(internal_pb2.DraftCommand(open=opened))
        return DraftLink(call, seq, self.device)
