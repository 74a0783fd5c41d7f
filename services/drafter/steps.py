"""Batching the draft model's forward steps across a worker's sessions.

Each session drafts on its own thread, autoregressively; every step it needs goes
through ``StepBatcher.step`` (one step for each of a session's branches, when the
speculation cache drafts several), and one compute thread runs all the steps waiting at
that moment in one forward pass over their paged KV (core/paged_kv.py). Sessions in
lockstep (the usual case under load: every session drafts gamma tokens a round) share
every pass. Short feeds only: a long one (a new session's prompt) runs alone rather
than pad a whole batch to its length.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..core.paged_kv import PagedKV, extend_paged
from ..core.speculation_cache import StepCosts

LONG_FEED = 16  # tokens; longer feeds run alone


@dataclass
class _Step:
    kv: PagedKV
    tokens: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class StepBatcher:
    def __init__(self, model, max_batch_size: int = 16):
        self.model = model
        self.max_batch_size = max_batch_size
        self.pending: list[_Step] = []
        self.wakeup = threading.Condition()
        self.batch_sizes: deque[int] = deque(maxlen=4096)  # the latest steps' sizes
        self.costs = StepCosts()  # what a step of each size takes here: the speculation cache's fan-out
        self.step_s: deque[float] = deque(maxlen=64)  # the latest decode steps' seconds: the worker's load report
        threading.Thread(target=self._loop, name="outrider-draft-steps", daemon=True).start()

    def step(self, kvs: list[PagedKV], feeds: list[list[int]]) -> list[torch.Tensor]:
        """Next-token logits [V] after feeding each of ``feeds`` on top of its KV state
        (blocks until all are done)."""
        requests = [_Step(kv, tokens) for kv, tokens in zip(kvs, feeds)]
        with self.wakeup:
            self.pending.extend(requests)
            self.wakeup.notify()
        for request in requests:
            request.done.wait()
        for request in requests:
            if request.error is not None:
                raise request.error
        return [request.logits for request in requests]

    @property
    def queued(self) -> int:
        """Steps waiting for the next forward pass."""
        return len(self.pending)

    def recent_step_s(self) -> float:
        """Mean seconds of the latest decode steps (0 before any)."""
        return sum(self.step_s) / len(self.step_s) if self.step_s else 0.0

    def _take(self) -> list[_Step]:
        with self.wakeup:
            while not self.pending:
                self.wakeup.wait()
            first = self.pending[0]
            if len(first.tokens) > LONG_FEED:
                batch = [first]
            else:
                batch = [s for s in self.pending if len(s.tokens) <= LONG_FEED][: self.max_batch_size]
            for s in batch:
                self.pending.remove(s)
            return batch

    def _loop(self) -> None:
        while True:
            # In a call of its own, so that nothing of a finished batch stays referenced
            # while the loop waits for the next one: a draft KV state's blocks go back to
            # the pool as soon as its session lets go of it (core/paged_kv.py).
            self._run(self._take())

    def _run(self, batch: list[_Step]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            t0 = time.perf_counter()
            logits = extend_paged(self.model, [s.kv for s in batch], [s.tokens for s in batch], [1] * len(batch))
            if all(len(s.tokens) == 1 for s in batch):  # decode steps only: a prefill says nothing of rows
                if logits[0].is_cuda:
                    torch.cuda.synchronize(logits[0].device)  # the step's time, not its launch's
                self.costs.observe(len(batch), time.perf_counter() - t0)
                self.step_s.append(time.perf_counter() - t0)
            for s, out in zip(batch, logits):
                s.logits = out[-1]
        except Exception:
            # One bad step must not fail the others: run them alone, so only the
            # step that raises gets the error.
            for s in batch:
                try:
                    s.logits = extend_paged(self.model, [s.kv], [s.tokens], [1])[0][-1]
                except Exception as error:
                    s.error = error
        for s in batch:
            s.done.set()
