"""A real local multi-node Ray cluster (head + a node per role) serving the app through
Serve's gRPC proxy on loopback, for tests."""

from __future__ import annotations

import os
import random
import socket
import time
from contextlib import contextmanager

import ray
from ray import serve
from ray.cluster_utils import Cluster

from services.app import build_app
from services.app.args import DRAFTER_RESOURCE, GATEWAY_RESOURCE, VERIFIER_RESOURCE
from services.gateway.client import OutriderClient
from services.gateway.deployment import GRPC_SERVICER_FUNCTIONS
from services.core.gamma import GammaSchedule
from services.core.sampling import SamplingParams
from services.models.pair import make_engine

APP = "outrider"
STORE = 128 * 2**20


def free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral
    range (32768 up). An ephemeral port, free when asked, was now and then taken by a
    Ray process starting before Serve's proxy bound it ("Address already in use")."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def _start_head(head_node_args: dict) -> Cluster:
    """Ray's dashboard now and then fails to start on a loaded machine ("Failed to read
    dashboard.err file"); one more try on a fresh port."""
    for attempt in range(2):
        try:
            return Cluster(initialize_head=True, head_node_args={**head_node_args, "dashboard_port": free_port()})
        except Exception:
            if attempt:
                raise
            time.sleep(3)


@contextmanager
def serving_cluster(args: dict | None = None, verifier_cpus: int = 1, drafter_cpus: int = 1, system_config: dict | None = None,
                    env: dict[str, str] | None = None):
    """Yields (client, cluster). One CPU per worker node, as on a 2-core machine (more
    logical CPUs on the verifier node for tensor-parallel ranks). ``system_config``:
    Ray's ``_system_config`` for the cluster (e.g. ``metrics_report_interval_ms``).
    ``env``: environment of every Ray process (set while the nodes start: workers
    inherit their raylet's environment, as on a pod)."""
    saved_env = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    cluster = _start_head({"num_cpus": 0, "resources": {GATEWAY_RESOURCE: 16}, "object_store_memory": STORE,
                           # The dashboard serves Ray's state API (which node runs which replica).
                           "include_dashboard": True,
                           **({"_system_config": system_config} if system_config else {})})
    cluster.add_node(num_cpus=drafter_cpus, resources={DRAFTER_RESOURCE: 16}, object_store_memory=STORE)
    cluster.add_node(num_cpus=verifier_cpus, resources={VERIFIER_RESOURCE: 16}, object_store_memory=STORE)
    port, http_port = free_port(), free_port()
    try:
        ray.init(address=cluster.address, logging_level="error", log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"port": http_port},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        serve.run(build_app(args or {}), name=APP)
        client = OutriderClient(f"127.0.0.1:{port}")
        client.http_url = f"http://127.0.0.1:{http_port}/v1"  # the OpenAI-compatible API
        yield client, cluster
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def until_drafted(client, request, tries: int = 5) -> list:
    """The chunks of ``request`` sent until one drafts (at most ``tries`` times). A
    session never waits for its draft worker's first block (DraftLink.still_reading):
    on a cold cluster, with the worker's first open still slow, a short request may
    finish before that block comes, and is rightly decoded without drafts."""
    for _ in range(tries):
        chunks = list(client.generate(request, timeout=120))
        if chunks[-1].stats.drafted > 0:
            break
    return chunks


def replicas(deployment: str) -> list:
    """The live replica actors of ``deployment`` (ray.util.state ActorState)."""
    from ray.util.state import list_actors

    # The address is explicit: left out, the state API may find another cluster on this machine.
    return [a for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                   filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name == f"ServeReplica:{APP}:{deployment}"]


def active_sessions(*names: str) -> dict[str, int]:
    """Sessions open on each of ``names`` (default: every deployment). A call to a
    deployment at its max_ongoing_requests (a full verifier) waits for a session to end."""
    return {name: serve.get_deployment_handle(name, app_name=APP).active_sessions.remote().result()
            for name in names or ("gateway", "verifier", "drafter")}


def target_only(pair, prompt: str, n: int) -> list[int]:
    """In-process target-only greedy decoding: the reference for every served config."""
    ids = pair.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return make_engine(pair, "none", GammaSchedule(initial=0)).generate(ids, n, SamplingParams()).token_ids
