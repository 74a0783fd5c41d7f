"""Speculative-decoding metrics: recording logic against a fake backend, then for real:
a multi-node Ray cluster serving the app, its head node's Prometheus endpoint scraped
and compared with the requests' own GenerationStats."""

import asyncio
import json
import math
import re
import time
import types
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
import ray
import torch
from ray import serve

from serving_cluster import APP, serving_cluster
from services.core.kv_chunks import KVChunk
from services.gateway.client import make_request
from services.rpc import outrider_pb2
from services.telemetry.metrics import (
    PHASES, TTFT_BUCKETS_S, RequestOutcome, SpecDecodeMetrics, method_label,
)


class FakeMetric:
    """Records like ray.util.metrics, and refuses what it refuses."""

    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.boundaries, self.tag_keys, self.defaults = name, boundaries, tag_keys, {}
        self.values = defaultdict(list)

    def set_default_tags(self, tags):
        assert set(tags) <= set(self.tag_keys)
        self.defaults = tags
        return self

    def _record(self, value, tags=None):
        final = {**self.defaults, **(tags or {})}
        assert set(final) == set(self.tag_keys), (self.name, final)
        self.values[tuple(sorted((k, v) for k, v in final.items() if k not in self.defaults))].append(value)

    def inc(self, value=1.0, tags=None):
        assert value > 0
        self._record(value, tags)

    observe = set = _record

    def total(self, **match):
        return sum(sum(v) for k, v in self.values.items() if set(match.items()) <= set(k))


def fake_metrics(**kwargs):
    backend = types.SimpleNamespace(Counter=FakeMetric, Gauge=FakeMetric, Histogram=FakeMetric)
    return SpecDecodeMetrics("outrider", "gateway", "r1", backend=backend, **kwargs)


def stats(**fields):
    return outrider_pb2.GenerationStats(**{
        "rounds": 4, "drafted": 10, "accepted": 7, "rejections": 2, "emitted": 11,
        "drafted_per_position": [4, 3, 2, 1], "accepted_per_position": [3, 2, 1, 1],
        "mean_acceptance_length": 2.75, "draft_s": 0.4, "exposed_draft_s": 0.1, "verify_s": 0.8,
        "transport_s": 0.04, "queue_s": 0.02, "total_s": 1.1, "time_to_first_token_s": 0.3,
        "pipeline_rounds": 3, "pipeline_hits": 2, "draft_bytes": 5000, "accepted_per_rank": [5, 2], **fields,
    })


def test_record_request_counts_every_stat_once():
    m = fake_metrics()
    m.record_request(stats(), "OK", "draft")
    assert m.requests.values == {(("code", "OK"), ("method", "draft")): [1]}
    assert (m.rounds.total(), m.drafts.total(), m.drafted_tokens.total(), m.accepted_tokens.total()) == (4, 4, 10, 7)
    assert (m.rejections.total(), m.emitted_tokens.total()) == (2, 11)
    assert [m.accepted_by_position.total(position=str(i)) for i in range(4)] == [3, 2, 1, 1]
    assert [m.drafted_by_position.total(position=str(i)) for i in range(4)] == [4, 3, 2, 1]
    assert [m.accepted_by_rank.total(rank=str(i)) for i in range(2)] == [5, 2]
    assert m.phase_seconds.total(phase="draft") == pytest.approx(0.1)  # exposed draft time
    assert m.draft_compute_seconds.total() == pytest.approx(0.4)
    per_round = [m.round_phase.values[(("method", "draft"), ("phase", p))] for p in PHASES]
    assert per_round == [[pytest.approx(v)] for v in (0.025, 0.2, 0.01, 0.005)]  # draft, verify, transport, queue
    assert m.acceptance_length.total() == 2.75 and m.ttft.total() == 0.3
    assert m.tokens_per_s.total() == pytest.approx(10.0)
    assert (m.pipeline_rounds.total(), m.pipeline_hits.total()) == (3, 2)
    assert m.draft_bytes.total() == 5000
    assert m.pipeline_hit_rate.values[()] == [pytest.approx(2 / 3)]
    assert m.overlap.values[()] == [pytest.approx(0.75)]


def test_target_only_requests_skip_acceptance_length_and_failures_only_count():
    m = fake_metrics(window=2)
    m.record_request(stats(rounds=5, drafted=0, accepted=0, rejections=0, drafted_per_position=[],
                           accepted_per_position=[], draft_s=0, exposed_draft_s=0, pipeline_rounds=0,
                           pipeline_hits=0), "OK", "none")
    m.record_request(None, "RESOURCE_EXHAUSTED", "draft")
    assert not m.acceptance_length.values and not m.drafts.values and not m.pipeline_hit_rate.values
    assert m.rounds.total() == 5 and len(m.ttft.values[(("method", "none"),)]) == 1
    assert m.requests.total(code="RESOURCE_EXHAUSTED") == 1 and m.requests.total() == 2
    for hits in (0, 3, 3):  # pooled over the last two requests that pipelined
        m.record_request(stats(pipeline_rounds=3, pipeline_hits=hits), "OK", "draft")
    assert m.pipeline_hit_rate.values[()][-3:] == pytest.approx([0, 0.5, 1.0])


def test_each_sample_of_a_request_counts_with_why_it_ended():
    m = fake_metrics()
    with RequestOutcome(m, "draft") as outcome:
        outcome.see(outrider_pb2.GenerateChunk(token_ids=[1]))
        outcome.see(outrider_pb2.GenerateChunk(stats=stats(finish_reason="stop", stop_token_id=2)))
        outcome.see(outrider_pb2.GenerateChunk(index=1, stats=stats(finish_reason="stop", stop_sequence="\n\n")))
        outcome.see(outrider_pb2.GenerateChunk(index=2, stats=stats(finish_reason="length")))
    assert m.requests.total() == 1 and m.emitted_tokens.total() == 33
    assert [m.finished.total(reason=r) for r in ("stop_token", "stop_string", "length")] == [1, 1, 1]
    unary = fake_metrics()
    response = outrider_pb2.GenerateResponse(stats=stats(), samples=[outrider_pb2.Sample(stats=stats()) for _ in range(2)])
    with RequestOutcome(unary, "draft") as outcome:
        outcome.finish_response(response)
    assert unary.requests.total() == 1 and unary.emitted_tokens.total() == 22


@pytest.mark.parametrize("error,code", [
    (asyncio.CancelledError(), "CANCELLED"), (GeneratorExit(), "CANCELLED"), (RuntimeError("x"), "INTERNAL"),
])
def test_request_outcome_codes(error, code):
    m = fake_metrics()
    with pytest.raises(type(error)):
        with RequestOutcome(m, "draft"):
            raise error
    with pytest.raises(ValueError):
        with RequestOutcome(m, "draft") as outcome:
            outcome.code = "INVALID_ARGUMENT"
            raise ValueError
    with pytest.raises(asyncio.CancelledError):  # cancelled after the stats: counted once, OK
        with RequestOutcome(m, "draft") as outcome:
            outcome.see(outrider_pb2.GenerateChunk(stats=stats()))
            raise asyncio.CancelledError
    assert {k[0][1]: v for k, v in m.requests.values.items()} == {code: [1], "INVALID_ARGUMENT": [1], "OK": [1]}
    with RequestOutcome(None, "draft") as outcome:  # no metrics: records nothing, raises nothing
        outcome.finish(stats())


def test_method_label():
    assert [method_label(make_request("x", method=m), "draft") for m in ("draft", "ngram", "none")] == \
        ["draft", "ngram", "none"]
    assert method_label(make_request("x"), "ngram") == "ngram"
    request = make_request("x")
    request.speculation.method = 42
    assert method_label(request, "draft") == "unknown"


def test_docs_and_dashboard_name_only_defined_metrics_and_document_them_all():
    root = Path(__file__).resolve().parents[2]
    m = fake_metrics()
    defined = {v.name: v for v in vars(m).values() if isinstance(v, FakeMetric)}
    histograms = {name for name, v in defined.items() if v.boundaries}
    pool = {"ray_outrider_kv_pool_used_positions", "ray_outrider_kv_pool_capacity_positions",  # verifier replicas
            "ray_outrider_draft_kv_pool_used_positions", "ray_outrider_draft_kv_pool_capacity_positions",  # draft workers
            "ray_outrider_goodput_predicted_tokens_per_second", "ray_outrider_goodput_measured_tokens_per_second",
            "ray_outrider_sessions_not_speculating", "ray_outrider_planned_gamma"}
    exported = {"ray_" + name for name in defined} | {"ray_outrider_session_store_bytes"} | pool
    exported |= {f"ray_{name}{suffix}" for name in histograms for suffix in ("_bucket", "_sum", "_count")}
    docs = (root / "cluster" / "metrics.md").read_text()
    dashboard = json.loads((root / "cluster" / "grafana" / "outrider-spec-decode.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for text in (docs, exprs):
        assert set(re.findall(r"ray_outrider_\w+", text)) <= exported
    assert {"ray_" + name for name in defined} | {"ray_outrider_session_store_bytes"} | pool <= set(
        re.findall(r"ray_outrider_\w+", docs))
    assert {p["datasource"] for p in dashboard["panels"]} == {"${datasource}"}
    assert dashboard["templating"]["list"][0]["name"] == "datasource"


class FakeContext:
    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_gateway_shim_records_each_outcome():
    from services.gateway.deployment import Gateway
    from services.gateway.service import GatewayService, Limits
    from services.models.loading import bundled_paths, load_tokenizer
    from services.rpc import internal_pb2

    async def verifier(request):  # two rounds, then the stats
        yield internal_pb2.VerifyChunk(token_ids=[65, 66])
        yield internal_pb2.VerifyChunk(token_ids=[67])
        yield internal_pb2.VerifyChunk(stats=stats(rounds=2, emitted=3))

    limits = Limits(vocab_size=8192, max_context=512, max_new_tokens=256, default_max_new_tokens=16,
                    max_sessions=4, default_method="draft", default_gamma=4)
    gateway = object.__new__(Gateway.func_or_class)  # the shim, without loading models
    gateway.service = GatewayService(load_tokenizer(bundled_paths().target), limits, verifier)
    gateway.metrics = m = fake_metrics()

    async def go():
        chunks = [c async for c in gateway.Generate(make_request("def f():", 3), FakeContext())]
        unary = await gateway.GenerateUnary(make_request("def f():", 3, method="ngram"), FakeContext())
        stream = gateway.Generate(make_request("def f():", 3), FakeContext())
        await stream.__anext__()
        with pytest.raises(asyncio.CancelledError):
            await stream.athrow(asyncio.CancelledError())  # what Serve does on disconnect
        with pytest.raises(Exception):
            await gateway.GenerateUnary(make_request("", 3), FakeContext())
        return chunks, unary

    chunks, unary = asyncio.run(go())
    assert chunks[-1].stats.rounds == unary.stats.rounds == 2
    assert {k: v for k, v in m.requests.values.items()} == {
        (("code", "OK"), ("method", "draft")): [1], (("code", "OK"), ("method", "ngram")): [1],
        (("code", "CANCELLED"), ("method", "draft")): [1], (("code", "INVALID_ARGUMENT"), ("method", "draft")): [1],
    }
    assert m.rounds.total() == 4 and m.emitted_tokens.total() == 6
    assert gateway.service.active_sessions == 0


# --- for real -------------------------------------------------------------------

LINE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> list[tuple[str, dict, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        match = LINE.match(line)
        if match and match[1].startswith("ray_outrider_"):
            samples.append((match[1], dict(LABEL.findall(match[2] or "")), float(match[3])))
    return samples


def total(samples, name, **match) -> float:
    return sum(v for n, labels, v in samples if n == name and set(match.items()) <= set(labels.items()))


def by_label(samples, name, label) -> dict[str, float]:
    out = defaultdict(float)
    for n, labels, v in samples:
        if n == name:
            out[labels[label]] += v
    return dict(out)


@pytest.fixture(scope="module")
def served():
    # Export metrics every second (the default is 10 s); one session at a time so a
    # second concurrent request is refused.
    with serving_cluster({"max_sessions": 1}, system_config={"metrics_report_interval_ms": 1000}) as (client, _):
        ports = {}
        for deployment in ("gateway", "verifier", "drafter"):  # metrics are served by the node each runs on
            node = serve.get_deployment_handle(deployment, app_name=APP).node_id.remote().result()
            ports[deployment] = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node)
        yield client, ports


def test_counters_and_histograms_match_the_requests_own_stats(served):
    client, ports = served
    port = ports["gateway"]
    finished = []  # (method, GenerationStats)
    for method, gamma, pipeline in (("draft", 2, True), ("draft", 6, False), ("ngram", 4, True)):
        chunks = list(client.generate(make_request("def parse_args(argv):", 32, method=method, gamma=gamma,
                                                   pipeline=pipeline), timeout=120))
        finished.append((method, chunks[-1].stats))
    finished.append(("none", client.generate_unary(make_request("import os", 24, method="none"), timeout=120).stats))
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate(make_request("x", 8, gamma=99), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # One session at a time: a second request is refused while a first one streams;
    # then the first one's deadline passes, which the gateway sees as a cancellation.
    long = client.generate(make_request("class Stack:", 1500, gamma=2), timeout=6)
    next(long)
    with pytest.raises(grpc.RpcError) as err:
        client.generate_unary(make_request("x", 8), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        list(long)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The app's session store reports what it holds: give it a shared prefix block.
    store = ray.get_actor(f"outrider-state:{APP}", namespace="outrider")
    block = torch.zeros(1, 2, 64, 8)
    ray.get(store.publish_prefix.remote(["telemetry-test"], [KVChunk(0, tuple(range(64)), (block,), (block,))]))
    deadline = time.monotonic() + 30  # the gateway releases sessions beside their end
    while (usage := ray.get(store.usage.remote()))["sessions"] and time.monotonic() < deadline:
        time.sleep(0.2)
    held = usage["session_bytes"] + usage["prefix_bytes"]
    assert usage["sessions"] == 0 and held >= 2 * block.numel() * 4

    expected_codes = {"OK": 4, "INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 1, "CANCELLED": 1}
    deadline = time.monotonic() + 90
    while True:
        samples, pool, drafter = scrape(port), scrape(ports["verifier"]), scrape(ports["drafter"])
        done = (by_label(samples, "ray_outrider_requests_total", "code") == expected_codes
                and total(drafter, "ray_outrider_draft_kv_pool_capacity_positions", application=APP) > 0
                and total(drafter, "ray_outrider_draft_kv_pool_used_positions", application=APP) == 0
                and total(pool, "ray_outrider_kv_pool_capacity_positions", application=APP) > 0
                and total(pool, "ray_outrider_kv_pool_used_positions", application=APP) == 0
                and total(samples, "ray_outrider_active_sessions") == 0
                and total(samples, "ray_outrider_session_store_bytes", application=APP) == held
                and total(samples, "ray_outrider_time_to_first_token_seconds_count") == 4)
        if done or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert by_label(samples, "ray_outrider_requests_total", "code") == expected_codes
    assert total(samples, "ray_outrider_session_store_bytes", application=APP) == held
    # The verifier's KV pool (its node's endpoint): its size, and every session's budget
    # returned (the cancelled one's once its cancellation reached the verifier).
    assert total(pool, "ray_outrider_kv_pool_capacity_positions", application=APP) > 0
    assert total(pool, "ray_outrider_kv_pool_used_positions", application=APP) == 0
    # The goodput controller's view of the replica: what its recent passes committed.
    assert total(pool, "ray_outrider_goodput_measured_tokens_per_second", application=APP) > 0
    assert total(pool, "ray_outrider_sessions_not_speculating", application=APP) == 0  # every session ended
    # The draft worker's KV pool: its size, and every block back once the streams ended
    # (a session's states, its branches' too, go with its stream).
    assert total(drafter, "ray_outrider_draft_kv_pool_capacity_positions", application=APP) > 0
    assert total(drafter, "ray_outrider_draft_kv_pool_used_positions", application=APP) == 0

    all_stats = [s for _, s in finished]
    gateway_tags = {"application": APP, "deployment": "gateway"}
    assert total(samples, "ray_outrider_requests_total", **gateway_tags) == 7
    for name, field in [("rounds", "rounds"), ("drafted_tokens", "drafted"), ("accepted_tokens", "accepted"),
                        ("rejections", "rejections"), ("emitted_tokens", "emitted"),
                        ("pipeline_rounds", "pipeline_rounds"), ("pipeline_hits", "pipeline_hits"),
                        ("draft_bytes", "draft_bytes")]:
        assert total(samples, f"ray_outrider_{name}_total") == sum(getattr(s, field) for s in all_stats), name
    assert total(samples, "ray_outrider_drafts_total") == sum(s.drafted_per_position[0] for s in all_stats
                                                              if s.drafted_per_position)
    for method in ("draft", "ngram"):
        assert total(samples, "ray_outrider_accepted_tokens_total", method=method) == sum(
            s.accepted for m, s in finished if m == method)
    for kind in ("drafted", "accepted"):
        positions = defaultdict(float)
        for s in all_stats:
            for i, n in enumerate(getattr(s, f"{kind}_per_position")):
                positions[str(i)] += n
        expected = {p: n for p, n in positions.items() if n}
        assert by_label(samples, f"ray_outrider_{kind}_tokens_per_position_total", "position") == expected
    phases = by_label(samples, "ray_outrider_phase_seconds_total", "phase")
    for phase, field in (("draft", "exposed_draft_s"), ("verify", "verify_s"), ("transport", "transport_s"),
                         ("queue", "queue_s")):
        assert phases[phase] == pytest.approx(sum(getattr(s, field) for s in all_stats), rel=1e-6, abs=1e-9)
    assert total(samples, "ray_outrider_draft_compute_seconds_total") == pytest.approx(
        sum(s.draft_s for s in all_stats), rel=1e-6)

    # Histograms: one observation per finished request (acceptance length: per speculative one).
    assert total(samples, "ray_outrider_time_to_first_token_seconds_count") == 4
    assert total(samples, "ray_outrider_request_tokens_per_second_count") == 4
    assert total(samples, "ray_outrider_mean_acceptance_length_count") == 3
    assert by_label(samples, "ray_outrider_round_phase_seconds_count", "phase") == {p: 4 for p in PHASES}
    for bound in TTFT_BUCKETS_S:  # bucket counts are exact (only _sum is rebuilt from midpoints)
        count = sum(v for n, labels, v in samples if n == "ray_outrider_time_to_first_token_seconds_bucket"
                    and math.isclose(float(labels["le"]), bound))
        assert count == sum(s.time_to_first_token_s <= bound for s in all_stats), bound

    # Gauges: pooled over this replica's requests that pipelined / drafted.
    pipelined = [s for s in all_stats if s.pipeline_rounds]
    assert total(samples, "ray_outrider_pipeline_hit_rate") == pytest.approx(
        sum(s.pipeline_hits for s in pipelined) / sum(s.pipeline_rounds for s in pipelined), abs=1e-9)
    drafted = [s for s in all_stats if s.draft_s]
    assert total(samples, "ray_outrider_overlap") == pytest.approx(
        max(0.0, 1 - sum(s.exposed_draft_s for s in drafted) / sum(s.draft_s for s in drafted)), abs=1e-9)
    assert total(samples, "ray_outrider_active_sessions", **gateway_tags) == 0
