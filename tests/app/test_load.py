"""Outrider under load, served for real on a local multi-node cluster: draft workers
routed by their reported load, draft workers and verifiers autoscaled on their sessions
(low thresholds here), admission over capacity, and every output exactly target-only
greedy decoding while the goodput controller turns drafting on and off."""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
from ray import serve

from serving_cluster import APP, active_sessions, replicas, serving_cluster
from services.app.args import DRAFTER_RESOURCE, VERIFIER_RESOURCE
from services.core.gamma import GammaSchedule
from services.core.sampling import SamplingParams
from services.gateway.client import make_request
from services.models.loading import bundled_paths
from services.models.pair import load_pair, make_engine

PROMPTS = ["def parse_args(argv):", "class Stack:\n    def push(self, item):", "import os\n\nfor name in",
           "def fib(n):", "with open(path) as f:", "for i in range(10):"]
STREAMS = 24  # the load step: the gateway's session limit
LONG = 1200
SCALING = {"upscale_delay_s": 1, "downscale_delay_s": 5, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def server():
    role = lambda resource, lo, hi, target: {  # noqa: E731
        "num_cpus": 1, "resources": {resource: 1},
        "autoscaling": {"min_replicas": lo, "max_replicas": hi, "target": target, **SCALING}}
    # The gateway's session limit binds first: one verifier replica runs them all.
    args = {"max_sessions": STREAMS, "verifier_max_sessions": STREAMS, "max_batch_size": 4,
            "drafter": role(DRAFTER_RESOURCE, 2, 3, 2), "verifier": role(VERIFIER_RESOURCE, 1, 2, 2)}
    # Serve's autoscaling metrics every second instead of ten, so the test sees a scale-up.
    env = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
    with serving_cluster(args, verifier_cpus=2, drafter_cpus=3, env=env) as (client, _):
        wait_for(lambda: running() == {"drafter": 2, "verifier": 1}, 180, "the minimum replicas did not start")
        yield client


@pytest.fixture(scope="module")
def expected():
    pair = load_pair(bundled_paths(), with_draft=False)
    engine = make_engine(pair, "none", GammaSchedule(initial=0))
    cache = {}

    def target_only(prompt: str, n: int) -> list[int]:
        if (prompt, n) not in cache:
            ids = pair.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            cache[prompt, n] = engine.generate(ids, n, SamplingParams()).token_ids
        return cache[prompt, n]

    return target_only


def running() -> dict[str, int]:
    deployments = serve.status().applications[APP].deployments
    return {name: deployments[name].replica_states.get("RUNNING", 0) for name in ("drafter", "verifier")}


def wait_for(condition, timeout: float, why: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(why)


def draft_sessions_per_worker() -> list[float]:
    """Each live draft worker's own load report (what the router ranks by)."""
    return sorted(ray.get(ray.get_actor(a.name, namespace="serve").record_routing_stats.remote())["sessions"]
                  for a in replicas("drafter"))


def generate(client, prompt: str, n: int) -> tuple[list[int], object]:
    tokens, stats = [], None
    for chunk in client.generate(make_request(prompt, n, method="draft", gamma=6), timeout=600):
        tokens += chunk.token_ids
        if chunk.HasField("stats"):
            stats = chunk.stats
    return tokens, stats


def test_the_router_spreads_new_sessions_over_draft_workers_by_load(server, expected):
    # Sessions arrive 1.5 s apart, so each finds every worker's load reported (Serve
    # polls it every second): each goes to the least loaded. At random, an even split of
    # six sessions over two workers happens 31% of the time. Long sessions: none ends
    # before the last has started.
    with ThreadPoolExecutor(6) as pool:
        futures = []
        for prompt in PROMPTS:
            futures.append(pool.submit(generate, server, prompt, LONG))
            time.sleep(1.5)
        spread = draft_sessions_per_worker()
        results = [f.result() for f in futures]
    assert spread == [3.0, 3.0]
    for prompt, (tokens, _) in zip(PROMPTS, results):
        assert tokens == expected(prompt, LONG)


def test_a_load_step_scales_out_refuses_what_is_over_capacity_and_scales_back(server, expected):
    peak = {"drafter": 2, "verifier": 1}
    outputs = []
    deadline = time.monotonic() + 240
    refused = None
    with ThreadPoolExecutor(STREAMS) as pool:
        while time.monotonic() < deadline and peak != {"drafter": 3, "verifier": 2}:
            # The first wave long enough that none ends before the extra request is sent.
            n = 96 if refused is not None else 320
            wave = [pool.submit(generate, server, PROMPTS[i % len(PROMPTS)], n) for i in range(STREAMS)]
            if refused is None:
                # Every gateway session taken: one more is refused at once, with a retry hint.
                # (Asked of the gateway alone: a call to the full verifier would wait for a
                # session to end, and the extra request would then find its place.)
                wait_for(lambda: active_sessions("gateway")["gateway"] == STREAMS, 60,
                         "the load step never filled the gateway")
                with pytest.raises(grpc.RpcError) as error:
                    generate(server, PROMPTS[0], 8)
                refused = error.value
            while not all(f.done() for f in wave):
                peak = {k: max(v, running()[k]) for k, v in peak.items()}
                time.sleep(0.5)
            outputs += [(PROMPTS[i % len(PROMPTS)], n, f.result()) for i, f in enumerate(wave)]
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent sessions" in refused.details()
    hint = re.search(r"retry in about (\d+\.\d) s", refused.details())
    assert hint and float(hint.group(1)) > 0
    assert peak == {"drafter": 3, "verifier": 2}, "the load step did not scale both deployments out"
    for prompt, n, (tokens, stats) in outputs:  # every admitted request finished, exactly
        assert tokens == expected(prompt, n)
        assert stats.finish_reason in ("length", "stop")
    # Load over: back to the minimum, nothing left open.
    wait_for(lambda: running() == {"drafter": 2, "verifier": 1}, 120, "the replicas did not scale back down")
    wait_for(lambda: active_sessions()["gateway"] == active_sessions()["verifier"] == 0 and
             set(draft_sessions_per_worker()) == {0.0}, 30, "sessions were left open")
    tokens, _ = generate(server, PROMPTS[1], 32)  # and it still serves
    assert tokens == expected(PROMPTS[1], 32)
