"""OpenTelemetry tracing: off by default at no cost; in-process, the span tree of a
pipelined session; for real, one trace per request across the gateway, verifier and
draft worker processes of a multi-node Ray cluster, written by the JSON-lines exporter."""

import asyncio
import json
import time
from pathlib import Path
from collections import Counter

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.bench.loopback import Loopback
from services.rpc.auth import TOKEN_ENV
from services.telemetry import tracing
from tiny_models import tiny

# Over one 64-token prefix block, so a second request reuses the first one's blocks.
PROMPT = (
    "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Parse the arguments and run the command.\"\"\"\n"
    "    parser = make_parser()\n    args = parser.parse_args(argv)\n    if args.verbose:\n"
    "        print('starting', file=sys.stderr)\n    for name in sorted(os.listdir(args.path)):\n"
)

CLIENT_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECRETS = ("hf_sentinel_0123456789abcdef", "internal_sentinel_fedcba9876543210")


@pytest.fixture
def tracing_off():
    tracing.use_provider(None)
    yield
    tracing.use_provider(None)


def test_without_an_exporter_tracing_is_the_no_op_path(tracing_off, monkeypatch):
    for name in ("OTEL_TRACES_EXPORTER", tracing.FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert tracing.exporters_from_env() == []
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert not tracing.setup_tracing("outrider-test")
    assert not tracing.enabled()
    assert isinstance(tracing.tracer(), trace.NoOpTracer)
    span = tracing.start_span("outrider.round")
    assert span is trace.INVALID_SPAN and not span.is_recording()
    assert tracing.inject(span) == ("", "")
    assert tracing.extract("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") is None
    assert tracing.grpc_metadata("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") is None
    assert tracing.request_parent() is None


def test_exporters_follow_the_otel_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,console")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")  # read by the SDK's exporter
    monkeypatch.setenv(tracing.FILE_ENV, str(tmp_path / "spans.jsonl"))
    found = tracing.exporters_from_env()
    assert [type(e) for e in found] == [OTLPSpanExporter, ConsoleSpanExporter, tracing.JsonLinesSpanExporter]
    assert found[0]._endpoint == "http://collector:4318/v1/traces"
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "zipkin"}) == []  # unsupported: warned, ignored


def test_otlp_over_grpc_when_the_environment_asks(monkeypatch):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    monkeypatch.delenv(tracing.FILE_ENV, raising=False)
    for key in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        (found,) = tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp", key: "grpc"})
        assert isinstance(found, GrpcExporter)
    (found,) = tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert isinstance(found, OTLPSpanExporter)


def test_the_environment_names_the_service_over_outriders_defaults(tracing_off, tmp_path, monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv(tracing.FILE_ENV, str(tmp_path / "spans.jsonl"))
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert tracing.setup_tracing("outrider-verifier")
    attrs = tracing._provider.resource.attributes
    assert attrs["service.name"] == attrs["outrider.role"] == "outrider-verifier"
    tracing.use_provider(None)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-serving")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.namespace=ml")
    assert tracing.setup_tracing("outrider-verifier")
    attrs = tracing._provider.resource.attributes
    assert attrs["service.name"] == "llm-serving" and attrs["outrider.role"] == "outrider-verifier"
    assert attrs["deployment.environment"] == "prod" and attrs["service.namespace"] == "ml"


class ClientContext:
    """Serve's RayServegRPCContext as far as the gateway reads it."""

    def __init__(self, metadata):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


def test_a_clients_context_is_read_with_the_configured_propagators(tracing_off):
    tracing.use_provider(TracerProvider())
    parent = tracing.request_parent(ClientContext([("traceparent", CLIENT_TRACEPARENT), ("baggage", "tenant=a")]))
    span = trace.get_current_span(parent).get_span_context()
    _, trace_id, span_id, _ = CLIENT_TRACEPARENT.split("-")
    assert (format(span.trace_id, "032x"), format(span.span_id, "016x")) == (trace_id, span_id)
    from opentelemetry import baggage

    assert baggage.get_baggage("tenant", parent) == "a"  # OTEL_PROPAGATORS default: tracecontext,baggage
    assert tracing.request_parent(ClientContext([("user-agent", "grpc")])) is None
    assert tracing.request_parent(None) is None


def test_context_round_trips_through_traceparent(tracing_off):
    provider = TracerProvider()
    tracing.use_provider(provider)
    span = tracing.start_span("outrider.generate")
    traceparent, _ = tracing.inject(span)
    assert traceparent.startswith("00-") and int(traceparent.rsplit("-", 1)[1], 16) & 1  # sampled
    child = tracing.start_span("outrider.round", tracing.extract(traceparent))
    assert child.get_span_context().trace_id == span.get_span_context().trace_id
    assert child.parent.span_id == span.get_span_context().span_id
    assert tracing.from_metadata(tracing.grpc_metadata(traceparent)) is not None
    assert tracing.extract("garbage") is None


def test_a_pipelined_session_forms_one_tree(tracing_off):
    """In-process (verifier and drafter services over loopback gRPC): a perfect draft at
    a fixed gamma, so every round after the first drafted one runs on a branch drafted
    under the previous round, while that round verified (held by the verifier or sent
    from the cache). Rounds decoded while the worker read the prompt had no block."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    target = tiny("llama", seed=3)

    async def go():
        async with Loopback(target, target, load_aware_gamma=False) as loop:
            return await loop.generate([5, 17, 33, 2, 9], 32, gamma=4)

    _, stats = asyncio.run(go())
    spans = [tracing.span_record(s) for s in exporter.get_finished_spans()]
    check_tree(spans, stats)
    # Every round after the reading ones but the last had a block in flight, and ran on
    # its branch; only the round before a last one with no room to draft may have none.
    assert stats.pipeline_rounds == stats.rounds - 1 - stats.reading_rounds
    assert stats.pipeline_rounds - 1 <= stats.cache_hits == stats.cache_hits_full <= stats.pipeline_rounds


def check_tree(spans: list[dict], stats) -> dict:
    """The request's span tree, checked against its final stats; returns it by name."""
    assert len({s["trace_id"] for s in spans}) == 1
    by_id = {s["span_id"]: s for s in spans}
    names = Counter(s["name"] for s in spans)
    assert names["outrider.generate"] == 1 and names["outrider.prefill"] == 1 and names["outrider.draft_session"] == 1
    assert names["outrider.round"] == names["outrider.verify"] == stats.rounds
    (root,) = [s for s in spans if s["name"] == "outrider.generate"]
    for s in spans:  # every parent is in the trace
        assert s is root or s["parent_span_id"] in by_id, s
    rounds = {s["attributes"]["outrider.round"]: s for s in spans if s["name"] == "outrider.round"}
    assert sorted(rounds) == list(range(stats.rounds))
    for r in rounds.values():
        assert r["parent_span_id"] == root["span_id"]
        for key in ("outrider.session_id", "outrider.request_id", "outrider.gamma", "outrider.accepted",
                    "outrider.bonus_kept", "outrider.pipeline_hit"):
            assert key in r["attributes"], (key, r)
    assert sum(r["attributes"]["outrider.accepted"] for r in rounds.values()) == stats.accepted
    assert sum(r["attributes"]["outrider.pipeline_hit"] for r in rounds.values()) == stats.pipeline_hits
    verify = {}
    for v in (s for s in spans if s["name"] == "outrider.verify"):
        parent = by_id[v["parent_span_id"]]
        assert parent["name"] == "outrider.round" and v["attributes"]["outrider.batch_size"] >= 1
        assert v["attributes"]["outrider.gamma"] == parent["attributes"]["outrider.gamma"]
        verify[parent["attributes"]["outrider.round"]] = v
    assert sorted(verify) == sorted(rounds)
    drafts = [s for s in spans if s["name"] == "outrider.draft"]
    for d in drafts:
        parent = by_id[d["parent_span_id"]]
        assert parent["name"] == "outrider.round"
        # A fresh block is drafted under its own round; an early one under the round
        # verified meanwhile (the one before it).
        early = d["attributes"]["outrider.early"]
        assert d["attributes"]["outrider.round"] == parent["attributes"]["outrider.round"] + early
        assert ("draft.early_started" in [e["name"] for e in d["events"]]) == early
    # Every round's block was drafted: fresh, or early under the previous round; a round
    # decoded while the worker read the prompt had none, and the round after it may
    # verify the rest of the first block, drafted for the first round.
    reading = [n for n, r in rounds.items() if r["attributes"].get("outrider.reading")]
    assert len(reading) == stats.reading_rounds
    for n, r in rounds.items():
        if n in reading:
            assert r["attributes"]["outrider.gamma"] == 0
            continue
        drafted_for = r["attributes"].get("outrider.rest_of", n)
        kind = r["attributes"]["outrider.early_block"]
        assert any(d["attributes"]["outrider.round"] == drafted_for and d["attributes"]["outrider.early"] == kind
                   for d in drafts)
    events = Counter(e["name"] for r in rounds.values() for e in r["events"])
    assert events["draft.early_kept"] == stats.pipeline_hits
    assert events["draft.early_kept"] + events["draft.early_discarded"] == stats.pipeline_rounds
    # Pipelining, seen in time: an early block kept for round k+1 was drafted while
    # round k verified.
    overlaps = [
        (d, verify[n - 1]) for d in drafts for n in [d["attributes"]["outrider.round"]]
        if d["attributes"]["outrider.early"] and n in rounds and rounds[n]["attributes"]["outrider.early_block"]
        and d["start_ns"] < verify[n - 1]["end_ns"] and verify[n - 1]["start_ns"] < d["end_ns"]
    ]
    if stats.cache_hits:
        assert overlaps
    return {"root": root, "rounds": rounds, "verify": verify, "drafts": drafts, "by_name": names}


def read_spans(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_trace(path, request_id: str, stats, timeout: float = 60.0) -> list[dict]:
    """The spans of ``request_id``'s trace, once every process has exported them (each
    exports in batches, every OTEL_BSP_SCHEDULE_DELAY ms)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = read_spans(path)
        traces = {s["trace_id"] for s in spans if s["attributes"].get("outrider.request_id") == request_id}
        mine = [s for s in spans if s["trace_id"] in traces]
        names = Counter(s["name"] for s in mine)
        complete = (names["outrider.generate"] and names["outrider.draft_session"] and names["outrider.prefill"]
                    and names["outrider.round"] == names["outrider.verify"] == stats.rounds)
        if complete or time.monotonic() > deadline:
            assert len(traces) == 1, f"{request_id}: spans in {len(traces)} traces"
            return mine
        time.sleep(0.25)


def test_a_served_request_is_one_trace_across_processes(tmp_path):
    from serving_cluster import serving_cluster
    from services.gateway.client import make_request

    import ray

    path = tmp_path / "spans.jsonl"
    env = {tracing.FILE_ENV: str(path), "OTEL_TRACES_EXPORTER": "none", "OTEL_BSP_SCHEDULE_DELAY": "200",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0",
           # Secrets every process holds, as the pods get them from Secrets on k8s/.
           "HF_TOKEN": SECRETS[0], TOKEN_ENV: SECRETS[1]}
    with serving_cluster(env=env) as (client, _):
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        chunks = list(client.generate(make_request(PROMPT, 48, method="draft", gamma=4, pipeline=True), timeout=120))
        stats, request_id = chunks[-1].stats, chunks[0].request_id
        spans = wait_for_trace(path, request_id, stats)
        # The same prompt again, from a client that traces too: its prefix blocks come
        # from the object store, and its trace is the client's.
        again = list(client.stub.Generate(make_request(PROMPT, 8, method="draft", gamma=4), timeout=120,
                                          metadata=(("traceparent", CLIENT_TRACEPARENT),)))
        spans_again = wait_for_trace(path, again[0].request_id, again[-1].stats)

    assert stats.emitted == 48 and stats.cache_hits > 0
    tree = check_tree(spans, stats)
    assert tree["root"]["parent_span_id"] is None  # Serve's tracing is off: Outrider's trace stands alone
    # No secret reaches a span or a log line, in any process.
    text = path.read_text()
    assert text and not any(secret in text for secret in SECRETS)
    files = [f for f in logs.rglob("*") if f.is_file()]
    assert len([f for f in files if "replica_outrider" in f.name]) >= 3  # every replica's log is read
    leaks = [str(f) for f in files if any(s.encode() in f.read_bytes() for s in SECRETS)]
    assert not leaks
    assert tree["root"]["attributes"]["outrider.request_id"] == request_id
    # Three processes on three nodes: gateway, verifier, draft worker.
    where = {(s["resource"]["service.name"], s["resource"]["process.pid"], s["resource"]["ray.node_id"]) for s in spans}
    assert {w[0] for w in where} == {"outrider-gateway", "outrider-verifier", "outrider-drafter"}
    assert len({w[1] for w in where}) == 3 and len({w[2] for w in where}) == 3
    service = {name: {s["resource"]["service.name"] for s in spans if s["name"] == name} for name in tree["by_name"]}
    assert service == {"outrider.generate": {"outrider-gateway"}, "outrider.round": {"outrider-verifier"},
                       "outrider.verify": {"outrider-verifier"}, "outrider.prefill": {"outrider-verifier"},
                       "outrider.draft": {"outrider-drafter"}, "outrider.draft_session": {"outrider-drafter"}}
    # Bytes through the object store: none for a new prompt, its prefix blocks for the second request.
    (prefill,) = [s for s in spans if s["name"] == "outrider.prefill"]
    (prefill_again,) = [s for s in spans_again if s["name"] == "outrider.prefill"]
    assert prefill["attributes"]["outrider.object_store_bytes"] == 0
    assert prefill_again["attributes"]["outrider.cached_prefix_tokens"] == 64
    assert prefill_again["attributes"]["outrider.object_store_bytes"] > 0
    (session_again,) = [s for s in spans_again if s["name"] == "outrider.draft_session"]
    assert session_again["attributes"]["outrider.object_store_bytes"] > 0
    # Serve's tracing is off, so the client's traceparent reaches the gateway only as
    # gRPC metadata: the request span continues the client's trace under its span.
    (root_again,) = [s for s in spans_again if s["name"] == "outrider.generate"]
    _, trace_id, span_id, _ = CLIENT_TRACEPARENT.split("-")
    assert root_again["trace_id"] == trace_id and root_again["parent_span_id"] == span_id
    assert {s["trace_id"] for s in spans_again} == {trace_id}
