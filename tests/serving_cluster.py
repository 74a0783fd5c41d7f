"""A real local multi-node Ray cluster (head + a node per role) serving the app through
Serve's gRPC proxy on loopback, for tests."""

from __future__ import annotations

import socket
from contextlib import contextmanager

import ray
from ray import serve
from ray.cluster_utils import Cluster

from services.app import build_app
from services.app.args import DRAFTER_RESOURCE, GATEWAY_RESOURCE, VERIFIER_RESOURCE
from services.gateway.client import OutriderClient
from services.gateway.deployment import GRPC_SERVICER_FUNCTIONS

APP = "outrider"
STORE = 128 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving_cluster(args: dict | None = None, verifier_cpus: int = 1, drafter_cpus: int = 1, system_config: dict | None = None):
    """Yields (client, cluster). One CPU per worker node, as on a 2-core machine (more
    logical CPUs on the verifier node for tensor-parallel ranks). ``system_config``:
    Ray's ``_system_config`` for the cluster (e.g. ``metrics_report_interval_ms``)."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "resources": {GATEWAY_RESOURCE: 16}, "object_store_memory": STORE,
                        # The dashboard serves Ray's state API (which node runs which replica).
                        "include_dashboard": True, "dashboard_port": free_port(),
                        **({"_system_config": system_config} if system_config else {})},
    )
    cluster.add_node(num_cpus=drafter_cpus, resources={DRAFTER_RESOURCE: 16}, object_store_memory=STORE)
    cluster.add_node(num_cpus=verifier_cpus, resources={VERIFIER_RESOURCE: 16}, object_store_memory=STORE)
    port = free_port()
    try:
        ray.init(address=cluster.address, logging_level="error", log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"port": free_port()},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        serve.run(build_app(args or {}), name=APP)
        client = OutriderClient(f"127.0.0.1:{port}")
        yield client, cluster
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def active_sessions() -> dict[str, int]:
    return {name: serve.get_deployment_handle(name, app_name=APP).active_sessions.remote().result()
            for name in ("gateway", "verifier", "drafter")}
