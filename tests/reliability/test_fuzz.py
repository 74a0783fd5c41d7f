"""The API fuzzer: its oracle follows the documented contract, its checks catch a
wrong status, and a served cluster answers a few hundred fuzzed requests with the
statuses the contract allows, without a replica restart."""

import grpc

from fake_grpc import Failing, FakeClient

from services.gateway.client import make_request
from services.reliability.fuzz import EXHAUSTED, INVALID, OK, check, expected
from services.rpc import outrider_pb2


def test_the_oracle_follows_the_documented_rules():
    assert expected(make_request([5, 6, 7], 8)).codes == {OK}
    bad = [
        make_request([], 8),
        make_request([5, -1], 8),
        make_request("x", 8, gamma=17),
        make_request("x", 8, tree="0;1"),  # a tree with the default (draft) method
        outrider_pb2.GenerateRequest(max_new_tokens=4),  # no prompt at all
    ]
    nan = make_request([5], 8)
    nan.sampling.temperature = float("nan")
    top_p = make_request([5], 8)
    top_p.sampling.top_p = 0.0
    unknown = make_request([5], 8)
    unknown.speculation.method = 99
    penalty = make_request([5], 8)
    penalty.sampling.presence_penalty = 2.5
    bias = make_request([5], 8)
    bias.sampling.logit_bias[5] = float("nan")
    options = [make_request([5], 8, logprobs=21), make_request([5], 8, stop=("",)), make_request([5], 8, min_tokens=9),
               make_request([5], 8, stop=tuple("abcdefghijklmnopq")), make_request([5], 8, stop_token_ids=(-3,))]
    for req in bad + [nan, top_p, unknown, penalty, bias] + options:
        assert expected(req).codes == {INVALID}, req
    assert expected(make_request([5], 8, stop=("\n",), logprobs=3, n=2, min_tokens=2)).codes == {OK}
    assert expected(make_request([5], 8, method="medusa", tree="0;1")).codes == {OK, INVALID, EXHAUSTED}
    assert expected(make_request([5, 9000], 8)).codes == {OK, INVALID, EXHAUSTED}  # depends on the vocabulary


def test_the_checks_catch_what_the_contract_forbids():
    valid, invalid = make_request([5, 6], 2, request_id="r"), make_request([], 2)
    stats = outrider_pb2.GenerationStats(emitted=2)
    good = [outrider_pb2.GenerateChunk(request_id="r", token_ids=[1, 2]), outrider_pb2.GenerateChunk(request_id="r", stats=stats)]
    assert check(FakeClient(chunks=good), valid, 1.0) == (OK, None)
    assert check(FakeClient(Failing(INVALID, "prompt is empty")), invalid, 1.0) == (INVALID, None)
    wrong = [
        (FakeClient(Failing(grpc.StatusCode.INTERNAL, "Traceback ...")), valid, "INTERNAL where OK"),
        (FakeClient(chunks=good), invalid, "OK where INVALID_ARGUMENT"),
        (FakeClient(Failing(INVALID, "")), invalid, "without a reason"),
        (FakeClient(Failing(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")), valid, "DEADLINE_EXCEEDED"),
        (FakeClient(chunks=good[:1]), valid, "final stats"),
        (FakeClient(chunks=[outrider_pb2.GenerateChunk(request_id="r", token_ids=[1, 2, 3]),
                            outrider_pb2.GenerateChunk(request_id="r", stats=stats)]), valid, "3 tokens"),
        (FakeClient(chunks=[outrider_pb2.GenerateChunk(request_id="other", token_ids=[1, 2]),
                            outrider_pb2.GenerateChunk(request_id="other", stats=stats)]), valid, "not echoed"),
    ]
    for client, req, why in wrong:
        _, found = check(client, req, 1.0)
        assert found is not None and why in found, (why, found)


def test_a_served_cluster_answers_fuzzed_requests_as_documented():
    import ray

    from serving_cluster import serving_cluster
    from services.reliability.fuzz import fuzz, serve_replicas

    with serving_cluster({"max_sessions": 4}) as (client, _):
        dashboard = "http://" + ray._private.worker.get_dashboard_url()
        before = serve_replicas(dashboard)
        report = fuzz(client, 150, seed=1, timeout=60)
        after = serve_replicas(dashboard)
    assert report.requests == 150 and report.wrong_status == 0, report.wrong
    assert report.by_code["OK"] > 10 and report.by_code["INVALID_ARGUMENT"] > 10  # both sides explored
    assert len(before) >= 3 and before == after  # no replica restarted
