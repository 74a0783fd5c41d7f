"""Continuous batching of verification rounds across a replica's sessions.

Sessions submit their rounds as they become ready; whenever the target is free, every
round waiting at that moment is verified in one forward pass over their paged KV
(core/target.py). There is no batching window: a lone session never waits for
company, and under load the batch is whatever arrived during the previous pass, which
is the continuous-batching policy of vLLM's scheduler.

Why not ``@serve.batch``: it batches *calls* to a deployment method, and a session is
one long streaming call whose rounds are produced inside it, so the unit to batch (a
round) is not a Serve call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core.engine import RoundResult, SequenceState, SpeculativeEngine
from ..core.goodput import LINGER, GoodputController
from ..core.proposals import Proposal
from ..telemetry import tracing

log = logging.getLogger(__name__)


@dataclass
class _Job:
    seq: SequenceState | None
    future: asyncio.Future
    proposal: Proposal | None = None  # a verification round (batchable)
    call: Callable[[], Any] | None = None  # anything else (prefill, release), run alone
    submitted: float = field(default_factory=time.perf_counter)
    span: Any = None  # the round's span: its `outrider.verify` child times the pass


class RoundBatcher:
    def __init__(self, engine: SpeculativeEngine, max_batch_size: int, cost: GoodputController | None = None,
                 sessions: Callable[[], int] = lambda: 0, linger: float = LINGER):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.cost = cost  # fed every pass's size, time and committed tokens
        # Sessions get out of step (each waits on its own draft worker), so when fewer
        # rounds are waiting than sessions are running, the batch lingers for the rest,
        # up to `linger` x the last pass's duration: a fuller pass costs little more.
        # (The controller prices that wait: core/goodput.py, W.)
        self.sessions = sessions
        self.linger = linger
        self.last_pass_s = 0.0
        # One compute thread: the target runs one forward pass at a time.
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="outrider-verify")
        self.queue: deque[_Job] = deque()
        self.ready = asyncio.Event()
        self.worker: asyncio.Task | None = None
        self.batch_sizes: deque[int] = deque(maxlen=4096)  # the latest passes' batch sizes, for stats

    async def verify(self, seq: SequenceState, proposal: Proposal, span=None) -> RoundResult:
        """``span``: the round's span (recording: the pass gets an ``outrider.verify``
        child, with the batch's size)."""
        if span is not None and not span.is_recording():
            span = None
        return await self._submit(_Job(seq, self._future(), proposal=proposal, span=span))

    async def run(self, seq: SequenceState | None, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` on the compute thread, in turn with the batches."""
        return await self._submit(_Job(seq, self._future(), call=lambda: fn(*args)))

    def release(self, seq: SequenceState) -> None:
        """Free a session's target KV after any pass it is part of; callable from a
        cancelled session's ``finally`` (it does not wait)."""
        self._enqueue(_Job(None, self._future(), call=lambda: self.engine.release(seq)))

    def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, job: _Job) -> Any:
        self._enqueue(job)
        return await job.future

    def _enqueue(self, job: _Job) -> None:
        self.queue.append(job)
        self.ready.set()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.queue:
                await self._gather_rounds()
                jobs = self._next_jobs()
                started = time.perf_counter()
                for job in jobs:
                    if job.seq is not None:
                        job.seq.stats.queue_time_s += started - job.submitted
                if jobs[0].call is not None:
                    outcomes = [await self._outcome(loop, jobs[0].call)]
                else:
                    self.batch_sizes.append(len(jobs))
                    try:
                        outcomes = await self._verify_batch(loop, jobs)
                    except Exception as error:  # a bug here must fail these rounds, not leave them waiting forever
                        log.exception("a verify batch failed outside the pass")
                        outcomes = [(False, error)] * len(jobs)
                for job, (ok, value) in zip(jobs, outcomes):
                    if job.future.done():  # the session was cancelled meanwhile
                        continue
                    job.future.set_result(value) if ok else job.future.set_exception(value)

    async def _gather_rounds(self) -> None:
        if self.queue[0].call is not None or not self.linger:
            return
        want = min(self.sessions(), self.max_batch_size)
        deadline = time.perf_counter() + self.linger * self.last_pass_s
        while sum(job.proposal is not None for job in self.queue) < want:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), left)
            except TimeoutError:
                return

    def _next_jobs(self) -> list[_Job]:
        """The oldest job; if it is a round, every round waiting (up to the limit)."""
        if self.queue[0].call is not None:
            return [self.queue.popleft()]
        rounds = [job for job in self.queue if job.proposal is not None][: self.max_batch_size]
        for job in rounds:
            self.queue.remove(job)
        return rounds

    async def _verify_batch(self, loop, jobs: list[_Job]) -> list[tuple[bool, Any]]:
        live = [job for job in jobs if not job.future.cancelled()]
        outcomes: dict[int, tuple[bool, Any]] = {}
        if live:
            seqs, proposals = [job.seq for job in live], [job.proposal for job in live]
            traced = any(job.span is not None for job in live)
            started, started_ns = time.perf_counter(), time.time_ns() if traced else 0
            ok, value = await self._outcome(loop, lambda: self.engine.verify_and_commit_batch(seqs, proposals))
            self.last_pass_s = time.perf_counter() - started
            if traced:
                _verify_spans(live, started_ns, time.time_ns(), value if ok else None)
            if ok and self.cost is not None:
                try:
                    self.cost.observe_pass(sum(len(p) + 1 for p in proposals), self.last_pass_s,
                                           sum(len(result.tokens) for result in value))
                except Exception:  # a planning bug must not leave the pass's sessions waiting forever
                    log.exception("the goodput controller failed to observe a pass; its sessions go on")
            if ok:
                outcomes = {id(job): (True, result) for job, result in zip(live, value)}
            elif len(live) == 1:
                outcomes = {id(live[0]): (False, value)}
            else:
                # One bad session must not fail the others: retry them one at a time,
                # so only the session that raises gets the error.
                for job in live:
                    call = lambda job=job: self.engine.verify_and_commit(job.seq, job.proposal)  # noqa: E731
                    outcomes[id(job)] = await self._outcome(loop, call)
        return [outcomes.get(id(job), (False, asyncio.CancelledError())) for job in jobs]

    async def _outcome(self, loop, call) -> tuple[bool, Any]:
        try:
            return True, await loop.run_in_executor(self.compute, call)
        except Exception as error:  # delivered to the session that asked
            return False, error


def _verify_spans(jobs: list[_Job], start_ns: int, end_ns: int, results: list[RoundResult] | None) -> None:
    """One ``outrider.verify`` span per traced round in a pass: the target forward and
    acceptance of the whole batch, timed on the event loop around the compute thread."""
    for n, job in enumerate(jobs):
        if job.span is None:
            continue
        attributes = {"outrider.batch_size": len(jobs), "outrider.gamma": len(job.proposal)}
        if results is not None:
            attributes["outrider.accepted"] = results[n].num_accepted
        tracing.start_span("outrider.verify", tracing.context_of(job.span), start_time=start_ns,
                           attributes=attributes).end(end_time=end_ns)
