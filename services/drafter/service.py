"""The Drafter gRPC service: one ``DraftSession`` per bidi stream. Knows nothing of Serve.

Per stream: the verifier sends ``open``, then one ``outcome`` per verified round; this
side answers with a fresh block for round 0 and after every miss, and, when pipelining,
with one early block per round, drafted while the verifier is busy with the round.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from ..core.errors import InvalidRequest
from ..core.pipeline import DraftSession
from ..core.proposers import DraftModelProposer, NgramProposer, Proposer
from ..rpc import internal_pb2, internal_pb2_grpc
from ..rpc.convert import METHODS, block_to_proto, sampling_from_proto
from .steps import StepBatcher


def make_proposers(draft, confidence_stop: float = 0.0, max_batch_size: int = 16) -> dict[str, Proposer]:
    """A worker's proposers: the draft model, its steps batched across sessions, and
    n-gram lookup."""
    steps = StepBatcher(draft, max_batch_size)
    return {
        "draft": DraftModelProposer(draft, confidence_stop, step=steps.step),
        "ngram": NgramProposer(device=draft.device),
    }


class DrafterService(internal_pb2_grpc.DrafterServicer):
    def __init__(self, proposers: dict[str, Proposer], max_sessions: int = 256):
        self.proposers = proposers
        # A thread per drafting session: each drafts autoregressively, and the draft
        # model's steps from all of them meet in one batched forward (StepBatcher).
        self.compute = ThreadPoolExecutor(max_sessions, thread_name_prefix="outrider-draft")
        self.active_sessions = 0

    async def Draft(self, request_iterator, context):
        commands = request_iterator.__aiter__()
        first = await anext(commands, None)
        if first is None or first.WhichOneof("command") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Draft stream starts with `open`")
        try:
            session, pipeline = self._open(first.open)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        self.active_sessions += 1
        stop = threading.Event()
        try:
            yield block_to_proto(await self._run(session.draft, 0))
            while True:
                next_command = asyncio.ensure_future(anext(commands, None))
                if pipeline and session.gamma > 0:
                    early = self._run(session.draft_ahead, stop.is_set)
                    await asyncio.wait({early, next_command}, return_when=asyncio.FIRST_COMPLETED)
                    # An outcome before the early block is out can only be a miss (the
                    # verifier takes an early block only after receiving it): stop it.
                    refuted = next_command.done()
                    if refuted:
                        stop.set()
                    block = await early
                    stop.clear()
                    if not refuted:
                        yield block_to_proto(block)
                command = await next_command
                if command is None or command.outcome.finished:
                    return
                outcome = command.outcome
                session.resolve(list(outcome.committed), outcome.pipeline_hit, outcome.next_gamma)
                # gamma 0: the verifier decodes without drafts until it raises gamma again.
                if not outcome.pipeline_hit and session.gamma > 0:
                    yield block_to_proto(await self._run(session.draft, outcome.round + 1))
        finally:
            stop.set()
            self.active_sessions -= 1

    def _open(self, msg: internal_pb2.DraftOpen) -> tuple[DraftSession, bool]:
        method = METHODS.get(msg.method)
        if method not in self.proposers:
            raise InvalidRequest(f"this draft worker has no {method or msg.method!r} proposer")
        params = sampling_from_proto(msg.sampling)
        if params.seed is None:
            raise InvalidRequest("the verifier must resolve the seed before opening a draft stream")
        session = DraftSession(
            self.proposers[method], list(msg.prompt_ids), msg.max_new_tokens, params, msg.gamma, params.seed
        )
        return session, msg.pipeline

    def _run(self, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)
