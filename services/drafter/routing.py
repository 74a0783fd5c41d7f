"""Picking a draft worker by its real load: a Ray Serve request router.

A session's drafting lives on a side gRPC stream that Serve cannot see: the only Serve
call is an instant ``endpoint()``, so Serve's default router (the power of two choices
on queue length) sees every worker idle and picks at random. Each worker reports its
load instead (``DraftWorker.record_routing_stats``: sessions open, its capacity, draft
steps waiting, recent step time), Serve's controller polls it into every router, and
this router ranks workers by the share of their capacity in use. Sessions it sent since a
worker's last report are counted on top of it, so a burst of new sessions spreads
instead of piling onto the worker that looked idlest a second ago.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

STATS_PERIOD_S = 1.0  # how often Serve polls each worker's load (its default is 10 s)


def load_key(stats: dict, routed_since: int) -> tuple[float, float, float, float]:
    """A worker's rank key, lowest first: full or not, the share of its capacity its
    sessions take, then draft steps waiting, then its recent step time. Sessions come
    first because they are what a new session will share the worker's steps with for
    its whole life; queue and step time are instants (they swing with every batch), so
    they only break ties. A worker that has not reported yet (new) counts as empty."""
    sessions = stats.get("sessions", 0.0) + routed_since
    capacity = stats.get("capacity") or float("inf")
    return (float(sessions >= capacity), sessions / capacity if capacity != float("inf") else sessions,
            stats.get("queued_steps", 0.0), stats.get("step_s", 0.0))


def rank_by_load(stats: list[dict], routed_since: list[int]) -> list[int]:
    """Worker indices, least loaded first; ties in random order."""
    keys = [(load_key(s, n), random.random()) for s, n in zip(stats, routed_since)]
    return sorted(range(len(stats)), key=lambda i: keys[i])


class LeastLoadedDrafter(FIFOMixin, RequestRouter):
    """Ranks draft workers by ``rank_by_load``; one instance per caller process (each
    verifier replica routes its own sessions). FIFO: the choice does not depend on the
    request (every ``endpoint()`` call is alike), so a worker found goes to the oldest
    call waiting. Without it, a call routed while others were in flight waited forever
    now and then (Serve matched found workers to calls by id)."""

    def initialize_state(self, **kwargs) -> None:
        # Per worker: when this router sent it a session (endpoint calls), recent first out.
        self.routed: dict = defaultdict(lambda: deque(maxlen=4096))

    def _routed_since(self, replica: RunningReplica) -> int:
        reported_at = replica.routing_stats.get("reported_at", 0.0)
        return sum(t > reported_at for t in self.routed[replica.replica_id])

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # All full (Serve's own limit): back off before asking again, not spin.
            pending_request.routing_context.should_backoff = True
        order = rank_by_load([r.routing_stats for r in candidate_replicas],
                             [self._routed_since(r) for r in candidate_replicas])
        return [[candidate_replicas[i]] for i in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        if pending_request.metadata.call_method == "endpoint":  # a new session's worker
            self.routed[replica_id].append(time.time())
