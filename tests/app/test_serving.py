"""Outrider served for real: a multi-node Ray cluster on this machine, Serve's gRPC
proxy on loopback, the bundled pair, the public API."""

import threading
import time

import grpc
import pytest
import ray
from ray.util.state import list_actors

from serving_cluster import active_sessions, serving_cluster, target_only, until_drafted
from services.app.args import DRAFTER_RESOURCE, VERIFIER_RESOURCE
from services.core.sampling import SamplingParams
from services.gateway.client import make_request
from services.models.loading import bundled_paths
from services.models.pair import load_pair

PROMPTS = ["def parse_args(argv):", "class Stack:\n    def push(self, item):", "import os\n\nfor name in"]
MAX_SESSIONS = 16
MAX_MESSAGE = 1 << 20  # Serve's gRPC proxy message limit here (outrider serve: 8 MiB)


@pytest.fixture(scope="module")
def server():
    # Every round drafts the request's gamma, whatever passes cost on this machine: the
    # tests check the drafted paths (test_load serves with the goodput controller).
    with serving_cluster({"max_sessions": MAX_SESSIONS, "gamma_policy": "requested"},
                         env={"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(MAX_MESSAGE)}) as (client, _):
        # Warm: the tests check that every round after a session's first can draft.
        until_drafted(client, make_request(PROMPTS[0], 16, gamma=4))
        yield client


@pytest.fixture(scope="module")
def pair():
    return load_pair(bundled_paths(), with_draft=False)


def stream(client, request, timeout=120):
    chunks = list(client.generate(request, timeout=timeout))
    tokens = [t for c in chunks for t in c.token_ids]
    return tokens, chunks


def wait_for_no_sessions(timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (counts := active_sessions()) != {"gateway": 0, "verifier": 0, "drafter": 0}:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return counts


def test_health_check_serves(server):
    assert server.healthy()


def test_the_profile_times_served_decoding(server):
    from services.bench.profile import served_decoding

    levels = served_decoding(server, PROMPTS, 6, [1, 2])
    assert [r["streams"] for r in levels] == [1, 2]
    assert all(0 < r["token_s"] < 1 and 0 < r["ttft_s"] < 10 and r["output_tokens"] == 6 for r in levels)
    assert all(r["tokens_per_s"] > 0 and "tokens_per_round" not in r for r in levels)
    # Speculative: the tokens and drafts a round, from the requests' own stats.
    spec = served_decoding(server, PROMPTS, 6, [2], "draft", 4)
    assert 1 <= spec[0]["tokens_per_round"] <= 5 and 0 <= spec[0]["drafted_per_round"] <= 4


@pytest.mark.parametrize("method,pipeline", [("draft", True), ("draft", False), ("ngram", True), ("suffix", True),
                                             ("none", True)])
def test_greedy_over_grpc_is_target_only_decoding(server, pair, method, pipeline):
    for prompt in PROMPTS[:2]:
        tokens, chunks = stream(server, make_request(prompt, 40, method=method, gamma=6, pipeline=pipeline))
        assert tokens == target_only(pair, prompt, 40)
        stats = chunks[-1].stats
        assert stats.emitted == 40 and stats.finish_reason == "length"
        assert (stats.pipeline_rounds > 0) == (pipeline and method == "draft")  # lookups run on the verifier


@pytest.mark.parametrize("tree,pipeline", [("", True), ("", False), ("draft,suffix,ngram", True), ("suffix,ngram", True),
                                           ("draft,medusa,suffix", True), ("mtp,suffix", True)])
def test_greedy_tree_over_grpc_is_target_only_decoding(server, pair, tree, pipeline):
    """TREE: the worker's draft chain merged on the verifier with its lookups and heads
    (or those alone, with no hop), one pass a round, the same tokens."""
    for prompt in PROMPTS[:2]:
        tokens, chunks = stream(server, make_request(prompt, 40, method="tree", tree=tree, gamma=4, pipeline=pipeline))
        assert tokens == target_only(pair, prompt, 40)
        stats = chunks[-1].stats
        assert stats.emitted == 40 and stats.drafted > 0
        on_worker = tree == "" or tree.startswith("draft")
        assert (stats.draft_bytes > 0) == on_worker and (stats.pipeline_rounds > 0) == (on_worker and pipeline)


def test_suffix_decoding_learns_from_earlier_requests(server, pair):
    """The replica's suffix index holds earlier sessions' outputs: the same prompt again
    is drafted from the first completion, and takes fewer rounds."""
    prompt = "def count_words(text):"  # no other test's suffix session saw it
    rounds = []
    for _ in range(2):
        tokens, chunks = stream(server, make_request(prompt, 48, method="suffix", gamma=12))
        assert tokens == target_only(pair, prompt, 48)
        rounds.append(chunks[-1].stats.rounds)
    assert rounds[1] < rounds[0] and rounds[1] <= 48 // 4


def test_stream_is_ordered_and_complete(server, pair):
    request = make_request(PROMPTS[2], 48, gamma=4)
    tokens, chunks = stream(server, request)
    unary = server.generate_unary(request, timeout=120)
    assert tokens == list(unary.token_ids) == target_only(pair, PROMPTS[2], 48)
    # One chunk per round plus the stats chunk; text deltas add up to the decoded tokens.
    assert len(chunks) == chunks[-1].stats.rounds + 1
    assert all(c.token_ids for c in chunks[:-1]) and not chunks[-1].token_ids
    assert "".join(c.text for c in chunks) == pair.tokenizer.decode(tokens) == unary.text
    assert list(chunks[-1].prompt_token_ids) == pair.tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    assert {c.request_id for c in chunks} == {chunks[0].request_id} and chunks[0].request_id


def test_seeded_sampling_is_reproducible_across_calls(server):
    request = make_request(PROMPTS[0], 32, SamplingParams(temperature=0.9, top_p=0.95, seed=7))
    first, _ = stream(server, request)
    again, _ = stream(server, request)
    other, _ = stream(server, make_request(PROMPTS[0], 32, SamplingParams(temperature=0.9, top_p=0.95, seed=8)))
    assert first == again
    assert first != other


def test_drafter_and_verifier_replicas_run_on_their_own_nodes(server):
    def node_of(deployment):
        actors = list_actors(filters=[("class_name", "=", f"ServeReplica:outrider:{deployment}"),
                                      ("state", "=", "ALIVE")])
        assert len(actors) == 1
        return actors[0].node_id

    drafter, verifier = node_of("drafter"), node_of("verifier")
    assert drafter != verifier
    resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert DRAFTER_RESOURCE in resources[drafter] and VERIFIER_RESOURCE not in resources[drafter]
    assert VERIFIER_RESOURCE in resources[verifier] and DRAFTER_RESOURCE not in resources[verifier]


def edited(request, edit):
    """Values the client-side dataclasses refuse to build, set on the message itself."""
    edit(request)
    return request


BAD = [
    ("empty prompt", make_request("", 8), "prompt is empty"),
    ("no prompt", make_request([], 8), "prompt is empty"),
    ("negative temperature", edited(make_request("x", 8), lambda r: setattr(r.sampling, "temperature", -1.0)),
     "temperature"),
    ("NaN temperature", edited(make_request("x", 8), lambda r: setattr(r.sampling, "temperature", float("nan"))),
     "finite"),
    ("top_p above 1", edited(make_request("x", 8), lambda r: setattr(r.sampling, "top_p", 1.5)), "top_p"),
    ("top_p zero", edited(make_request("x", 8), lambda r: setattr(r.sampling, "top_p", 0.0)), "top_p"),
    ("oversized max_new_tokens", make_request("x", 10**6), "max_new_tokens"),
    ("past the context", make_request("x " * 300, 2000), "context"),
    ("unknown method", edited(make_request("x", 8), lambda r: setattr(r.speculation, "method", 42)),
     "unknown speculation method"),
    ("gamma too large", make_request("x", 8, gamma=99), "gamma"),
    ("negative token id", make_request([5, -1, 7], 8), "outside the vocabulary"),
    ("token id past the vocabulary", make_request([5, 10**9], 8), "outside the vocabulary"),
]


@pytest.mark.parametrize("name,request_,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_invalid_argument_and_changes_nothing(server, name, request_, reason):
    for call in (lambda: stream(server, request_), lambda: server.generate_unary(request_, timeout=30)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert reason in err.value.details()
    tokens, _ = stream(server, make_request(PROMPTS[0], 8))  # the replicas are still serving
    assert len(tokens) == 8


def test_a_request_over_the_message_limit_is_refused_at_the_proxy(server):
    with pytest.raises(grpc.RpcError) as err:
        server.generate_unary(make_request("x" * (2 * MAX_MESSAGE), 8), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert active_sessions() == {"gateway": 0, "verifier": 0, "drafter": 0}  # it never reached the gateway
    tokens, _ = stream(server, make_request(PROMPTS[0], 8))
    assert len(tokens) == 8


def test_every_client_cancellation_frees_the_session(server):
    # Cancelled right after the first chunk, while Serve's proxy may still be writing
    # it: before services/gateway/grpc_proxy.py about 1 in 10 of these ran to the end.
    for attempt in range(20):
        responses = server.generate(make_request(PROMPTS[attempt % 3], 1500, gamma=2))
        next(responses)
        if attempt == 0:
            assert active_sessions() == {"gateway": 1, "verifier": 1, "drafter": 1}
        responses.cancel()
        assert wait_for_no_sessions(timeout=10) == {"gateway": 0, "verifier": 0, "drafter": 0}, attempt


def test_client_deadline_is_deadline_exceeded_and_frees_the_session(server):
    with pytest.raises(grpc.RpcError) as err:
        stream(server, make_request(PROMPTS[1], 1500, gamma=2), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for_no_sessions() == {"gateway": 0, "verifier": 0, "drafter": 0}


def test_two_clients_choosing_the_same_request_id_share_nothing(server, pair):
    # Session state is keyed by the server, never by the client's request_id: two
    # streams under one id at once, then the id reused, each decode their own prompt.
    results: dict[int, tuple] = {}

    def one(i):
        results[i] = stream(server, make_request(PROMPTS[i], 24, gamma=4, request_id="same-id"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    results[2] = stream(server, make_request(PROMPTS[2], 24, gamma=4, request_id="same-id"))
    for i, (tokens, chunks) in results.items():
        assert tokens == target_only(pair, PROMPTS[i], 24), i
        assert {c.request_id for c in chunks} == {"same-id"}


def test_sixteen_concurrent_streams_complete_and_one_more_is_refused(server, pair):
    prompts = [PROMPTS[i % 3] + " " * (i // 3) for i in range(MAX_SESSIONS)]
    results: dict[int, list[int]] = {}
    errors: list[Exception] = []
    started = threading.Barrier(MAX_SESSIONS + 1, timeout=120)

    def one(i):
        try:
            tokens = []
            for n, chunk in enumerate(server.generate(make_request(prompts[i], 24, gamma=4), timeout=300)):
                if n == 0:
                    started.wait()
                tokens.extend(chunk.token_ids)
            results[i] = tokens
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(MAX_SESSIONS)]
    for t in threads:
        t.start()
    started.wait()  # all sixteen are streaming
    with pytest.raises(grpc.RpcError) as err:
        stream(server, make_request(PROMPTS[0], 8))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for t in threads:
        t.join()
    assert not errors
    for i, prompt in enumerate(prompts):
        assert results[i] == target_only(pair, prompt, 24), f"stream {i}"
    assert wait_for_no_sessions() == {"gateway": 0, "verifier": 0, "drafter": 0}


@pytest.mark.parametrize("method,tree", [("medusa", ""), ("medusa", "0;1;2;0.0;0.1;0.0.0"), ("medusa", "auto"),
                                         ("mtp", ""), ("mtp", "0;1;2;0.0;0.1;0.0.0"), ("mtp", "auto"), ("eagle", ""),
                                         ("eagle", "3,2,6")])
def test_heads_over_grpc_are_target_only_decoding(server, pair, method, tree):
    """The bundled Medusa heads and MTP modules draft on the verifier: no draft hop, the same tokens."""
    for prompt in PROMPTS[:2]:
        tokens, chunks = stream(server, make_request(prompt, 40, method=method, tree=tree))
        assert tokens == target_only(pair, prompt, 40)
        stats = chunks[-1].stats
        assert stats.draft_shape.startswith(("tree", "eagle")) and stats.drafted > 0 and stats.draft_bytes == 0
        assert sum(stats.accepted_per_rank) == stats.accepted and len(stats.accepted_per_position) <= 5
        assert stats.accepted > 0  # trained heads: most rounds accept something
        if tree and tree != "auto":  # (a planned tree starts from the tuned one, then moves)
            assert stats.draft_shape == ("eagle6:d3k2" if method == "eagle" else "tree6:3-2-1")


@pytest.mark.parametrize("request_args,reason", [
    (dict(method="medusa", tree="0;0.0;0.0.0;0.0.0.0;0.0.0.0.0"), "exceeds the 4 Medusa heads"),
    (dict(method="mtp", tree=";".join(".".join(["0"] * d) for d in range(1, 10))), "exceeds 8 MTP depths"),
    (dict(method="eagle", tree="0;0.0"), "depth,top_k,nodes"),
    (dict(method="tree", tree="suffix,draft"), "the draft model first"),
    (dict(method="eagle", tree="auto"), "depth,top_k,nodes"),
    (dict(method="draft", tree="draft,suffix"), "a tree is for MEDUSA, MTP, EAGLE or TREE"),
])
def test_tree_methods_the_server_cannot_draft_are_refused(server, request_args, reason):
    with pytest.raises(grpc.RpcError) as err:
        stream(server, make_request("def f():", 8, **request_args))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details()
