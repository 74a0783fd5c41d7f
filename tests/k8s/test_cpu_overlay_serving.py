"""The CPU overlay's serve config, taken from its rendered RayService, deployed the way
KubeRay (and `serve deploy`) does it, through the dashboard's REST API, on a local
multi-node Ray cluster whose nodes start with the node groups' rayStartParams (custom
resources and CPUs): it serves the public gRPC API, each deployment on its own group."""

import time

import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

from k8s.manifests import groups, ray_cpus, ray_resources, rendered, serve_config
from serving_cluster import STORE, free_port, until_drafted
from services.app.args import DRAFTER_RESOURCE, GATEWAY_RESOURCE, VERIFIER_RESOURCE
from services.gateway.client import OutriderClient, make_request

ROLE_OF = {"gateway": "head", "drafter": "drafter", "verifier": "verifier"}


def deploy(dashboard: str, config: dict, timeout: float = 60.0) -> ServeSubmissionClient:
    deadline = time.monotonic() + timeout
    while True:  # the dashboard's REST API comes up a little after the head node
        try:
            client = ServeSubmissionClient(dashboard)
            client.deploy_applications(config)  # PUT /api/serve/applications/, as `serve deploy`
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait_running(client: ServeSubmissionClient, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        details = client.get_serve_details()
        app = details.get("applications", {}).get("outrider")
        if app and app["status"] == "RUNNING":
            return app
        assert not app or app["status"] not in ("DEPLOY_FAILED", "UNHEALTHY"), app
        time.sleep(2)
    raise TimeoutError(f"the app is not RUNNING after {timeout}s: {details}")


def test_cpu_overlay_serve_config_serves_grpc_on_its_node_groups():
    docs = rendered("cpu")
    node_groups = groups(docs)
    config = serve_config(docs)
    # Only the ports are this machine's (8000 and 9000 may be taken here); they are the
    # cluster-wide Serve options, not the app's config.
    config["http_options"]["port"] = free_port()
    grpc_port = config["grpc_options"]["port"] = free_port()
    # One machine, one proxy: a pod's own address on Kubernetes, the same ports here.
    config["proxy_location"] = "HeadOnly"
    dashboard_port = free_port()

    head = node_groups["head"]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": int(ray_cpus(head)), "resources": ray_resources(head),
                        "object_store_memory": STORE, "include_dashboard": True,
                        "dashboard_port": dashboard_port},
    )
    nodes = {"head": cluster.head_node.node_id}
    for name in ("drafter", "verifier"):
        group = node_groups[name]
        node = cluster.add_node(num_cpus=int(ray_cpus(group)), resources=ray_resources(group),
                                object_store_memory=STORE)
        nodes[name] = node.node_id
    assert [set(ray_resources(node_groups[g])) for g in ("head", "drafter", "verifier")] == [
        {GATEWAY_RESOURCE}, {DRAFTER_RESOURCE}, {VERIFIER_RESOURCE}]
    try:
        ray.init(address=cluster.address, logging_level="error", log_to_driver=False)
        client = deploy(f"http://127.0.0.1:{dashboard_port}", config)
        app = wait_running(client)

        with OutriderClient(f"127.0.0.1:{grpc_port}") as outrider:
            assert outrider.healthy()  # grpc.health.v1.Health/Check, what the liveness probe calls
            chunks = until_drafted(outrider, make_request("def parse_args(argv):", 12, gamma=4))
        assert sum(len(c.token_ids) for c in chunks) == 12
        assert chunks[-1].stats.finish_reason == "length" and chunks[-1].stats.drafted > 0

        # Each deployment's replicas run on the node of the group that offers its resource.
        for deployment, role in ROLE_OF.items():
            replicas = app["deployments"][deployment]["replicas"]
            assert replicas and {r["node_id"] for r in replicas} == {nodes[role]}, deployment
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
