"""Speculative-decoding metrics for the Ray dashboard, recorded in one place: the
gateway, from each finished request's final ``GenerationStats`` (``record_request``).

Metrics are ``ray.util.metrics`` instruments: every Ray worker process sends them to
its node's metrics agent, which serves them in Prometheus format on the node's
``MetricsExportPort`` (every ``metrics_report_interval_ms``, 10 s by default). On
export Ray prefixes each name with ``ray_``, and a counter is exported with a
``_total`` suffix; names below already end in ``_total`` so the exported name is the
same with Ray's OpenTelemetry exporter (the default) and its legacy OpenCensus one,
which would otherwise also export a deprecated gauge without the suffix. So
``outrider_accepted_tokens_total`` is scraped as ``ray_outrider_accepted_tokens_total``.

Every gateway metric carries ``application``, ``deployment`` and ``replica`` (as Ray
Serve's own metrics do); Ray adds ``NodeAddress``, ``WorkerId``, ``SessionName``.
``cluster/metrics.md`` lists each metric with its PromQL; the Grafana dashboard is
``cluster/grafana/outrider-spec-decode.json``.

Ray 2.60's agent rebuilds a histogram's ``_sum`` from bucket midpoints (its
``_count`` and buckets are exact), so exact means come from the ``*_total`` counters:
for example the mean verify time per round is ``sum(rate(ray_outrider_phase_seconds_total{phase="verify"}[5m]))
/ sum(rate(ray_outrider_rounds_total[5m]))``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Callable

from ..rpc import outrider_pb2

logger = logging.getLogger(__name__)

SERVE_TAGS = ("application", "deployment", "replica")
# Round latency phases. "draft" is the *exposed* draft time: draft compute the
# verifier waited on (GenerationStats.exposed_draft_s). Drafting hidden under
# verification costs no latency, so the four phases stack up to a round's critical
# path (the gateway, proxy and client streaming excluded). All draft compute, hidden
# or not, is ``outrider_draft_compute_seconds_total``.
PHASES = ("draft", "verify", "transport", "queue")

ACCEPTANCE_LENGTH_BUCKETS = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 17.0]
PHASE_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
TTFT_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TOKENS_PER_S_BUCKETS = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0,
                        2000.0]


class SpecDecodeMetrics:
    """The gateway's metrics. ``backend`` is a module with ``Counter``, ``Gauge`` and
    ``Histogram`` classes shaped like ``ray.util.metrics`` (the default)."""

    def __init__(self, application: str = "", deployment: str = "", replica: str = "", *,
                 window: int = 64, backend=None):
        if backend is None:
            from ray.util import metrics as backend
        self.tags = {"application": application, "deployment": deployment, "replica": replica}
        counter, gauge, histogram = backend.Counter, backend.Gauge, backend.Histogram

        def tagged(metric):
            return metric.set_default_tags(dict(self.tags))

        def c(name, description, *keys):
            return tagged(counter(name, description, tag_keys=SERVE_TAGS + keys))

        def g(name, description):
            return tagged(gauge(name, description, tag_keys=SERVE_TAGS))

        def h(name, description, buckets, *keys):
            return tagged(histogram(name, description, boundaries=buckets, tag_keys=SERVE_TAGS + keys))

        self.requests = c("outrider_requests_total", "Finished requests by gRPC status code.", "code", "method")
        self.rounds = c("outrider_rounds_total", "Decoding rounds (one target forward each).", "method")
        self.finished = c("outrider_finished_total", "Finished samples by why they ended.", "method", "reason")
        self.drafts = c("outrider_drafts_total", "Rounds that drafted at least one token.", "method")
        self.drafted_tokens = c("outrider_drafted_tokens_total", "Drafted tokens.", "method")
        self.accepted_tokens = c("outrider_accepted_tokens_total", "Drafted tokens the target accepted.", "method")
        self.rejections = c("outrider_rejections_total", "Rounds that ended on a rejected draft token.", "method")
        self.emitted_tokens = c("outrider_emitted_tokens_total", "Tokens returned to clients.", "method")
        self.drafted_by_position = c("outrider_drafted_tokens_per_position_total",
                                     "Drafted tokens by draft position (0 = first).", "method", "position")
        self.accepted_by_position = c("outrider_accepted_tokens_per_position_total",
                                      "Accepted tokens by draft position (0 = first).", "method", "position")
        self.accepted_by_rank = c("outrider_accepted_tokens_per_rank_total",
                                  "Accepted draft tokens by sibling rank in their tree (0 = first candidate).",
                                  "method", "rank")
        self.phase_seconds = c("outrider_phase_seconds_total",
                               "Seconds in each round phase, summed over rounds (draft = exposed draft).",
                               "method", "phase")
        self.draft_compute_seconds = c("outrider_draft_compute_seconds_total",
                                       "Draft compute seconds, hidden under verification or not.", "method")
        self.pipeline_rounds = c("outrider_pipeline_rounds_total",
                                 "Rounds with an early (pipelined) draft in flight for the next round.", "method")
        self.pipeline_hits = c("outrider_pipeline_hits_total",
                               "Rounds whose next block the verifier already held (a branch for the outcome).", "method")
        self.cache_hits = c("outrider_speculation_cache_hits_total",
                            "Rounds whose outcome a draft worker had pre-drafted the next block for, by the outcome "
                            "(full: every draft accepted; partial: a draft rejected).", "method", "outcome")
        self.branches_drafted = c("outrider_speculation_cache_branches_total",
                                  "Blocks draft workers pre-drafted for likely outcomes, used or not.", "method")
        self.draft_bytes = c("outrider_draft_bytes_total",
                             "Draft block bytes the verifiers received from draft workers (q' included).", "method")

        self.acceptance_length = h("outrider_mean_acceptance_length",
                                   "Per speculative request: tokens committed per round (the bonus counts).",
                                   ACCEPTANCE_LENGTH_BUCKETS, "method")
        self.round_phase = h("outrider_round_phase_seconds",
                             "Per request: its mean seconds per round in each phase (draft = exposed draft).",
                             PHASE_BUCKETS_S, "method", "phase")
        self.ttft = h("outrider_time_to_first_token_seconds",
                      "Per request: gateway receipt to the first token.", TTFT_BUCKETS_S, "method")
        self.tokens_per_s = h("outrider_request_tokens_per_second",
                              "Per request: emitted tokens over gateway receipt to last token.",
                              TOKENS_PER_S_BUCKETS, "method")

        self.active_sessions = g("outrider_active_sessions", "Sessions open at this gateway replica.")
        self.pipeline_hit_rate = g("outrider_pipeline_hit_rate",
                                   f"Pipelined early drafts used, pooled over this replica's last {window} "
                                   "requests that drafted.")
        self.overlap = g("outrider_overlap",
                         f"Share of draft compute hidden under verification, pooled over this replica's "
                         f"last {window} requests that drafted.")
        self._recent: deque[tuple[int, int, float, float]] = deque(maxlen=window)
        self._pooled: dict[str, float] = {}  # the pooled gauges' last values
        self._stop = threading.Event()

    @classmethod
    def for_replica(cls, **kwargs) -> "SpecDecodeMetrics":
        """Tagged with the calling Serve replica's application, deployment and replica."""
        from ray import serve

        context = serve.get_replica_context()
        return cls(context.app_name, context.deployment, context.replica_tag, **kwargs)

    def record_request(self, stats: outrider_pb2.GenerationStats | None, code: str = "OK",
                       method: str = "unknown") -> None:
        """Record one finished request: its status code, and for a request that
        finished (``stats`` set) everything its final GenerationStats says."""
        self.requests.inc(1, {"code": code, "method": method})
        if stats is not None:
            self.record_sample(stats, method)

    def record_sample(self, stats: outrider_pb2.GenerationStats, method: str = "unknown") -> None:
        """Record one finished sample's stats (a request with n samples has n)."""
        tags = {"method": method}
        self.finished.inc(1, {**tags, "reason": finish_label(stats)})
        rounds = stats.rounds
        _inc(self.rounds, rounds, tags)
        _inc(self.drafts, stats.drafted_per_position[0] if stats.drafted_per_position else 0, tags)
        _inc(self.drafted_tokens, stats.drafted, tags)
        _inc(self.accepted_tokens, stats.accepted, tags)
        _inc(self.rejections, stats.rejections, tags)
        _inc(self.emitted_tokens, stats.emitted, tags)
        for position, (drafted, accepted) in enumerate(zip(stats.drafted_per_position, stats.accepted_per_position)):
            _inc(self.drafted_by_position, drafted, {**tags, "position": str(position)})
            _inc(self.accepted_by_position, accepted, {**tags, "position": str(position)})
        for rank, accepted in enumerate(stats.accepted_per_rank):
            _inc(self.accepted_by_rank, accepted, {**tags, "rank": str(rank)})
        phases = {"draft": stats.exposed_draft_s, "verify": stats.verify_s, "transport": stats.transport_s,
                  "queue": stats.queue_s}
        for phase, seconds in phases.items():
            _inc(self.phase_seconds, seconds, {**tags, "phase": phase})
            if rounds:
                self.round_phase.observe(seconds / rounds, {**tags, "phase": phase})
        _inc(self.draft_compute_seconds, stats.draft_s, tags)
        _inc(self.pipeline_rounds, stats.pipeline_rounds, tags)
        _inc(self.pipeline_hits, stats.pipeline_hits, tags)
        _inc(self.cache_hits, stats.cache_hits_full, {**tags, "outcome": "full"})
        _inc(self.cache_hits, stats.cache_hits_partial, {**tags, "outcome": "partial"})
        _inc(self.branches_drafted, stats.branches_drafted, tags)
        _inc(self.draft_bytes, stats.draft_bytes, tags)
        if stats.drafted:
            self.acceptance_length.observe(stats.mean_acceptance_length, tags)
        self.ttft.observe(stats.time_to_first_token_s, tags)
        if stats.total_s > 0:
            self.tokens_per_s.observe(stats.emitted / stats.total_s, tags)
        self._pool(stats)

    def _pool(self, stats: outrider_pb2.GenerationStats) -> None:
        if not stats.pipeline_rounds and not stats.draft_s:
            return
        self._recent.append((stats.pipeline_rounds, stats.pipeline_hits, stats.draft_s, stats.exposed_draft_s))
        pipelined = sum(r[0] for r in self._recent)
        draft_s = sum(r[2] for r in self._recent)
        if pipelined:
            self.set_pipeline_hit_rate(sum(r[1] for r in self._recent) / pipelined)
        if draft_s > 0:
            self.set_overlap(max(0.0, 1 - sum(r[3] for r in self._recent) / draft_s))

    def set_active_sessions(self, n: int) -> None:
        self.active_sessions.set(n)

    def set_pipeline_hit_rate(self, rate: float) -> None:
        self._pooled["hit_rate"] = rate
        self.pipeline_hit_rate.set(rate)

    def set_overlap(self, overlap: float) -> None:
        self._pooled["overlap"] = overlap
        self.overlap.set(overlap)

    def watch_active_sessions(self, read: Callable[[], int], interval_s: float = 1.0) -> None:
        """Sample ``read()`` into the active-sessions gauge every ``interval_s`` on a
        daemon thread (Ray exports at most once a second, so sampling loses nothing;
        it also covers unary requests, which yield nothing until they end)."""
        def sample():
            try:
                self.set_active_sessions(read())
                # Ray 2.60 drops a gauge value not set again within two report
                # intervals, so the pooled gauges are set again with every sample.
                if "hit_rate" in self._pooled:
                    self.pipeline_hit_rate.set(self._pooled["hit_rate"])
                if "overlap" in self._pooled:
                    self.overlap.set(self._pooled["overlap"])
            except Exception:  # never let a metric take the replica down
                logger.exception("sampling active sessions failed")

        def loop():
            while not self._stop.wait(interval_s):
                sample()

        sample()
        threading.Thread(target=loop, name="outrider-active-sessions", daemon=True).start()

    def close(self) -> None:
        self._stop.set()


def _inc(counter, value: float, tags: dict) -> None:
    if value > 0:  # Ray counters refuse increments <= 0
        counter.inc(value, tags)


def finish_label(stats: outrider_pb2.GenerationStats) -> str:
    """Why a sample ended: "length", "stop_token" (EOS or a stop token id) or "stop_string"."""
    if stats.finish_reason != "stop":
        return "length"
    return "stop_string" if stats.stop_sequence else "stop_token"


def method_label(request: outrider_pb2.GenerateRequest, default_method: str) -> str:
    """The speculation method a request asked for ("draft", "ngram", "none"), with the
    server's default resolved; "unknown" for a value the gateway will refuse."""
    value = request.speculation.method
    if value == outrider_pb2.SPECULATION_METHOD_UNSPECIFIED:
        return default_method
    try:
        return outrider_pb2.SpeculationMethod.Name(value).removeprefix("SPECULATION_METHOD_").lower()
    except ValueError:
        return "unknown"


class RequestOutcome:
    """Records one request exactly once, as a context manager around its handling:
    ``finish(stats)`` (or ``see(chunk)`` on each streamed chunk) records OK with the
    final stats; leaving the block without that records ``code`` when the caller set
    it (INVALID_ARGUMENT, RESOURCE_EXHAUSTED), CANCELLED on a cancellation (a client
    that went away or whose deadline passed: the gateway sees both as a cancellation),
    else INTERNAL. ``metrics=None`` records nothing. A failing metric is logged, never
    raised into the request."""

    def __init__(self, metrics: SpecDecodeMetrics | None, method: str):
        self.metrics = metrics
        self.method = method
        self.code: str | None = None
        self.recorded = False

    def see(self, chunk: outrider_pb2.GenerateChunk) -> None:
        if not chunk.HasField("stats"):
            return
        if not self.recorded:
            self.finish(chunk.stats)
        else:  # another of the request's samples
            self._sample(chunk.stats)

    def finish_response(self, response: outrider_pb2.GenerateResponse) -> None:
        """A unary request's outcome: OK, with each of its samples' stats."""
        self.finish(response.stats)
        for sample in response.samples[1:]:
            self._sample(sample.stats)

    def _sample(self, stats: outrider_pb2.GenerationStats) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.record_sample(stats, self.method)
        except Exception:
            logger.exception("recording sample metrics failed")

    def finish(self, stats: outrider_pb2.GenerationStats) -> None:
        self._record(stats, "OK")

    def __enter__(self) -> "RequestOutcome":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            code = "UNKNOWN"  # ended without stats or an error: not expected
        elif self.code:
            code = self.code
        elif issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
            code = "CANCELLED"
        else:
            code = "INTERNAL"
        self._record(None, code)
        return False

    def _record(self, stats, code: str) -> None:
        if self.recorded:
            return
        self.recorded = True
        if self.metrics is None:
            return
        try:
            self.metrics.record_request(stats, code, self.method)
        except Exception:
            logger.exception("recording request metrics failed")


_store_bytes = None
_store_lock = threading.Lock()


def set_session_store_bytes(n: int, application: str = "") -> None:
    """Set ``outrider_session_store_bytes``: object-store bytes held by session state
    (draft KV chunks and shared prefix blocks). For the session store actor to call
    whenever what it holds changes (the gauge is this process's, created on first use;
    Ray re-exports its last value every report interval until the process exits)."""
    global _store_bytes
    with _store_lock:
        if _store_bytes is None:
            from ray.util.metrics import Gauge

            _store_bytes = Gauge("outrider_session_store_bytes",
                                 "Object-store bytes held by session state (draft KV, shared prefixes).",
                                 tag_keys=("application",))
    _store_bytes.set(n, {"application": application})


def watch_gauges(gauges: dict[str, tuple[str, Callable[[], float]]], application: str, replica: str,
                 interval_s: float = 1.0) -> threading.Event:
    """Sample each ``{name: (description, read)}`` of a replica into its gauge every
    ``interval_s`` on a daemon thread (set again each time: Ray drops a gauge value not
    set within two report intervals). Returns the event that stops it."""
    from ray.util.metrics import Gauge

    tags = {"application": application, "replica": replica}
    metrics = {name: (Gauge(name, description, tag_keys=tuple(tags)), read) for name, (description, read) in gauges.items()}
    stop = threading.Event()

    def loop():
        while True:
            for name, (gauge, read) in metrics.items():
                try:
                    gauge.set(read(), tags)
                except Exception:  # never let a metric take the replica down
                    logger.exception("sampling %s failed", name)
            if stop.wait(interval_s):
                return

    threading.Thread(target=loop, name="outrider-gauges", daemon=True).start()
    return stop


def watch_kv_pool(read: Callable[[], tuple[int, int]], application: str, replica: str, model: str = "target",
                  interval_s: float = 1.0) -> threading.Event:
    """A replica's KV pool, ``read() -> (used, capacity)`` positions: a verifier's target
    pool as ``outrider_kv_pool_*``, a draft worker's (``model="draft"``) as
    ``outrider_draft_kv_pool_*``."""
    prefix, setting = ("outrider_kv_pool", "kv_cache_bytes") if model == "target" else \
        ("outrider_draft_kv_pool", "draft_kv_cache_bytes")
    return watch_gauges({
        f"{prefix}_used_positions": (f"{model.capitalize()} KV pool positions in blocks sessions hold.",
                                     lambda: read()[0]),
        f"{prefix}_capacity_positions": (f"{model.capitalize()} KV pool positions in all ({setting}).",
                                         lambda: read()[1]),
    }, application, replica, interval_s)


def watch_goodput(controller, application: str, replica: str, interval_s: float = 1.0) -> threading.Event:
    """A verifier replica's goodput controller (core/goodput.py): what it plans and what
    it gets."""
    return watch_gauges({
        "outrider_goodput_predicted_tokens_per_second": (
            "Committed tokens/s the goodput controller's current plan expects on this verifier replica.",
            lambda: controller.predicted),
        "outrider_goodput_measured_tokens_per_second": (
            "Committed tokens/s over this verifier replica's recent passes.", controller.measured_goodput),
        "outrider_sessions_not_speculating": (
            "Sessions the goodput controller has stopped drafting for (re-probed now and then).",
            lambda: controller.not_speculating),
        "outrider_planned_gamma": ("Mean gamma the goodput controller plans for this replica's drafting sessions.",
                                   controller.mean_planned_gamma),
    }, application, replica, interval_s)
