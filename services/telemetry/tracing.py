"""OpenTelemetry tracing: one trace per request, across the gateway, the verifier and
the draft worker.

Spans (their ``outrider.*`` attributes: README "Tracing")::

    outrider.generate            gateway: the gRPC request
      outrider.prefill           verifier: the target's prompt KV
      outrider.round (xN)        verifier: one verification round
        outrider.verify          verifier: the target forward + acceptance (batched pass)
        outrider.draft           draft worker: the block for this round, or the early
                                 block for the next one drafted while this one verifies
      outrider.draft_session     draft worker: one Drafter.Draft stream

Context crosses every hop as W3C ``traceparent``/``tracestate``: in ``VerifyRequest``
(gateway -> verifier, a serialized proto through a Serve handle), in the Drafter.Draft
call's gRPC metadata (the request's context, for the draft session) and in each
``DraftOpen``/``RoundOutcome`` (the context of the round the worker drafts for).

Configuration is the standard OpenTelemetry environment, read once per process by
``setup_tracing``: ``OTEL_TRACES_EXPORTER`` = ``otlp`` (OTLP to
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` over ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``
``http/protobuf``, the default, or ``grpc``), ``console`` or ``none`` (the default:
tracing off), comma-separated for several; ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_*``, ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` are read by the SDK itself, and win over Outrider's
defaults (``service.name`` is the role unless ``OTEL_SERVICE_NAME`` says otherwise;
``outrider.role`` always is). A client's trace context is read from its gRPC metadata
with the propagators ``OTEL_PROPAGATORS`` names (W3C trace context and baggage by
default, as the SDK does); between Outrider's own processes it always travels as W3C
``traceparent``/``tracestate`` fields of the internal protos. Outrider adds
``OUTRIDER_TRACES_FILE=/path``: spans appended to a file as JSON lines (tests, quick
looks). Ray workers inherit their raylet's environment, so set these where the nodes
start (the pod spec, or ``os.environ`` before ``ray.cluster_utils.Cluster``), or pass
them as ``runtime_env={"env_vars": ...}`` to ``ray.init``: Serve replicas get both.

Off costs nothing: with no exporter, ``tracer()`` is OpenTelemetry's no-op tracer,
``start_span`` returns the shared invalid span without creating anything, ``inject``
returns empty strings, and callers compute attributes only under ``span.is_recording()``
(``outrider bench --tracing`` times a pipelined round's tracing calls at about 1 us off).

Ray Serve's own tracing (Ray 2.60, ``ray/serve/_private/tracing_utils.py``): off by
default; on with ``serve.start(tracing_config=TracingConfig(enabled=True, ...))`` or
``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` (sampling ``RAY_SERVE_TRACING_SAMPLING_RATIO``,
0.01 by default). When on, the gRPC proxy extracts the client's ``traceparent`` metadata
and starts ``proxy_grpc_request``, the router ``route_to_replica``, and the replica
``replica_handle_request gateway Generate``, which it attaches as the current
OpenTelemetry context around the user method (the context survives the hop to Serve's
user-code event loop). Checked on a local cluster with Serve tracing on and a client
traceparent: all of them and all of Outrider's spans were one trace, client ->
proxy_grpc_request -> route_to_replica -> replica_handle_request -> outrider.generate ->
(Serve's route_to_replica verifier Verify, and Outrider's rounds). So at the gateway,
``request_parent`` takes ``opentelemetry.context.get_current()`` when it holds a span;
when Serve does not trace the context is empty, and it falls back to the client's own
gRPC metadata (read with the ``OTEL_PROPAGATORS`` propagators), else a new trace.
Serve installs its provider as the process-global one (``trace.set_tracer_provider``,
allowed once per process), so Outrider keeps a provider of its own and never sets the
global one: they coexist, sharing only the API-level context. With a parent-based
sampler (the default) Outrider then follows Serve's sampling decision, so Serve's ratio
(1% by default) also limits which requests Outrider traces. Serve's
spans go to Serve's exporter (by default files under the session's
``logs/serve/spans/``); Outrider's follow ``OTEL_*``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

FILE_ENV = "OUTRIDER_TRACES_FILE"
TRACER_NAME = "outrider"

_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP = trace.NoOpTracer()
_tracer: trace.Tracer = _NOOP
_provider = None  # the SDK TracerProvider while tracing is on
_enabled = False


def enabled() -> bool:
    return _enabled


def tracer() -> trace.Tracer:
    """Outrider's tracer: the no-op one while tracing is off."""
    return _tracer


def setup_tracing(service_name: str, serve_replica: bool = False, **resource_attributes) -> bool:
    """Configure this process's tracing from the environment (once; later calls keep
    the first setup). Returns whether tracing is on. ``service.name`` is the role
    (``outrider-gateway``, ...); ``process.pid`` tells replicas apart; a Serve replica
    (``serve_replica``) also records its replica id, deployment and Ray node."""
    if _provider is not None:
        return True
    exporters = exporters_from_env()
    if not exporters:
        return False
    if serve_replica:
        resource_attributes = {**_serve_replica_attributes(), **resource_attributes}
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from opentelemetry.sdk.resources import OTELResourceDetector

    # Outrider's defaults, then the environment's OTEL_RESOURCE_ATTRIBUTES and
    # OTEL_SERVICE_NAME over them (Resource.create alone would let ours win).
    defaults = {"service.name": service_name, "outrider.role": service_name, "process.pid": os.getpid(),
                **resource_attributes}
    resource = Resource.create(defaults).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER[_ARG], read by the SDK
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* apply
    use_provider(provider)
    return True


def _serve_replica_attributes() -> dict:
    import ray
    from ray import serve

    replica = serve.get_replica_context()
    return {"ray.node_id": ray.get_runtime_context().get_node_id(), "serve.replica": replica.replica_id.unique_id,
            "serve.deployment": replica.deployment}


def use_provider(provider) -> None:
    """Trace with ``provider`` (an SDK ``TracerProvider``), or turn tracing off (None).
    ``setup_tracing`` calls it; the tracing benchmark and tests switch with it."""
    global _tracer, _provider, _enabled
    _provider = provider
    _tracer = _NOOP if provider is None else provider.get_tracer(TRACER_NAME)
    _enabled = provider is not None


def exporters_from_env(environ: Mapping[str, str] = os.environ) -> list:
    """The span exporters the environment asks for (none: tracing off)."""
    exporters = []
    for name in (n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",")):
        if name in ("", "none"):
            continue
        if name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                if protocol not in (None, "", "http/protobuf"):
                    log.warning("OTLP protocol %r is not supported (grpc, http/protobuf); using http/protobuf", protocol)
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporters.append(OTLPSpanExporter())  # endpoint, headers, timeout, TLS: OTEL_EXPORTER_OTLP_*
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER=%r is not supported (otlp, console, none); ignored", name)
    path = environ.get(FILE_ENV)
    if path:
        exporters.append(JsonLinesSpanExporter(path))
    return exporters


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object a line. The SDK has no file
    exporter (its ``ConsoleSpanExporter`` writes multi-line JSON to a stream, which
    several processes cannot share), and tests need every process's spans in one place
    without a collector. Each batch is one ``write`` on an ``O_APPEND`` descriptor, so
    processes appending to the same file never interleave within a line. Times are
    Unix nanoseconds."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.fd: int | None = None

    def export(self, spans: Sequence) -> SpanExportResult:
        data = "".join(json.dumps(span_record(span), separators=(",", ":")) + "\n" for span in spans).encode()
        try:
            with self.lock:
                if self.fd is None:
                    self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(self.fd, data)
        except OSError as error:
            log.warning("could not write spans to %s: %r", self.path, error)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(span) -> dict:
    """A finished SDK span as a plain dict (ids in hex, times in Unix ns)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
                   for e in span.events],
        "resource": dict(span.resource.attributes),
    }


def start_span(name: str, parent: otel_context.Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
               start_time: int | None = None, attributes: dict | None = None) -> Span:
    """A span under ``parent`` (a context; None: the current one). While tracing is
    off, the shared invalid span: nothing is created."""
    if not _enabled:
        return INVALID_SPAN
    return _tracer.start_span(name, context=parent, kind=kind, start_time=start_time, attributes=attributes)


def context_of(span: Span) -> otel_context.Context | None:
    """A context whose current span is ``span``, to parent children on; None while off."""
    if not _enabled:
        return None
    return trace.set_span_in_context(span)


def inject(span: Span) -> tuple[str, str]:
    """(traceparent, tracestate) of ``span``; empty strings while off or for a span
    that carries no valid context."""
    if not _enabled or not span.get_span_context().is_valid:
        return "", ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def extract(traceparent: str | None, tracestate: str | None = "") -> otel_context.Context | None:
    """The context a (traceparent, tracestate) pair carries; None while off or when
    there is none (a missing or malformed traceparent)."""
    if not _enabled or not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def grpc_metadata(traceparent: str, tracestate: str = "") -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying a (traceparent, tracestate) pair; None while off."""
    if not _enabled or not traceparent:
        return None
    return (("traceparent", traceparent),) + ((("tracestate", tracestate),) if tracestate else ())


def from_metadata(pairs) -> otel_context.Context | None:
    """The context in gRPC invocation metadata (``traceparent``/``tracestate``)."""
    if not _enabled or not pairs:
        return None
    found = {key: value for key, value in pairs if key in ("traceparent", "tracestate")}
    return extract(found.get("traceparent"), found.get("tracestate", ""))


def request_parent(grpc_context=None) -> otel_context.Context | None:
    """The parent of a request's span at the gateway: the current context when it holds
    a span (Serve's ``replica_handle_request`` span, when Serve's own tracing is on),
    else the context in the client's gRPC metadata as the ``OTEL_PROPAGATORS``
    propagators read it, else None (a new trace)."""
    if not _enabled:
        return None
    current = otel_context.get_current()
    if trace.get_current_span(current).get_span_context().is_valid:
        return current
    metadata = getattr(grpc_context, "invocation_metadata", None)
    if not callable(metadata):
        return None
    from opentelemetry import propagate  # its global propagator follows OTEL_PROPAGATORS

    ctx = propagate.extract({key.lower(): value for key, value in metadata() or () if isinstance(value, str)})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


@contextmanager
def activated(ctx: otel_context.Context | None) -> Iterator[None]:
    """``ctx`` as the current context inside the block (nothing when None). Only for
    synchronous blocks: a context attached across an ``await`` or ``yield`` may be
    detached in another task's context."""
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def record_error(span: Span, error: BaseException) -> None:
    if span.is_recording():
        from opentelemetry.trace import Status, StatusCode

        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

