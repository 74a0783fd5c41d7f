"""Session state through the object store, served for real: two draft and two verifier
replicas on their own nodes. A replica killed mid-stream (draft or verifier) loses
nothing: the stream completes on a survivor with exactly the tokens of an undisturbed
greedy run. A prompt prefix one verifier replica computed is reused by the other.
Session state is released when requests end, and memory returns to its baseline."""

import json
import os
import signal
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import ray
from ray import serve
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
from ray.util.state import list_actors

from serving_cluster import APP, replicas, serving_cluster
from services.app.args import DRAFTER_RESOURCE, VERIFIER_RESOURCE
from services.core.gamma import GammaSchedule
from services.core.sampling import SamplingParams
from services.gateway.client import make_request
from services.models.loading import bundled_paths
from services.models.pair import load_pair, make_engine

PROMPT = "def parse_args(argv):"
LONG = 160


@pytest.fixture(scope="module")
def server():
    role = lambda resource: {"num_replicas": 2, "num_cpus": 1, "resources": {resource: 1}}  # noqa: E731
    # Every session drafts its gamma and the speculation cache's 8 branches a round,
    # whatever passes and steps cost on this machine: replicas die with drafts in flight.
    args = {"drafter": role(DRAFTER_RESOURCE), "verifier": role(VERIFIER_RESOURCE), "draft_chunk_tokens": 8,
            "fanout_policy": "requested", "gamma_policy": "requested"}
    with serving_cluster(args, verifier_cpus=2, drafter_cpus=2) as (client, cluster):
        wait_for_replicas()
        yield client, cluster


@pytest.fixture(scope="module")
def target_only():
    pair = load_pair(bundled_paths(), with_draft=False)
    engine = make_engine(pair, "none", GammaSchedule(initial=0))

    def expected(prompt_ids: list[int], n: int) -> list[int]:
        return engine.generate(prompt_ids, n, SamplingParams()).token_ids

    return pair.tokenizer, expected


def wait_for_replicas(count: int = 2, timeout: float = 180) -> None:
    """Until Serve runs ``count`` replicas of each deployment. (An actor is ALIVE while
    its constructor still loads models: a replica still starting would look like the
    busy one to ``busiest``.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deployments = serve.status().applications[APP].deployments
        if all(deployments[d].replica_states.get("RUNNING", 0) >= count and len(replicas(d)) >= count
               for d in ("drafter", "verifier")):
            return
        time.sleep(1)
    pytest.fail("the replicas did not come back")


def busiest(actors) -> object:
    """The replica doing the work: the one whose process burns CPU right now."""
    procs = {a.pid: psutil.Process(a.pid) for a in actors}
    before = {pid: sum(p.cpu_times()[:2]) for pid, p in procs.items()}
    time.sleep(0.3)
    return max(actors, key=lambda a: sum(procs[a.pid].cpu_times()[:2]) - before[a.pid])


def stream_and_kill(client, deployment: str, prompt=PROMPT, n=LONG, params=SamplingParams()):
    tokens, stats, victim = [], None, None
    for chunk in client.generate(make_request(prompt, n, params, method="draft", gamma=4), timeout=300):
        tokens += chunk.token_ids
        if victim is None and len(tokens) >= 12:
            alive = replicas(deployment)
            assert alive, "no live replica to kill"
            victim = busiest(alive)
            os.kill(victim.pid, signal.SIGKILL)
        if chunk.HasField("stats"):
            stats = chunk.stats
    assert victim is not None, "the stream ended before a replica could be killed"
    return tokens, stats


@pytest.mark.parametrize("deployment", ["drafter", "verifier"])
def test_a_replica_killed_mid_stream_loses_nothing(server, target_only, deployment):
    client, _ = server
    tokenizer, expected = target_only
    want = expected(tokenizer(PROMPT, add_special_tokens=False)["input_ids"], LONG)
    tokens, stats = stream_and_kill(client, deployment)
    assert tokens == want  # no lost, duplicated or changed token
    assert stats.emitted and stats.finish_reason in ("length", "stop") and stats.branches_drafted > 0
    if deployment == "drafter":
        assert stats.draft_reconnects >= 1 and stats.resumes == 0
    else:
        assert stats.resumes >= 1
    wait_for_replicas()  # Serve replaces the dead one


def test_a_seeded_sampled_stream_resumed_after_a_kill_is_the_undisturbed_one(server):
    """Every random stream is keyed by (seed, round) or (seed, position): the replica
    that takes over draws exactly what the killed one would have."""
    client, _ = server
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=2024)
    undisturbed = client.generate_unary(make_request(PROMPT, LONG, params, method="draft", gamma=4), timeout=300)
    tokens, stats = stream_and_kill(client, "verifier", params=params)
    assert stats.resumes >= 1
    assert tokens == list(undisturbed.token_ids)
    wait_for_replicas()


def test_a_frozen_draft_worker_holds_a_round_for_the_read_deadline_at_most(server, target_only):
    """SIGSTOP keeps the worker's connections open (its kernel still acks): only the
    verifier's read deadline notices. The stream moves to the other worker, or goes on
    without drafting, and stays exactly target-only decoding."""
    client, _ = server
    tokenizer, expected = target_only
    want = expected(tokenizer(PROMPT, add_special_tokens=False)["input_ids"], LONG)
    tokens, stats, victim, gaps, last = [], None, None, [], None
    try:
        for chunk in client.generate(make_request(PROMPT, LONG, method="draft", gamma=4), timeout=300):
            now = time.monotonic()
            if victim is not None:
                gaps.append(now - last)
            last = now
            tokens += chunk.token_ids
            if victim is None and len(tokens) >= 12:
                victim = busiest(replicas("drafter"))
                os.kill(victim.pid, signal.SIGSTOP)
                last = time.monotonic()
            if chunk.HasField("stats"):
                stats = chunk.stats
    finally:
        if victim is not None:
            os.kill(victim.pid, signal.SIGCONT)
    assert victim is not None, "the stream ended before a worker could be frozen"
    assert tokens == want
    assert stats.draft_reconnects >= 1
    assert max(gaps) < 5.0, f"a round waited {max(gaps):.1f} s on the frozen worker"


def test_a_prefix_computed_by_one_verifier_replica_is_reused_by_the_other(server, target_only):
    client, _ = server
    tokenizer, expected = target_only
    path = Path(bundled_paths().target).parent / "heldout_prompts.jsonl"
    header = "".join(json.loads(line)["prompt"] for line in path.read_text().splitlines()[:8])  # 600+ tokens
    header_ids = tokenizer(header, add_special_tokens=False)["input_ids"][:320]
    first = client.generate_unary(make_request(header_ids + [10, 11], 8, method="draft"), timeout=120)
    assert first.stats.cached_prefix_tokens == 0
    deadline = time.monotonic() + 30  # publishing runs beside the request
    while store_usage()["prefix_blocks"] < 10 and time.monotonic() < deadline:  # 5 target + 5 draft blocks
        time.sleep(0.2)
    for suffix in range(20, 60):  # until Serve routes one to the other replica
        prompt = header_ids + [suffix]
        reply = client.generate_unary(make_request(prompt, 8, method="draft"), timeout=120)
        if reply.stats.verifier_replica != first.stats.verifier_replica:
            break
    else:
        pytest.fail("every request went to the same verifier replica")
    assert reply.stats.cached_prefix_tokens == 320  # five 64-token blocks
    assert list(reply.token_ids) == expected(prompt, 8)  # reused KV, same tokens


def store_usage() -> dict:
    return ray.get(ray.get_actor(f"outrider-state:{APP}", namespace="outrider").usage.remote())


def object_store_bytes(cluster) -> int:
    reply = get_memory_info_reply(get_state_from_address(cluster.address))
    return reply.store_stats.object_store_bytes_used


def test_session_state_is_released_and_memory_returns_to_baseline(server):
    client, cluster = server
    prompts = [f"def f{i}(x):" for i in range(8)]

    def run_batch(seen_sessions: list[int]):
        # Seeded sampling keeps its gamma under load, so the draft workers keep drafting
        # (and saving draft state) however the load-aware cap would set greedy sessions.
        requests = [make_request(p, 48, SamplingParams(temperature=0.8, seed=i), method="draft")
                    for i, p in enumerate(prompts)]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client.generate_unary, r, timeout=300) for r in requests]
            while not all(f.done() for f in futures):
                seen_sessions.append(store_usage()["sessions"])
                time.sleep(0.2)
            return [f.result() for f in futures]

    run_batch([])  # warm up (allocators, caches)
    time.sleep(1)
    base_store, base_usage = object_store_bytes(cluster), store_usage()
    store_pid = [a.pid for a in list_actors(address=cluster.address, filters=[("class_name", "=", "SessionStore")])][0]
    base_rss = psutil.Process(store_pid).memory_info().rss
    seen: list[int] = []
    for _ in range(3):
        assert all(r.stats.emitted == 48 for r in run_batch(seen))
    assert max(seen) > 0, "sessions kept draft state in the store while running"
    deadline = time.monotonic() + 30
    while store_usage()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.5)
    usage = store_usage()
    assert usage["sessions"] == 0 and usage["session_bytes"] == 0
    assert usage["prefix_bytes"] == base_usage["prefix_bytes"]  # short prompts publish no blocks
    assert object_store_bytes(cluster) <= base_store + 2**20
    assert psutil.Process(store_pid).memory_info().rss < base_rss + 32 * 2**20
