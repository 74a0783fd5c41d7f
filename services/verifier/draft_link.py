"""The verifier's end of one session's drafting: a Drafter.Draft stream to one worker.

A worker that goes away (its stream fails) is replaced: the stream is reopened on
another worker at the current round, from the committed tokens; that worker starts
from the session's saved draft KV chunks. A worker that stops answering without going
away (a frozen process, a partitioned node: the kernel keeps the connection open) is
caught by a deadline on every read, derived from the measured block times; the stream
then moves to another worker, or, if Serve offers no other, the session goes on
without drafting. Either way a round never waits more than ``MAX_READ_S`` for a draft.
A worker at capacity refuses the stream at once; the session tries one other worker,
then decodes without drafts: it never queues for a draft worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Awaitable, Callable

import grpc

from ..core.engine import SequenceState
from ..core.errors import InvalidRequest
from ..core.multi_draft import TreeProposer
from ..core.pipeline import DraftBlock
from ..drafter.service import CAPACITY_REFUSAL
from ..rpc import internal_pb2
from ..rpc.convert import METHOD_IDS, block_from_proto, stop_to_proto
from .draft_stream import end_finished, message_of, read_into

log = logging.getLogger(__name__)

FIRST_READ_S = 30.0  # the first block: the worker restores or prefills the prompt first
MIN_READ_S, MAX_READ_S = 1.0, 4.0  # later blocks: READ_SLACK x the slowest recent one, within these
READ_SLACK = 8.0
OPEN_S = 2.0  # finding a worker and opening a stream
THAW_S = 0.25  # a last look after a missed deadline, for a block already received


def draft_open(seq: SequenceState, req: internal_pb2.VerifyRequest, method: str, first_round: int,
               trace=("", "")) -> internal_pb2.DraftOpen:
    """The open of ``seq``'s Draft stream at its committed tokens, drafting from round
    ``first_round``. ``trace``: the context of that round's span."""
    return internal_pb2.DraftOpen(
        session_id=req.session_id,
        prompt_ids=seq.committed,
        max_new_tokens=seq.remaining,
        sampling=req.sampling,
        method=METHOD_IDS["draft" if method == "tree" else method],  # a tree's worker drafts its chain
        gamma=seq.effective_gamma,
        pipeline=req.speculation.pipeline,
        fanout=req.speculation.fanout,
        first_round=first_round,
        traceparent=trace[0],
        tracestate=trace[1],
        stop=stop_to_proto(seq.params.stop),
        prompt_len=seq.params.prompt_len,
        coupled=seq.params.coupled,
        # A TREE adds the chain's likeliest tokens at each depth as leaves.
        alternatives=seq.proposer.branches if isinstance(seq.proposer, TreeProposer) else 0,
    )


class DraftStalled(ConnectionError):
    """The worker did not answer within the read deadline."""


class DraftLink:
    def __init__(self, open_stream: Callable[[int, set[str]], Awaitable[tuple[str, object]]], seq: SequenceState,
                 device, max_reconnects: int = 8):
        # (first_round, addresses to avoid) -> (address, an opened Draft call); the open
        # carries the committed tokens at the call, whenever the awaitable completes.
        self.open_stream = open_stream
        self.seq, self.device, self.max_reconnects = seq, device, max_reconnects
        self.call = None
        self.address = ""
        self.stalled: set[str] = set()  # workers that missed a deadline: never reused by this session
        self.full: set[str] = set()  # workers that refused the session at capacity
        self.off = False  # no worker to draft with: the session decodes alone
        self.ended: Exception | None = None  # why the stream ended while nothing was reading it
        self.waits: deque[float] = deque(maxlen=16)  # recent block waits, for the deadline
        self.reader: asyncio.Future | None = None  # reads the stream into inbox
        self.inbox: asyncio.Queue | None = None  # messages, EOF, or the error that ended the stream
        # The speculation cache's branches received: (round, accepted, guess) -> block.
        self.branches: dict[tuple[int, int, int], DraftBlock] = {}
        self.branched_round = -1
        self.fresh: dict[int, DraftBlock] = {}  # fresh blocks the inbox held when branches were looked for
        # (traceparent, tracestate) of the round the worker drafts for next: sent with
        # every outcome and with a reopened stream's `open`.
        self.trace: tuple[str, str] = ("", "")
        # The round the open drafts its first block for, while the worker still reads the
        # context for it; None once a block is waited for (``receive``) or the worker
        # has been told what was committed meanwhile (``catch_up``).
        self.reading: int | None = None
        self.opening: asyncio.Future | None = None  # the stream being opened by ``start``

    def start(self, round: int) -> None:
        """Open the stream at the committed tokens, drafting from ``round``, in the
        background: the session waits neither for the open nor for the first block
        (``still_reading``). An open that fails on the connection is acted on by
        ``receive``, as a stream that failed (another worker, or none); one that finds no
        worker at all leaves the session to decode alone."""
        self.opening = asyncio.ensure_future(self.open_stream(round, self.stalled))
        self.reading = round

    def _opened(self) -> bool:
        """Whether ``start``'s open has finished; a failed one leaves its error for
        ``receive``, or, with no worker found at all, the session to decode alone."""
        if self.opening is None:
            return True
        if not self.opening.done():
            return False
        opening, self.opening = self.opening, None
        try:
            self.address, self.call = opening.result()
        except (grpc.aio.AioRpcError, ConnectionError) as error:
            self.ended = error
        except Exception:
            log.exception("no draft worker to open a stream on: the session decodes alone")
            self.off = True
        return True

    def still_reading(self, round: int) -> bool:
        """The open's first block is not here to verify as round ``round``: the worker
        is still reading the context, or it drafted the block for an earlier round that
        was decoded without it. Never waits."""
        return self.reading is not None and (round != self.reading or not self.ready(round))

    async def catch_up(self, round: int, committed: list[int], next_gamma: int) -> bool:
        """Once the open's first block is here, after rounds decoded without it: tell
        the worker everything committed since the open, through ``round``
        (RoundOutcome.undrafted). If those tokens were the block's own first drafts, the
        rest of it is round + 1's block, here at once; else the worker drafts a fresh
        one. False while the worker still reads."""
        if self.reading is None or not self.ready(self.reading):
            return False
        stale = self.fresh.pop(self.reading, None)
        self.reading = None
        drafts = [] if stale is None or not stale.proposal.is_chain else stale.proposal.tokens.tolist()
        rest = next_gamma > 0 and len(committed) < len(drafts) and drafts[: len(committed)] == committed
        if rest:
            self.fresh[round + 1] = DraftBlock(round + 1, stale.proposal.after(len(committed)), False, None, 0.0,
                                               rest_of=stale.round)
        await self.report(round, committed, rest, next_gamma, undrafted=True)
        return True

    def deadline(self) -> float:
        if not self.waits:
            return FIRST_READ_S
        return min(MAX_READ_S, max(MIN_READ_S, READ_SLACK * max(self.waits)))

    async def receive(self, round: int) -> DraftBlock:
        """Wait for the fresh block for ``round``; branches are kept for ``take_branch``.
        Waiting is charged to exposed draft compute up to the block's own draft time,
        and the rest to transport. With drafting off, the block is empty (a plain
        decoding step)."""
        self.reading = None
        if self.opening is not None:
            await asyncio.wait({self.opening})
            self._opened()
        while not self.off:
            try:
                return await self._read(round)
            except (grpc.aio.AioRpcError, ConnectionError) as error:
                if at_capacity(error):
                    await self._elsewhere(round)
                    continue
                if not worker_lost(error):  # another worker would refuse it too
                    raise InvalidRequest(f"the draft worker refused the session: {error.details()}") from error
                if isinstance(error, DraftStalled):
                    self.stalled.add(self.address)
                await self._reconnect(round, error)
        self.seq.stats.undrafted_rounds += 1
        return DraftBlock.undrafted(round, self.device)

    def ready(self, round: int) -> bool:
        """The fresh block for ``round`` is here, or the stream has something else for
        ``receive`` to act on (it ended, the worker refused the session, or there is no
        worker at all); never waits."""
        if not self._opened():
            return False
        try:
            self._drain()
        except (grpc.aio.AioRpcError, ConnectionError) as error:
            self._drop_call(error)
        return self.off or self.call is None or round in self.fresh

    def take_branch(self, round: int, accepted: int, token: int) -> DraftBlock | None:
        """The branch drafted for ``round`` after the outcome (``accepted`` drafts, then
        ``token``), if it is already here; never waits. Branches of earlier rounds go."""
        try:
            self._drain()
        except (grpc.aio.AioRpcError, ConnectionError) as error:
            # The fresh block's receive acts on it: a full worker is left for another
            # or for none (not reopened as if lost), a refusal fails the request, and a
            # lost worker is replaced.
            self._drop_call(error)
        branch = self.branches.pop((round, accepted, token), None)
        self.branches = {key: b for key, b in self.branches.items() if key[0] > round}
        if branch is not None:
            self.seq.stats.draft_time_s += branch.draft_s
        return branch

    def _drain(self) -> None:
        """Take every message already received, without waiting."""
        self._listen()
        while self.inbox is not None and not self.inbox.empty():
            block = self._arrived(message_of(self.inbox.get_nowait()))
            if block is not None:  # a fresh block, early: kept for receive
                self.fresh[block.round] = block

    def _listen(self) -> None:
        """Read the stream continuously into ``inbox``, so that branches that arrive
        while the verifier is busy are there when it looks, without waiting."""
        if self.reader is None and self.call is not None:
            self.inbox = asyncio.Queue()
            self.reader = asyncio.ensure_future(read_into(self.call, self.inbox))

    def _arrived(self, msg) -> DraftBlock | None:
        """Account a received block; keep a branch, return a fresh block."""
        stats = self.seq.stats
        stats.draft_bytes += msg.ByteSize()
        block = block_from_proto(msg, self.device)
        if msg.branches and block.round > self.branched_round:  # a round's first branch says how many there are
            self.branched_round = block.round
            stats.branches_drafted += msg.branches
        if block.speculative:
            self.branches[(block.round, block.accepted, block.guess)] = block
            return None
        stats.draft_time_s += block.draft_s
        return block

    async def _read(self, round: int) -> DraftBlock:
        if self.call is None:
            error, self.ended = self.ended, None
            raise error or ConnectionError("the stream was dropped")
        self._listen()
        stats = self.seq.stats
        t0 = time.perf_counter()
        deadline = t0 + self.deadline()
        block = self.fresh.pop(round, None)
        self.fresh.clear()  # blocks for earlier rounds are no longer wanted
        while block is None:
            get = asyncio.ensure_future(self.inbox.get())
            try:
                done, _ = await asyncio.wait({get}, timeout=max(0.0, deadline - time.perf_counter()))
                if not done:
                    # If this process was the one frozen (its node stopped, then resumed),
                    # the deadline passed with the block already in the socket: give the
                    # reader a moment more before blaming the worker.
                    done, _ = await asyncio.wait({get}, timeout=THAW_S)
            except BaseException:  # this session was cancelled meanwhile
                get.cancel()
                self._drop_call()
                raise
            if not done:
                get.cancel()
                self._drop_call()
                raise DraftStalled(f"draft worker {self.address} sent nothing for {self.deadline():.1f} s")
            block = self._arrived(message_of(get.result()))
            if block is not None and block.round != round:
                block = None
        waited = time.perf_counter() - t0
        self.waits.append(waited)
        exposed = min(waited, block.draft_s)
        stats.exposed_draft_time_s += exposed
        stats.transport_time_s += waited - exposed
        return block

    def _drop_call(self, error: Exception | None = None) -> None:
        """Cancel the stream (cancelling a read cancels the whole call anyway); the
        next receive reopens it on another worker. ``error``: what ended it, for that
        receive to act on."""
        self.ended = error
        if self.reader is not None:
            self.reader.cancel()
        if self.call is not None:
            self.call.cancel()
        self.call = self.reader = self.inbox = None
        self.branches, self.fresh = {}, {}  # a new worker's session knows nothing of them

    async def _reconnect(self, round: int, error: Exception) -> None:
        self._drop_call()
        for attempt in range(self.max_reconnects - self.seq.stats.draft_reconnects):
            self.seq.stats.draft_reconnects += 1
            if not self.stalled:  # a dead worker: Serve notices it meanwhile
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
            try:
                self.address, self.call = await asyncio.wait_for(self.open_stream(round, self.stalled), OPEN_S)
                self.waits.clear()  # a new worker prefills first
                return
            except NoOtherWorker:
                break
            except Exception as retry_error:  # the routing may still pick the dead worker
                error = retry_error
                if isinstance(retry_error, TimeoutError) and self.stalled:
                    break  # asking Serve hangs on the frozen replica itself
        if self.stalled:
            self.off = True  # go on without drafting rather than wait on a frozen worker
            return
        raise ConnectionError(f"no draft worker could continue the session: {error}") from error

    async def _elsewhere(self, round: int) -> None:
        """The worker was full: one other worker, or none. A session never waits for a
        draft worker to have room; it decodes without drafts instead."""
        self.full.add(self.address)
        self._drop_call()
        if len(self.full) >= 2:
            self.off = True
            return
        try:
            self.address, self.call = await asyncio.wait_for(self.open_stream(round, self.stalled | self.full), OPEN_S)
        except Exception:  # no other worker (NoOtherWorker), or none answered in time
            self.off = True

    async def report(self, round: int, committed: list[int], hit: bool, next_gamma: int,
                     features: list[internal_pb2.Features] = (), undrafted: bool = False) -> None:
        """Tell the worker what round ``round`` committed; it drafts the next round with
        ``next_gamma`` (0: it drafts nothing until told otherwise). ``features``: the
        committed positions' (EAGLE on the worker), with the outcome when they fit one
        piece, else in pieces before it. ``undrafted``: the rounds since the open were
        decoded without the worker's first block (RoundOutcome.undrafted). A worker that
        is gone is found out, and replaced, by the next ``receive``."""
        if self.off or self.call is None:
            return
        outcome = internal_pb2.RoundOutcome(
            round=round, committed=committed, pipeline_hit=hit, next_gamma=next_gamma, finished=self.seq.finished,
            traceparent=self.trace[0], tracestate=self.trace[1], undrafted=undrafted,
        )
        if len(features) == 1:
            outcome.features.CopyFrom(features[0])
        self.seq.stats.feature_bytes += sum(piece.ByteSize() for piece in features)
        try:
            for piece in features if len(features) > 1 else ():
                await self.call.write(internal_pb2.DraftCommand(features=piece))
            await self.call.write(internal_pb2.DraftCommand(outcome=outcome))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, ConnectionError):
            pass  # "RPC already finished": the worker is gone

    def close(self, finished: bool = False) -> None:
        """End the stream: ``finished``, the session ended (else it was cancelled or failed)."""
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()  # (its open cancels the call it made)
        elif self.opening is not None:
            self._opened()  # a call it made is cancelled below
        if finished and self.call is not None and self.ended is None:
            end_finished(self.call, self.reader)
            self.call = self.reader = self.inbox = None
        self._drop_call()


class NoOtherWorker(ConnectionError):
    """Serve offers only workers this session has seen stall."""


def at_capacity(error: Exception) -> bool:
    """The worker refused the session because it is full (drafter/service.py)."""
    return (isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and CAPACITY_REFUSAL in tuple(error.trailing_metadata() or ()))


def worker_lost(error: Exception) -> bool:
    """A failure of the worker or the connection, not of the request: a request the
    worker refused (INVALID_ARGUMENT) or a block over the message limit
    (RESOURCE_EXHAUSTED) would fail the same way on any worker."""
    request_errors = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    return not (isinstance(error, grpc.aio.AioRpcError) and error.code() in request_errors)
