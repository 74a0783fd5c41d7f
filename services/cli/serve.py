"""``outrider serve`` / ``outrider stop``: the bundled pair on a local multi-node Ray
cluster, deployed from cluster/serve_config.yaml with `serve deploy`."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from ..app.args import AppArgs
from ..gateway.client import OutriderClient, make_request
from . import local_cluster
from .common import UsageError

REPO_CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "serve_config.yaml"
FIRST_PROMPT = "def parse_args(argv):"


def add_parser(sub, name: str) -> None:
    if name == "stop":
        sub.add_parser(name, help="stop the local cluster that `outrider serve` started")
        return
    parser = sub.add_parser(name, help="serve on a local Ray cluster with a node per role")
    parser.add_argument("--config", type=Path, default=REPO_CONFIG, help="Serve config (default: %(default)s)")
    parser.add_argument("--detach", action="store_true", help="return once the app answers; stop with `outrider stop`")
    parser.add_argument("--ray-port", type=int, default=6390, help="GCS port of the local head node")
    parser.add_argument("--dashboard-port", type=int, default=local_cluster.DEFAULT_DASHBOARD_PORT)
    parser.add_argument("--replicas", type=int, default=1,
                        help="draft and verifier replicas (each on its role's node); 2+ lets a stream survive "
                             "a replica's death on a survivor (`outrider bench --kill-replica`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an app argument (YAML value; dotted keys reach nested ones), "
                             "e.g. --set fanout_policy=requested --set drafter.num_replicas=2")
    parser.add_argument("--prompt", default=FIRST_PROMPT, help="first request sent once the app is up")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the app to be ready")


def serve_addresses(config: Path) -> tuple[str, str]:
    """The gRPC address and the OpenAI-compatible API's base URL a config serves on."""
    if not config.exists():
        raise UsageError(f"serve config not found: {config}")
    try:
        loaded = yaml.safe_load(config.read_text())
    except yaml.YAMLError as err:
        raise UsageError(f"{config} is not valid YAML: {err}") from None
    port = (loaded.get("grpc_options") or {}).get("port")
    if not port:
        raise UsageError(f"{config} sets no grpc_options.port")
    http_port = (loaded.get("http_options") or {}).get("port", 8000)  # Serve's default
    return f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}/v1"


def run(args) -> int:
    if args.command == "stop":
        count = local_cluster.stop()
        print("stopped the local Outrider cluster" if count else "no local Outrider cluster was running")
        return 0
    address, http_url = serve_addresses(args.config)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if local_cluster.running():
        raise UsageError("a local Outrider cluster is already running; `outrider stop` it first")
    overrides = parse_sets(args.set)
    if args.replicas > 1:
        for role in ("drafter", "verifier"):
            overrides[f"{role}.num_replicas"] = args.replicas
    config = with_overrides(args.config, overrides)
    demand = node_demand(config)
    started = time.perf_counter()
    sizes = ", ".join(f"{role} node {need['CPU']:g} CPU" + (f" {need['GPU']:g} GPU" if need["GPU"] else "")
                      for role, need in ((r, demand.get(res, {"CPU": 0, "GPU": 0})) for r, res in local_cluster.NODES.items()))
    print(f"starting a local Ray cluster: {sizes} ...", flush=True)
    local_cluster.start(args.ray_port, demand, args.dashboard_port)
    try:
        print(f"deploying {args.config}{f' with {args.replicas} replicas a role' if args.replicas > 1 else ''} ...",
              flush=True)
        local_cluster.deploy(config, args.dashboard_port)
        client = wait_until_serving(address, args.timeout, args.dashboard_port)
        print(f"Outrider is serving gRPC on {address} and the OpenAI-compatible API on {http_url} "
              f"({time.perf_counter() - started:.0f} s); Ray dashboard: http://127.0.0.1:{args.dashboard_port}", flush=True)
        first_request(client, args.prompt, args.max_new_tokens)
    except BaseException:
        local_cluster.stop()
        raise
    if args.detach:
        print("left running; stop it with `outrider stop`")
        return 0
    print("serving until Ctrl-C ...", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        local_cluster.stop()
        print("stopped")


def parse_sets(items: list[str]) -> dict[str, object]:
    """``--set KEY=VALUE`` items as {dotted key: YAML value}."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UsageError(f"--set {key}: not a YAML value: {err}") from None
    return overrides


def with_overrides(config: Path, overrides: dict[str, object]) -> Path:
    """``config`` itself, or a copy (under the cluster's temp dir) whose applications'
    args carry ``overrides`` (dotted keys: nested). AppArgs validates them at deploy."""
    if not overrides:
        return config
    data = yaml.safe_load(config.read_text())
    for app in data.get("applications", []):
        for key, value in overrides.items():
            node = app.setdefault("args", {})
            *path, leaf = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise UsageError(f"--set {key}: {part} is not a mapping in {config}")
            node[leaf] = value
        try:  # a misspelt key or a bad value fails here, not inside a Serve replica
            AppArgs.model_validate(app["args"])
        except ValidationError as err:
            raise UsageError(f"--set: {err}") from None
    local_cluster.TEMP_DIR.mkdir(parents=True, exist_ok=True)
    copy = local_cluster.TEMP_DIR / "serve_config.overrides.yaml"
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    return copy


def node_demand(config: Path) -> dict[str, dict[str, float]]:
    """What the config's deployments need of each node role, summed over its apps;
    refuses, naming what is missing, a config this machine cannot place."""
    try:
        data = yaml.safe_load(config.read_text())
        apps = [AppArgs.model_validate(app.get("args") or {}) for app in data.get("applications", [])]
    except (yaml.YAMLError, ValidationError, AttributeError) as error:
        raise UsageError(f"{config}: not a valid Outrider serve config: {error}") from None
    demand: dict[str, dict[str, float]] = {}
    for app in apps:
        for role, need in app.node_demand().items():
            total = demand.setdefault(role, {"CPU": 0.0, "GPU": 0.0})
            for resource, amount in need.items():
                total[resource] += amount
    # Every local node is this machine: each may claim its GPUs (Ray hands out ids per node).
    have = torch.cuda.device_count()
    short = {role: need["GPU"] for role, need in demand.items() if need["GPU"] > have}
    if short:
        wanted = ", ".join(f"{gpus:g} on the {role.removeprefix('outrider_')} node" for role, gpus in short.items())
        raise UsageError(f"{config} cannot be placed here: it needs GPUs ({wanted}) and this machine has {have}")
    return demand


def wait_until_serving(address: str, timeout: float, dashboard_port: int) -> OutriderClient:
    """Once the gateway answers health checks and Serve reports every deployment up:
    the gateway answers as soon as it is up, before the replicas behind it (the first
    request would wait for them)."""
    client = OutriderClient(address)
    deadline = time.monotonic() + timeout
    while not (client.healthy() and local_cluster.apps_running(dashboard_port)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app did not answer health checks on {address}, or its deployments did not all "
                               f"start, within {timeout:.0f} s; see `serve status` and the logs under "
                               f"{local_cluster.TEMP_DIR}")
        time.sleep(1)
    return client


def first_request(client: OutriderClient, prompt: str, max_new_tokens: int) -> None:
    print(f"first request ({max_new_tokens} tokens, greedy, draft model):\n", flush=True)
    sys.stdout.write(prompt)
    stats = None
    for chunk in client.generate(make_request(prompt, max_new_tokens)):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.HasField("stats"):
            stats = chunk.stats
    print(f"\n\n[{stats.emitted} tokens in {stats.total_s:.2f} s; mean acceptance length "
          f"{stats.mean_acceptance_length:.2f}; pipeline hit rate {stats.pipeline_hit_rate:.2f}; "
          f"speculation-cache hit rate {stats.cache_hit_rate:.2f}; overlap {stats.overlap:.2f}"
          # A session does not wait for its draft worker's first block: a fresh replica's
          # first stream opens slowly, and the rounds meanwhile are plain decoding steps.
          + (f"; {stats.reading_rounds} of {stats.rounds} rounds decoded while the draft worker read the prompt"
             if stats.reading_rounds else "") + "]", flush=True)
