"""The soak: its verdicts follow the contract (complete identical, or UNAVAILABLE with a
reason; a cancel or a short deadline ends as asked), and a served cluster under every
fault of the chaos rotation loses, corrupts and hangs no stream and leaks no session."""

import grpc
import pytest
from fake_grpc import Failing, FakeClient

from services.core.sampling import SamplingParams
from services.reliability.chaos import EVENTS
from services.reliability.soak import (CANCEL, DEADLINE, MAX_CAPACITY_RETRIES, NORMAL, Case, SoakReport, make_cases,
                                       run_stream, soak)
from services.rpc import outrider_pb2

CASE = Case("def f(x):", "draft", SamplingParams(), 2)


SAMPLED = Case("def f(x):", "draft", SamplingParams(temperature=0.8, seed=3), 2)


def chunks(request_id, tokens, stats=True, undrafted=0):
    out = [outrider_pb2.GenerateChunk(request_id=request_id, token_ids=tokens)]
    if stats:
        final = outrider_pb2.GenerationStats(emitted=2, undrafted_rounds=undrafted)
        out.append(outrider_pb2.GenerateChunk(request_id=request_id, stats=final))
    return out


def verdict(client, kind=NORMAL, reference=(1, 2), case=CASE):
    return run_stream(client, case, kind, list(reference) if reference else None, "r", 60.0).verdict


def test_each_stream_gets_the_verdict_the_contract_gives_it():
    assert verdict(FakeClient(chunks=chunks("r", [1, 2]))) == "identical"
    assert verdict(FakeClient(chunks=chunks("r", [1, 3]))) == "corrupted"
    # Rounds without drafts change neither a greedy nor a seeded (coupled) sampled stream.
    assert verdict(FakeClient(chunks=chunks("r", [1, 3], undrafted=2)), case=SAMPLED) == "corrupted"
    assert verdict(FakeClient(chunks=chunks("r", [1, 3], undrafted=2))) == "corrupted"
    assert verdict(FakeClient(chunks=chunks("r", [1, 3])), case=SAMPLED) == "corrupted"
    assert verdict(FakeClient(chunks=chunks("r", [1, 2], stats=False))) == "lost"
    assert verdict(FakeClient(chunks=chunks("other", [1, 2]))) == "lost"
    assert verdict(FakeClient(Failing(grpc.StatusCode.UNAVAILABLE, "no verifier replica answered"))) == "unavailable"
    assert verdict(FakeClient(Failing(grpc.StatusCode.UNAVAILABLE, ""))) == "lost"  # no reason
    assert verdict(FakeClient(Failing(grpc.StatusCode.INTERNAL, "Traceback"))) == "lost"
    assert verdict(FakeClient(Failing(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))) == "hung"
    # A stream cancelled after its first chunk, and a short deadline that fires.
    assert verdict(FakeClient(chunks=chunks("r", [1, 2])), CANCEL, None) == "cancelled"
    deadline = FakeClient(Failing(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert verdict(deadline, DEADLINE, None) == "deadline"
    assert verdict(FakeClient(Failing(grpc.StatusCode.INTERNAL, "x")), DEADLINE, None) == "lost"


class RefusedAtCapacity(FakeClient):
    """Refuses the first ``refusals`` requests as the gateway at its session limit does."""

    def __init__(self, refusals, chunks=()):
        super().__init__(chunks=chunks)
        self.refusals, self.requests = refusals, 0

    def generate(self, request, timeout=None):
        self.requests += 1
        if self.requests <= self.refusals:
            raise Failing(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "at the limit of 64 concurrent sessions; retry in about 0.01 s")
        return super().generate(request, timeout)


def test_a_stream_refused_at_capacity_is_sent_again_after_the_hint():
    client = RefusedAtCapacity(2, chunks("r", [1, 2]))
    outcome = run_stream(client, CASE, NORMAL, [1, 2], "r", 60.0)
    assert (outcome.verdict, outcome.capacity_retries, client.requests) == ("identical", 2, 3)
    # Refused every time: lost, after MAX_CAPACITY_RETRIES more tries.
    client = RefusedAtCapacity(100, chunks("r", [1, 2]))
    outcome = run_stream(client, CASE, NORMAL, [1, 2], "r", 60.0)
    assert (outcome.verdict, outcome.code, client.requests) == ("lost", "RESOURCE_EXHAUSTED", MAX_CAPACITY_RETRIES + 1)
    # Without a retry hint, no retry.
    once = FakeClient(Failing(grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large"))
    assert run_stream(once, CASE, NORMAL, [1, 2], "r", 60.0).capacity_retries == 0
    assert SoakReport(outcomes=[outcome]).as_json()["capacity_retries"] == MAX_CAPACITY_RETRIES


def test_memory_growth_is_measured_from_the_loads_warm_up():
    memory = [{"t": 0.0, "gateway": 100.0, "verifier": 500.0},  # before the load: not the baseline
              {"t": 130.0, "gateway": 110.0, "verifier": 800.0},
              {"t": 900.0, "gateway": 121.0, "verifier": 808.0}]
    assert SoakReport(memory=memory, warmup_s=120.0).memory_growth_ratio() == pytest.approx(1.1)
    assert SoakReport(memory=memory[:2], warmup_s=120.0).memory_growth_ratio() is None


def test_cases_cover_every_method_greedy_and_seeded_short_and_long():
    cases = make_cases(["a", "b", "c"], ["draft", "ngram"], short=4, long=9)
    assert len(cases) == 8 and {c.method for c in cases} == {"draft", "ngram"}
    assert {c.max_new for c in cases} == {4, 9} and {c.params.greedy for c in cases} == {True, False}
    assert all(c.params.seed is not None for c in cases if not c.params.greedy)


def test_a_soak_under_every_fault_loses_no_stream_and_leaks_nothing():
    from serving_cluster import serving_cluster

    with serving_cluster({"max_sessions": 16}) as (client, cluster):
        cases = make_cases(["def parse(text):", "import os\n", "class Node:"], ["draft", "ngram"], short=8, long=24)
        report = soak(client, cases, streams=3, seconds=8 * len(EVENTS) + 4, ray_address=cluster.address,
                      chaos_every_s=8, freeze_s=3, deadline_s=120, sample_every_s=10)
    result = report.as_json()
    assert [e["event"] for e in result["chaos"]][: len(EVENTS)] == list(EVENTS)
    assert [e for e in result["chaos"] if e["error"]] == []
    assert (result["lost"], result["corrupted"], result["hung"]) == (0, 0, 0), result["failures"]
    assert result["verdicts"].get("identical", 0) >= 6  # streams completed through the faults
    assert result["leftover"] and not any(result["leftover"].values()), result["leftover"]
    assert result["memory_growth_ratio"] is not None
