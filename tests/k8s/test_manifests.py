"""The KubeRay manifests in k8s/: they parse, every overlay renders, its serve config is
a valid Serve config that builds the app and agrees with cluster/serve_config.yaml, each
deployment lands on its own node group, and the gRPC Service, probes, HF token and
OpenTelemetry wiring hang together."""


import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from k8s.manifests import (
    GPU, K8S, OVERLAYS, REPO, app_args, container, find, groups, pod_gpus, ray_cpus, ray_resources, rayservice,
    render, rendered, serve_config,
)
from services.app import build_app
from services.app.args import DRAFTER_RESOURCE, GATEWAY_RESOURCE, VERIFIER_RESOURCE, AppArgs
from services import __version__
from services.gateway.deployment import GRPC_SERVICER_FUNCTIONS
from services.rpc.auth import TOKEN_ENV

CLUSTER_CONFIG = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
ROLE_RESOURCE = {"head": GATEWAY_RESOURCE, "drafter": DRAFTER_RESOURCE, "verifier": VERIFIER_RESOURCE}
GPU_OVERLAYS = ["gpu", "gpu-pvc", "production"]
RAY_HEALTH = ("local_raylet_healthz", "gcs_healthz")
# What the GPU overlays may change in the app's args, relative to cluster/serve_config.yaml.
GPU_DIFFERENCES = {"target", "draft", "device", "dtype", "tensor_parallel_size", "drafter.num_gpus", "verifier.num_gpus",
                   *(f"{role}.autoscaling.{key}" for role in ("drafter", "verifier")
                     for key in ("min_replicas", "max_replicas", "upscale_delay_s", "downscale_delay_s"))}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value and key != "resources":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_manifest_parses():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
        for doc in docs:
            if isinstance(doc, list):  # a JSON6902 patch
                assert all({"op", "path"} <= set(op) for op in doc), path
            else:
                assert {"apiVersion", "kind"} <= set(doc), path
                assert doc["kind"] in ("Kustomization", "Component") or doc["metadata"]["name"], path
    assert sorted(p.name for p in (K8S / "overlays").iterdir()) == sorted(OVERLAYS)  # every overlay is tested
    for folder in [K8S / "base", *(K8S / "overlays" / o for o in OVERLAYS)]:
        kinds = sorted({d["kind"] for d in render(folder)})
        assert {"RayService", "Service", "ConfigMap", "Deployment"} <= set(kinds), folder


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_serve_config_validates_and_builds_the_app(overlay):
    config = serve_config(rendered(overlay))
    schema = ServeDeploySchema.model_validate(config)
    assert [app.name for app in schema.applications] == ["outrider"]
    AppArgs.model_validate(app_args(rendered(overlay)))
    build_app(app_args(rendered(overlay)))  # the graph builds (nothing is started)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_it_agrees_with_cluster_serve_config(overlay):
    config = serve_config(rendered(overlay))
    for key in ("http_options", "grpc_options"):
        assert config[key] == CLUSTER_CONFIG[key], key
    # A proxy on every pod with a replica; on one machine (`outrider serve`), the head's only.
    assert (config["proxy_location"], CLUSTER_CONFIG["proxy_location"]) == ("EveryNode", "HeadOnly")
    assert config["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    (app,), (local,) = config["applications"], CLUSTER_CONFIG["applications"]
    assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in local.items() if k != "args"}
    args, local_args = flat(app["args"]), flat(local["args"])
    changed = {k for k in args.keys() | local_args.keys() if args.get(k) != local_args.get(k)}
    if overlay == "cpu":
        assert changed == set()  # the bundled pair on CPU, exactly as `outrider serve` runs it
        return
    assert changed == GPU_DIFFERENCES
    parsed = AppArgs.model_validate(app["args"])
    assert (parsed.device, parsed.dtype) == ("cuda", "bfloat16")
    assert parsed.tensor_parallel_size > 1 and parsed.verifier.num_gpus == 0 and parsed.drafter.num_gpus > 0
    if overlay != "gpu-pvc":
        assert not parsed.target.startswith("/") and not parsed.draft.startswith("/")  # hub ids
    else:
        assert parsed.target.startswith("/models/") and parsed.draft.startswith("/models/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_deployment_is_pinned_to_exactly_one_node_group(overlay):
    docs = rendered(overlay)
    offered = {name: ray_resources(group) for name, group in groups(docs).items()}
    assert set(offered) == set(ROLE_RESOURCE)
    args = AppArgs.model_validate(app_args(docs))
    for role, placement in (("head", args.gateway), ("drafter", args.drafter), ("verifier", args.verifier)):
        assert set(placement.resources) == {ROLE_RESOURCE[role]}
        for resource, amount in placement.resources.items():
            offering = [name for name, resources in offered.items() if resource in resources]
            assert offering == [role], (resource, offering)
            assert offered[role][resource] >= amount * placement.num_replicas
    # Logical CPUs and GPUs: each replica fits its group's pod (one pod per group here).
    all_groups = groups(docs)
    assert ray_cpus(all_groups["head"]) >= args.gateway.num_cpus
    assert ray_cpus(all_groups["drafter"]) >= args.drafter.num_cpus * args.drafter.num_replicas
    assert pod_gpus(all_groups["drafter"]) >= args.drafter.num_gpus * args.drafter.num_replicas
    bundles = args.verifier_bundles() or [{"CPU": args.verifier.num_cpus, "GPU": args.verifier.num_gpus}]
    assert ray_cpus(all_groups["verifier"]) >= sum(b.get("CPU", 0) for b in bundles)  # STRICT_PACK: one pod
    assert pod_gpus(all_groups["verifier"]) >= sum(b.get("GPU", 0) for b in bundles)


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_pods_ask_for_their_gpus_and_tolerate_gpu_nodes(overlay):
    docs = rendered(overlay)
    args = AppArgs.model_validate(app_args(docs))
    all_groups = groups(docs)
    verifier = all_groups["verifier"]
    assert args.verifier.num_replicas == verifier["replicas"] == 1
    assert pod_gpus(verifier) == args.tensor_parallel_size  # one GPU per rank, none for the replica
    assert pod_gpus(all_groups["drafter"]) == args.drafter.num_gpus
    assert pod_gpus(all_groups["head"]) == 0
    for name in ("drafter", "verifier"):
        resources = container(all_groups[name])["resources"]
        assert resources["requests"][GPU] == resources["limits"][GPU]  # extended resources: equal
        tolerations = all_groups[name]["template"]["spec"]["tolerations"]
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in tolerations


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_clusters_autoscale_replicas_and_the_pods_follow(overlay):
    docs = rendered(overlay)
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["securityContext"]["runAsNonRoot"] is True
    args = AppArgs.model_validate(app_args(docs))
    all_groups = groups(docs)
    for role, placement in (("drafter", args.drafter), ("verifier", args.verifier)):
        scaling = placement.autoscaling
        assert scaling is not None and scaling.max_replicas > scaling.min_replicas >= 1, role
        group = all_groups[role]
        # One replica per pod (a GPU each; a verifier's whole tensor-parallel group): a
        # pod for every replica Serve may start, none kept beyond the minimum.
        assert group["minReplicas"] == scaling.min_replicas and group["maxReplicas"] == scaling.max_replicas, role
        options = args.serve_options(role)
        assert options["autoscaling_config"]["max_replicas"] == scaling.max_replicas
    ServeDeploySchema.model_validate(serve_config(docs))  # autoscaling configs Serve accepts


def test_the_cpu_variant_asks_for_no_gpu_and_little():
    docs = rendered("cpu")
    assert AppArgs.model_validate(app_args(docs)).device == "cpu"
    assert "nvidia.com" not in yaml.safe_dump_all(docs)
    for name, group in groups(docs).items():
        limits = container(group)["resources"]["limits"]
        assert float(limits["cpu"]) <= 1 and limits["memory"] == "2Gi", name
    assert [ray_cpus(g) for g in groups(docs).values()] == [0, 1, 1]  # as `outrider serve`'s nodes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_service_spreads_over_every_serving_pod_and_probes_check_ray_not_the_app(overlay):
    docs = rendered(overlay)
    config = serve_config(docs)
    grpc_port = config["grpc_options"]["port"]
    assert config["proxy_location"] == "EveryNode"
    service = find(docs, "Service", "outrider-grpc")
    (port,) = service["spec"]["ports"]
    assert port["port"] == grpc_port and port["appProtocol"] == "grpc"
    # Any Ray pod whose proxy KubeRay has labelled serving, whatever its group.
    selector = dict(service["spec"]["selector"])
    assert selector.pop("ray.io/serve") == "true"
    for name, group in groups(docs).items():
        assert selector.items() <= group["template"]["metadata"]["labels"].items(), name
        ports = {p["name"]: p["containerPort"] for p in container(group)["ports"]}
        assert ports[port["targetPort"]] == grpc_port, name
    # The OpenAI-compatible API: Serve's HTTP proxy on the same pods.
    http = find(docs, "Service", "outrider-http")
    (web,) = http["spec"]["ports"]
    assert web["port"] == config["http_options"]["port"] and http["spec"]["selector"] == service["spec"]["selector"]
    for name, group in groups(docs).items():
        ports = {p["name"]: p["containerPort"] for p in container(group)["ports"]}
        assert ports[web["targetPort"]] == web["port"], name
    # The head's liveness and readiness are Ray's own health (raylet and GCS): a stalled
    # gateway must not restart the head and the cluster with it.
    head = container(groups(docs)["head"])
    for probe in ("livenessProbe", "readinessProbe"):
        command = " ".join(head[probe]["exec"]["command"])
        assert all(endpoint in command for endpoint in RAY_HEALTH) and str(grpc_port) not in command, probe
    assert "grpc" not in head["livenessProbe"]
    # Workers: Ready as Ray nodes; their proxies start only once a replica runs there.
    for name in ("drafter", "verifier"):
        probe = " ".join(container(groups(docs)[name])["readinessProbe"]["exec"]["command"])
        assert "local_raylet_healthz" in probe and ":8000" not in probe
    assert rayservice(docs)["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hf_token_comes_from_a_secret_and_pods_export_to_the_collector(overlay):
    docs = rendered(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"]  # the operator creates it
    env_config = find(docs, "ConfigMap", "outrider-env")["data"]
    collector = find(docs, "Service", "otel-collector")
    http_port = next(p["port"] for p in collector["spec"]["ports"] if p["name"] == "otlp-http")
    assert env_config["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{collector['metadata']['name']}:{http_port}"
    for name, group in groups(docs).items():
        c = container(group)
        assert {"configMapRef": {"name": "outrider-env"}} in c["envFrom"], name
        env = {e["name"]: e for e in c["env"]}
        assert "value" not in env["HF_TOKEN"], name
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "outrider-hf-token", name
        # Every Ray process has the internal streams' token, from a Secret (required).
        assert env[TOKEN_ENV]["valueFrom"]["secretKeyRef"] == {"name": "outrider-internal-token", "key": "token"}, name
        name_, tag = c["image"].rsplit(":", 1)
        assert tag == __version__ and name_.rsplit("/", 1)[-1] == "outrider", c["image"]
        assert ("/" in name_) == (overlay == "production"), c["image"]  # production: from a registry


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_draft_workers_admit_only_the_clusters_ray_pods(overlay):
    docs = rendered(overlay)
    policy = find(docs, "NetworkPolicy", "outrider-drafter")
    all_groups = groups(docs)
    labels = {name: {**g["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"} for name, g in all_groups.items()}
    target = policy["spec"]["podSelector"]["matchLabels"]
    assert [name for name in labels if target.items() <= labels[name].items()] == ["drafter"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    from_pods, scrapes = policy["spec"]["ingress"]
    (peer,) = from_pods["from"]
    assert set(peer) == {"podSelector"} and "ports" not in from_pods  # Ray's own ports stay open among its pods
    assert all(peer["podSelector"]["matchLabels"].items() <= pod.items() for pod in labels.values())
    assert "from" not in scrapes and scrapes["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    other = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}  # collector, Redis: no Ray
    for name, deployment in other.items():
        pod = deployment["spec"]["template"]["metadata"]["labels"]
        assert not peer["podSelector"]["matchLabels"].items() <= pod.items(), name


def test_the_collector_receives_otlp_and_exports_to_debug():
    docs = rendered("cpu")
    config = yaml.safe_load(find(docs, "ConfigMap", "otel-collector-config")["data"]["collector.yaml"])
    protocols = config["receivers"]["otlp"]["protocols"]
    assert (protocols["grpc"]["endpoint"], protocols["http"]["endpoint"]) == ("0.0.0.0:4317", "0.0.0.0:4318")
    assert "debug" in config["exporters"]
    for pipeline in ("traces", "metrics", "logs"):
        assert config["service"]["pipelines"][pipeline]["receivers"] == ["otlp"]
        assert config["service"]["pipelines"][pipeline]["exporters"] == ["debug"]
    deployment = find(docs, "Deployment", "otel-collector")
    spec = deployment["spec"]["template"]["spec"]
    (collector,) = spec["containers"]
    assert collector["args"] == ["--config=/conf/collector.yaml"]
    assert spec["volumes"][0]["configMap"]["name"] == "otel-collector-config"
    container_ports = {p["name"]: p["containerPort"] for p in collector["ports"]}
    assert container_ports == {"otlp-grpc": 4317, "otlp-http": 4318}
    service = find(docs, "Service", "otel-collector")
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == container_ports
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_the_pvc_overlay_mounts_the_models_in_every_ray_pod():
    docs = rendered("gpu-pvc")
    args = app_args(docs)
    claim = find(docs, "PersistentVolumeClaim", "outrider-models")
    for name, group in groups(docs).items():
        spec = group["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "models"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models"]
        assert mount["readOnly"] and all(args[k].startswith(mount["mountPath"] + "/") for k in ("target", "draft"))


def test_versions_agree_with_the_image_and_the_package():
    import ray

    dockerfile = (K8S / "image" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py" in dockerfile
    for overlay in OVERLAYS:
        assert rayservice(rendered(overlay))["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_production_keeps_gcs_state_in_redis_with_a_password_from_a_secret():
    docs = rendered("production")
    options = rayservice(docs)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    redis = find(docs, "Service", "outrider-redis")
    (port,) = redis["spec"]["ports"]
    assert options["redisAddress"] == f"redis://{redis['metadata']['name']}:{port['port']}"
    secret = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "outrider-redis", "key": "password"}
    assert not [d for d in docs if d["kind"] == "Secret"]  # the operator creates it
    deployment = find(docs, "Deployment", "outrider-redis")
    spec = deployment["spec"]["template"]["spec"]
    (server,) = spec["containers"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": secret}} in server["env"]
    assert "$(REDIS_PASSWORD)" in server["args"] and "--appendonly" in server["args"]
    assert redis["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert spec["securityContext"]["runAsNonRoot"] and server["securityContext"]["readOnlyRootFilesystem"]
    assert "gcsFaultToleranceOptions" not in rayservice(rendered("gpu"))["spec"]["rayClusterConfig"]


def test_production_is_scraped_by_prometheus_operator_and_wires_grafana():
    docs = rendered("production")
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for name, group in groups(docs).items():  # KubeRay adds ray.io/is-ray-node to every Ray pod
        labels = {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}
        assert selector.items() <= labels.items(), name
        ports = {p["name"]: p["containerPort"] for p in container(group)["ports"]}
        assert ports[endpoint["port"]] == 8080, name  # Ray's metrics export port on KubeRay
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"} \
        in endpoint["relabelings"]
    env = {e["name"]: e.get("value") for e in container(groups(docs)["head"])["env"]}
    assert env["RAY_PROMETHEUS_HOST"].startswith("http://") and env["RAY_GRAFANA_HOST"].startswith("http://")
    assert not [d for d in rendered("gpu") if d["kind"] == "PodMonitor"]  # needs the operator's CRDs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_unprivileged_as_a_non_root_user(overlay):
    docs = rendered(overlay)
    pods = [g["template"]["spec"] for g in groups(docs).values()]
    pods += [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    ray_containers = {id(container(g)) for g in groups(docs).values()}
    for spec in pods:
        for c in spec["containers"]:
            security = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
            assert security["runAsNonRoot"] and security["runAsUser"] > 0, c["name"]
            assert security["allowPrivilegeEscalation"] is False, c["name"]
            # Ray writes its session and caches under the root filesystem; nothing else may.
            assert security.get("readOnlyRootFilesystem") or id(c) in ray_containers, c["name"]


def test_production_ends_tls_at_an_ingress_in_front_of_the_grpc_service():
    docs = rendered("production")
    ingress = find(docs, "Ingress", "outrider-grpc")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600  # streams last minutes
    env = find(docs, "ConfigMap", "outrider-env")["data"]
    body = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) * 2**20 == int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"])
    (tls,) = ingress["spec"]["tls"]
    (rule,) = ingress["spec"]["rules"]
    assert tls["secretName"] and rule["host"] in tls["hosts"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = find(docs, "Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert not [d for d in rendered("gpu") if d["kind"] == "Ingress"]  # an opt-in component


def test_production_ends_tls_for_the_openai_api_on_the_same_host():
    docs = rendered("production")
    grpc, http = find(docs, "Ingress", "outrider-grpc"), find(docs, "Ingress", "outrider-http")
    notes = http["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTP"
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # server-sent events stream
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert http["spec"]["tls"] == grpc["spec"]["tls"]  # one host, one certificate
    (rule,) = http["spec"]["rules"]
    assert rule["host"] == grpc["spec"]["rules"][0]["host"]
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/v1" and path["pathType"] == "Prefix"
    backend = path["backend"]["service"]
    service = find(docs, "Service", backend["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
    assert port["port"] == 8000 and port["appProtocol"] == "http"


def test_production_leaves_ray_only_its_scratch_paths_writable():
    docs = rendered("production")
    for name, group in groups(docs).items():
        ray = container(group)
        assert ray["securityContext"]["readOnlyRootFilesystem"] is True, name
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in ray["volumeMounts"]}
        assert set(mounts) == {"/tmp", "/home/ray/.cache", "/home/ray/.config", "/home/ray/.ray"}, name
        assert all("emptyDir" in volumes[m["name"]] for m in mounts.values()), name
    for name, group in groups(rendered("gpu")).items():  # an opt-in component
        assert "readOnlyRootFilesystem" not in container(group)["securityContext"], name
