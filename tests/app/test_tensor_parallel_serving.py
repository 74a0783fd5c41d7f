"""A tensor-parallel verifier served for real: TP=2 ranks (gloo, fp32) in the verifier
replica's placement group on the verifier node; greedy output over gRPC is exactly
target-only decoding, and a rank that dies gets the replica replaced, not hung."""

import os
import signal
import time

import grpc
import pytest
import ray
from ray.util.state import list_actors

from serving_cluster import serving_cluster
from services.core.gamma import GammaSchedule
from services.core.sampling import SamplingParams
from services.gateway.client import make_request
from services.models.loading import bundled_paths
from services.models.pair import load_pair, make_engine

PROMPT = "def parse_args(argv):"


@pytest.fixture(scope="module")
def server():
    # The verifier node gets 3 logical CPUs: the replica and its two ranks.
    with serving_cluster({"tensor_parallel_size": 2}, verifier_cpus=3) as (client, cluster):
        yield client, cluster


@pytest.fixture(scope="module")
def expected():
    pair = load_pair(bundled_paths(), with_draft=False)
    ids = pair.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    return make_engine(pair, "none", GammaSchedule(initial=0)).generate(ids, 24, SamplingParams()).token_ids


def generate(client, method):
    reply = client.generate_unary(make_request(PROMPT, 24, method=method, gamma=4), timeout=120)
    return list(reply.token_ids)


def actors(**kwargs):
    # The address is explicit: left out, the state API may find another cluster on this machine.
    return list_actors(address=ray.get_runtime_context().gcs_address, limit=1000, **kwargs)


def ranks():
    return [a for a in actors(filters=[("class_name", "=", "TargetRank")]) if a.state == "ALIVE"]


def verifier_replicas():
    return [a for a in actors() if "verifier" in a.class_name and a.state == "ALIVE"]


def test_tp2_served_greedy_is_target_only_decoding(server, expected):
    client, _ = server
    assert generate(client, "none") == expected
    assert generate(client, "draft") == expected
    alive = ranks()
    assert len(alive) == 2
    replica = verifier_replicas()[0]
    assert {a.node_id for a in alive} == {replica.node_id}, "ranks run on the verifier replica's node"


def test_tp2_prefill_reuses_the_ranks_shared_prefix_shards(server):
    client, _ = server
    pair = load_pair(bundled_paths(), with_draft=False)
    ids = pair.tokenizer(PROMPT * 30, add_special_tokens=False)["input_ids"][:130]  # two 64-token blocks
    want = make_engine(pair, "none", GammaSchedule(initial=0)).generate(ids, 12, SamplingParams()).token_ids
    first = client.generate_unary(make_request(ids, 12, method="draft", gamma=4), timeout=120)
    second = client.generate_unary(make_request(ids, 12, method="draft", gamma=4), timeout=120)
    assert first.stats.cached_prefix_tokens == 0 and second.stats.cached_prefix_tokens == 128
    assert list(first.token_ids) == list(second.token_ids) == want


def test_a_dead_rank_gets_the_replica_replaced(server, expected):
    client, _ = server
    (old_replica,) = verifier_replicas()
    os.kill(ranks()[1].pid, signal.SIGKILL)  # a rank crashes
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        replicas = verifier_replicas()
        if replicas and replicas[0].actor_id != old_replica.actor_id and len(ranks()) == 2:
            break
        time.sleep(2)
    else:
        pytest.fail("the verifier replica with a dead rank was not replaced")
    for _ in range(60):  # the new replica may still be loading its shards
        try:
            assert generate(client, "draft") == expected
            break
        except grpc.RpcError:
            time.sleep(2)
    else:
        pytest.fail("the replacement replica does not serve")
