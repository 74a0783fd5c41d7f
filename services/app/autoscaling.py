"""Serve autoscaling for Outrider's deployments, each on the metric that matches its work.

Gateway and verifier hold one Serve call per session for its whole life (a stream), so
Serve's default policy, ongoing requests per replica, measures their real load. A draft
worker's sessions live on a side gRPC stream that Serve does not see (its only Serve
call is an instant ``endpoint()``): it reports its open sessions
(``DraftWorker.record_autoscaling_stats``) and ``draft_sessions_policy`` scales on
those, with ``target_ongoing_requests`` read as draft sessions per replica.
"""

from __future__ import annotations

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

DRAFT_SESSIONS = "draft_sessions"  # the metric draft workers report

POLICY = f"{__name__}:draft_sessions_policy"


def draft_sessions_policy(ctx) -> tuple[float, dict]:
    """Replicas for the draft sessions open across the deployment, at the target per
    replica; Serve applies the delays, factors and bounds of the config on top. Until
    the workers have reported, Serve's own policy (the cold start)."""
    sessions = (ctx.aggregated_metrics or {}).get(DRAFT_SESSIONS) or {}
    if not sessions or ctx.current_num_replicas == 0:
        return replica_queue_length_autoscaling_policy(ctx)
    return sum(sessions.values()) / ctx.config.get_target_ongoing_requests(), ctx.policy_state or {}
