"""The Drafter gRPC service: one ``DraftSession`` per bidi stream. Knows nothing of Serve.

Per stream: the verifier sends ``open``, then one ``outcome`` per verified round; this
side answers with a fresh block for the first round and after every miss, and, when
pipelining, with one early block per round, drafted while the verifier is busy with
the round.

Stateless workers: with a session store, a worker keeps no state a session needs. It
saves the draft KV of committed positions as chunks every ``chunk_tokens`` positions
(beside the session, not on its critical path), and a stream opened for a session this
worker has never seen (its old worker died, or its verifier moved) starts from those
chunks and recomputes only the positions after the last one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from ..core.errors import InvalidRequest, PoolExhausted
from ..core.eagle_proposer import EagleProposer, EagleTree
from ..core.pipeline import DraftSession
from ..core.proposers import ALTERNATIVES, DraftModelProposer, Proposer
from ..core.speculation_cache import MAX_FANOUT, fanout_for_load
from ..rpc import internal_pb2, internal_pb2_grpc
from ..rpc.convert import METHODS, BlockTooLarge, block_to_proto, features_from_proto, sampling_from_proto
from ..core.paged_kv import DEFAULT_DRAFT_KV_CACHE_BYTES, PagedKV
from ..state.client import PrefixSharing, StateClient
from ..telemetry import tracing
from .steps import StepBatcher

log = logging.getLogger(__name__)

# Trailing metadata of a stream refused because the worker is full (RESOURCE_EXHAUSTED):
# the verifier tries another worker, or decodes without drafts (verifier/draft_link.py).
CAPACITY_REFUSAL = ("outrider-refused", "capacity")
# How long a dropped stream's saved chunks stay in this worker's cache for its verifier
# to reopen it here (it reconnects within its read deadline, verifier/draft_link.py).
REOPEN_GRACE_S = 30.0


async def _timed(commands) -> tuple[object, float, list]:
    """The next outcome (or None at the end), when it arrived, and the feature pieces
    that came before it (EAGLE's, observed once no draft is running on the state)."""
    features = []
    command = await anext(commands, None)
    while command is not None and command.WhichOneof("command") == "features":
        features.append(command.features)
        command = await anext(commands, None)
    return command, time.perf_counter(), features


async def _drafted(span, future: asyncio.Future, discarded: bool = False):
    """The block (or branches) ``future`` drafts; ends its span. ``discarded``:
    branches the verifier's outcome came before (all but its own stopped, none sent)."""
    try:
        block = await future
        if span.is_recording():
            blocks = block if isinstance(block, list) else [block]
            span.set_attribute("outrider.gamma", max((len(b.proposal) for b in blocks), default=0))
            if isinstance(block, list):
                span.set_attribute("outrider.branches", len(blocks))
            if discarded:
                span.add_event("draft.early_discarded", {"outrider.reason": "outcome_first"})
        return block
    except Exception as error:
        tracing.record_error(span, error)
        raise
    finally:
        span.end()


def make_proposers(draft, confidence_stop: float = 0.0, max_batch_size: int = 16, eagle=None,
                   kv_cache_bytes: int = DEFAULT_DRAFT_KV_CACHE_BYTES) -> tuple[dict[str, Proposer], StepBatcher]:
    """A worker's proposers, the draft model's steps batched across sessions (and the
    batcher, whose measured step costs set the speculation cache's fan-out). Lookups,
    n-gram and suffix, run on the verifier: they need no model. ``eagle``: an EAGLE-3
    drafter (models/eagle.py), drafting from the features its verifier sends.
    ``kv_cache_bytes``: the draft model's KV pool, shared by the worker's sessions."""
    steps = StepBatcher(draft, max_batch_size)
    proposers: dict[str, Proposer] = {"draft": DraftModelProposer(draft, confidence_stop, steps.step, kv_cache_bytes)}
    if eagle is not None:
        proposers["eagle"] = EagleProposer(eagle, eagle.tree, eagle.fc.weight.device)
    return proposers, steps


class DrafterService(internal_pb2_grpc.DrafterServicer):
    def __init__(self, proposers: dict[str, Proposer], max_sessions: int = 256, state: StateClient | None = None,
                 chunk_tokens: int = 32, prefixes: PrefixSharing | None = None, steps: StepBatcher | None = None,
                 measured_fanout: bool = True, reopen_grace_s: float = REOPEN_GRACE_S):
        """``max_sessions``: admission; a stream opened beyond it is refused at once
        (``CAPACITY_REFUSAL``) and its verifier drafts elsewhere or decodes alone, so no
        session queues here. ``steps``: the draft model's step batcher, whose queue and
        step times are the worker's load report; with ``measured_fanout``, the
        speculation cache's branches of all sessions share the rows its measured costs
        say are nearly free. ``reopen_grace_s``: how long a dropped stream's chunks stay
        in ``state``'s cache (REOPEN_GRACE_S)."""
        self.proposers = proposers
        self.steps = steps
        self.measured_fanout = measured_fanout and steps is not None
        self.max_sessions = max_sessions
        self.state = state
        self.prefixes = prefixes  # the draft model's prompt KV, shared like the target's
        self.chunk_tokens = chunk_tokens
        # A thread per drafting session: each drafts autoregressively, and the draft
        # model's steps from all of them meet in one batched forward (StepBatcher).
        # Twice the sessions admitted: an ended session's last draft may still be
        # stopping while the session admitted in its place starts.
        self.compute = ThreadPoolExecutor(max(2, 2 * max_sessions), thread_name_prefix="outrider-draft")
        self.active_sessions = 0
        self.streams: Counter[str] = Counter()  # session id -> its streams open here
        self.reopen_grace_s = reopen_grace_s

    async def Draft(self, request_iterator, context):
        commands = request_iterator.__aiter__()
        first = await anext(commands, None)
        if first is None or first.WhichOneof("command") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Draft stream starts with `open`")
        if self.active_sessions >= self.max_sessions:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"draft worker at capacity ({self.max_sessions} sessions)",
                                trailing_metadata=(CAPACITY_REFUSAL,))
        try:
            session, pipeline = self._open(first.open)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        session_id = first.open.session_id
        alternatives = min(first.open.alternatives, ALTERNATIVES)  # a TREE's leaves, sent with each block
        self.active_sessions += 1
        self.streams[session_id] += 1
        finished = False  # the verifier said the session ended, or half-closed: no stream will restore it here
        stop = threading.Event()
        # Tracing: the stream is a span under the request's context (the call's gRPC
        # metadata); every block drafted is a span under the round the verifier said it
        # is drafting for (the open's context, then each outcome's): the fresh block for
        # round k+1 and the early one for round k+2 are both drafted under round k+1.
        span = tracing.start_span("outrider.draft_session", self._request_context(context), tracing.SpanKind.SERVER)
        round_ctx = tracing.extract(first.open.traceparent, first.open.tracestate) or tracing.context_of(span)
        try:
            fetched = self.state.fetched_bytes if self.state is not None else 0
            saved, shared = await self._restore(session_id, session)
            if span.is_recording():
                span.set_attributes({
                    "outrider.session_id": session_id,
                    "outrider.round": first.open.first_round, "outrider.gamma": first.open.gamma,
                    "outrider.pipeline": pipeline, "outrider.restored_positions": saved,
                    # Draft KV chunks this worker fetched from the object store to restore the
                    # session (a concurrent restore on this worker may add to it).
                    "outrider.object_store_bytes": (self.state.fetched_bytes - fetched) if self.state else 0,
                })
            await self._first_features(commands, session, first.open.feature_rows)
            round = first.open.first_round
            yield block_to_proto(await _drafted(self._draft_span(round_ctx, session_id, round, False),
                                                self._run(session.draft, round)), alternatives=alternatives)
            verifying_since = time.perf_counter()  # the block in flight: when its verification began, about
            if shared is not None:
                self._publish_prefix(session, *shared)
            while True:
                next_command = asyncio.ensure_future(_timed(commands))
                if pipeline and session.gamma > 0:
                    early_span = self._draft_span(round_ctx, session_id, session.in_flight.round + 1, True)
                    fanout = fanout_for_load(session.fanout, self.active_sessions, self._rows_within(session))
                    if not hasattr(session.proposer, "propose_branches"):
                        # Its branches are drafted one after another (EAGLE) and sent together:
                        # more than the likeliest would hold it back until all were done.
                        fanout = 1
                    drafting = self._run(session.draft_branches, fanout, stop.is_set)
                    await asyncio.wait({drafting, next_command}, return_when=asyncio.FIRST_COMPLETED)
                    # The outcome came first: only its branch, if one is drafting, goes on
                    # (and is sent below as the fresh block); the rest stop.
                    reported = next_command.done()
                    if reported and next_command.result()[0] is not None:
                        outcome = next_command.result()[0].outcome
                        session.report(list(outcome.committed), outcome.undrafted)
                    branches = await _drafted(early_span, drafting, discarded=reported)
                    if not reported:
                        for branch in branches:
                            yield block_to_proto(branch, session.planned, alternatives)
                command, arrived, features = await next_command
                if command is None or command.outcome.finished:
                    finished = True  # (a verifier half-closes only a finished session's stream)
                    return
                outcome = command.outcome
                if outcome.HasField("features"):
                    features.append(outcome.features)
                self._observe(session, features)
                if session.in_flight is not None and len(session.in_flight.proposal) and not outcome.undrafted:
                    session.observe_window(arrived - verifying_since)
                verifying_since = arrived  # a branch the verifier took is verified from now
                round_ctx = tracing.extract(outcome.traceparent, outcome.tracestate) or round_ctx
                if outcome.undrafted:
                    cached = None
                    session.catch_up(list(outcome.committed), outcome.round + 1, outcome.next_gamma, outcome.pipeline_hit)
                else:
                    cached = session.resolve(list(outcome.committed), outcome.pipeline_hit, outcome.next_gamma)
                saved = self._checkpoint(session_id, session, saved)
                # gamma 0: the verifier decodes without drafts until it raises gamma again.
                if not outcome.pipeline_hit and session.gamma > 0:
                    round = outcome.round + 1
                    if cached is not None:  # drafted for this outcome already: sent at once
                        yield block_to_proto(cached, session.planned, alternatives)
                    else:
                        yield block_to_proto(await _drafted(self._draft_span(round_ctx, session_id, round, False),
                                                            self._run(session.draft, round)), alternatives=alternatives)
                    verifying_since = time.perf_counter()
        except BlockTooLarge as error:  # the verifier fails the request with this reason
            tracing.record_error(span, error)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except PoolExhausted as error:  # this worker's draft KV pool is full: its verifier drafts elsewhere or alone
            tracing.record_error(span, error)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), trailing_metadata=(CAPACITY_REFUSAL,))
        except InvalidRequest as error:  # malformed features: any worker would refuse them
            tracing.record_error(span, error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Exception as error:
            tracing.record_error(span, error)
            raise
        finally:
            stop.set()
            self.active_sessions -= 1
            self.streams[session_id] -= 1
            if self.streams[session_id] <= 0:
                del self.streams[session_id]
            if self.state is not None and session_id:
                # Else the verifier dropped the stream (a cancel, or a fault it may reopen here).
                self.state.forget(session_id, 0.0 if finished else self.reopen_grace_s,
                                  keep=lambda: session_id in self.streams)
            span.end()

    @staticmethod
    def _request_context(context):
        """The request's trace context, from the Draft call's gRPC metadata."""
        if not tracing.enabled():
            return None
        return tracing.from_metadata(context.invocation_metadata())

    @staticmethod
    def _draft_span(parent, session_id: str, round: int, early: bool):
        """A block's span (the session and request ids are on its round and session
        spans: this one is per block, so it stays lean)."""
        if not tracing.enabled():
            return tracing.INVALID_SPAN
        span = tracing.start_span("outrider.draft", parent, attributes={"outrider.round": round, "outrider.early": early})
        if early and span.is_recording():  # drafted while the previous round verifies, assuming it accepted in full
            span.add_event("draft.early_started")
        return span

    async def _first_features(self, commands, session: DraftSession, rows: int) -> None:
        """The committed text's features, sent in pieces after the open (EAGLE)."""
        while rows > 0:
            command = await anext(commands, None)
            if command is None or command.WhichOneof("command") != "features":
                raise InvalidRequest(f"the open announced {rows} more feature rows than came")
            self._observe(session, [command.features])
            rows -= command.features.rows

    @staticmethod
    def _observe(session: DraftSession, pieces: list) -> None:
        if not pieces:
            return
        if not hasattr(session.proposer, "observe_fused"):
            raise InvalidRequest("features sent to a proposer that does not read them")
        model = session.proposer.model
        for piece in pieces:
            try:
                start, rows = features_from_proto(piece, session.proposer.device, model.dtype)
            except ValueError as error:
                raise InvalidRequest(str(error)) from None
            session.observe_features(start, rows)

    def _open(self, msg: internal_pb2.DraftOpen) -> tuple[DraftSession, bool]:
        method = METHODS.get(msg.method)
        if method not in self.proposers:
            raise InvalidRequest(f"this draft worker has no {method or msg.method!r} proposer")
        proposer = self.proposers[method]
        if msg.tree:
            if not hasattr(proposer, "with_tree"):
                raise InvalidRequest(f"a tree was asked of the {method} proposer")
            try:
                proposer = proposer.with_tree(EagleTree.parse(msg.tree))
            except ValueError as error:
                raise InvalidRequest(str(error)) from None
        # Drafts are shaped as the target is (penalties, min_tokens): accepted more often.
        params = sampling_from_proto(msg.sampling, msg.stop if msg.HasField("stop") else None, msg.prompt_len,
                                     msg.coupled)
        if params.seed is None:
            raise InvalidRequest("the verifier must resolve the seed before opening a draft stream")
        session = DraftSession(
            proposer, list(msg.prompt_ids), msg.max_new_tokens, params, msg.gamma,
            fanout=min(max(1, msg.fanout), MAX_FANOUT),
        )
        return session, msg.pipeline

    async def _restore(self, session_id: str, session: DraftSession) -> tuple[int, tuple | None]:
        """Start ``session`` from its saved chunks, or a new one from shared prompt
        blocks. Returns the positions its saved chunks cover, and for a new session
        (names of its prompt's blocks, how many were cached) for publishing."""
        if self.state is None or not session_id or not isinstance(session.state, PagedKV):
            return 0, None
        chunks = []
        try:
            saved_chunks = await self.state.session_chunks(session_id)
        except Exception as error:  # an unreachable store costs a recompute, nothing else
            log.warning("session %s: no saved draft state (%r); recomputing it", session_id, error)
            saved_chunks = []
        for chunk in saved_chunks:
            if chunk.end > len(session.committed) or list(chunk.tokens) != session.committed[chunk.start : chunk.end]:
                break  # only chunks of what this stream was opened with
            chunks.append(chunk)
        if chunks:
            session.state = await self._run(session.proposer.restore_state, chunks)
            return chunks[-1].end, None
        if self.prefixes is None:
            return 0, None
        names, blocks = await self.prefixes.lookup(session.committed[:-1])
        if blocks:
            session.state = await self._run(session.proposer.restore_state, blocks)
        return 0, (names, len(blocks))

    def _publish_prefix(self, session: DraftSession, names: list[str], cached: int) -> None:
        """The prompt blocks this worker computed, for every other worker."""
        size, state = self.prefixes.block_tokens, session.state
        blocks = []
        for k in range(cached, len(names)):
            if not isinstance(state, PagedKV) or len(state) < (k + 1) * size or \
                    state.tokens[: (k + 1) * size] != session.committed[: (k + 1) * size]:
                break
            blocks.append(state.export(k * size, (k + 1) * size))
        if blocks:
            self.prefixes.client.publish_prefix(names[cached : cached + len(blocks)], blocks)

    def _checkpoint(self, session_id: str, session: DraftSession, saved: int) -> int:
        """Save the committed positions past ``saved`` once there are enough of them."""
        if self.state is None or not session_id:
            return saved
        chunk = session.committed_chunk(saved, self.chunk_tokens)
        if chunk is None:
            return saved
        self.state.save_chunk(session_id, chunk)
        return chunk.end

    def load(self) -> dict[str, float]:
        """The worker's load, as Serve's request router and autoscaler read it
        (drafter/deployment.py): sessions open, its capacity, draft steps waiting, and
        the mean seconds of its latest steps."""
        return {"sessions": float(self.active_sessions), "capacity": float(self.max_sessions),
                "queued_steps": float(self.steps.queued if self.steps else 0),
                "step_s": self.steps.recent_step_s() if self.steps else 0.0}

    def _rows_within(self, session: DraftSession) -> int:
        """The rows a round's branches can take and be done before the verifier is."""
        if not self.measured_fanout:  # every session drafts what it asks for
            return MAX_FANOUT * max(1, self.active_sessions)
        # The bonus guess, then a block: gamma + 1 steps.
        return self.steps.costs.rows_within(self.steps.max_batch_size, session.gamma + 1, session.window)

    def _run(self, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)
