"""A local Ray cluster with one node per Outrider role, started with plain `ray start`
so that `ray status`, the dashboard and `serve deploy` work on it as on any cluster.

Every process of it lives under its own temp dir, so stopping it never touches another
Ray cluster on the same machine (unlike `ray stop`, which stops them all).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from ..app.args import DRAFTER_RESOURCE, GATEWAY_RESOURCE, VERIFIER_RESOURCE
from ..rpc.auth import TOKEN_ENV

TEMP_DIR = Path(os.environ.get("OUTRIDER_RAY_TEMP", "/tmp/outrider-ray"))
DEFAULT_DASHBOARD_PORT = 8265
OBJECT_STORE_BYTES = 256 * 2**20  # per node; the head holds session state (prefix_cache_bytes of it at most for prefixes)

# Each node's role resource. The head runs Serve's controller and proxy and the
# gateway; draft workers and verifiers each get a node. Their logical CPUs and GPUs are
# sized from the config deployed (``start``'s ``demand``).
NODES = {"head": GATEWAY_RESOURCE, "drafter": DRAFTER_RESOURCE, "verifier": VERIFIER_RESOURCE}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _env() -> dict:
    # Processes size their own torch pools; default OpenMP pools would oversubscribe.
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", **AUTH_ENV, **INTERNAL_TOKEN_ENV,
            **MESSAGE_ENV}


# Ray 2.60 turns token auth on for a node that finds ~/.ray/auth_token (any earlier
# `ray.init()` writes one) but not for every kind of process joining it, so a node could
# be refused by its own head. This single-machine cluster listens on this machine only
# and says its mode explicitly; a real cluster (k8s/) sets its own.
AUTH_ENV = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
# The token of the internal streams (rpc/auth.py): the caller's, else a fresh one for
# this cluster; every node inherits it from its `ray start`.
INTERNAL_TOKEN_ENV = {TOKEN_ENV: os.environ.get(TOKEN_ENV) or secrets.token_hex(16)}
# The largest message Serve's gRPC proxy takes (its default is 2 GiB): a bigger request
# is refused RESOURCE_EXHAUSTED before it reaches the gateway. 8 MiB holds a prompt of
# a few hundred thousand tokens.
MESSAGE_ENV = {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": os.environ.get("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(8 << 20))}


def running() -> bool:
    return bool(_processes())


def start(ray_port: int, demand: dict[str, dict[str, float]], dashboard_port: int = DEFAULT_DASHBOARD_PORT) -> str:
    """Start head + one node per role, each with the logical CPUs and GPUs its role's
    deployments need (``demand``: AppArgs.node_demand, summed over the apps); returns
    the cluster address. Logical CPUs are a placement budget, not cores: a 2-core
    machine can hold a verifier replica and its tensor-parallel ranks."""
    address = f"127.0.0.1:{ray_port}"
    common = ["--disable-usage-stats", f"--object-store-memory={OBJECT_STORE_BYTES}"]
    for role, resource in NODES.items():
        need = demand.get(resource, {})
        cpus, gpus = math.ceil(need.get("CPU", 0)), math.ceil(need.get("GPU", 0))
        if role == "head":
            args = ["--head", f"--port={ray_port}", f"--temp-dir={TEMP_DIR}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        else:
            args = [f"--address={address}"]
        cmd = [_bin("ray"), "start", *args, f"--num-cpus={cpus}", f"--num-gpus={gpus}",
               f"--resources={json.dumps({resource: 16})}", *common]
        result = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        if result.returncode != 0:
            stop()
            raise RuntimeError(f"`ray start` for the {role} node failed:\n{result.stderr[-2000:]}")
    return address


def deploy(config: Path, dashboard_port: int = DEFAULT_DASHBOARD_PORT) -> None:
    """`serve deploy` the config through the dashboard, as on any cluster."""
    cmd = [_bin("serve"), "deploy", str(config), "--address", f"http://127.0.0.1:{dashboard_port}"]
    for attempt in range(30):  # the dashboard's REST API comes up a little after `ray start`
        result = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        if result.returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError(f"`serve deploy {config}` failed:\n{result.stderr[-2000:]}")


def apps_running(dashboard_port: int = DEFAULT_DASHBOARD_PORT) -> bool:
    """Whether `serve status` reports every application RUNNING (all its replicas
    started). Through the CLI, as `deploy`: it authenticates to the dashboard as this
    cluster requires (a plain request may be refused, 401)."""
    cmd = [_bin("serve"), "status", "--address", f"http://127.0.0.1:{dashboard_port}"]
    try:
        result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            return False
        apps = (yaml.safe_load(result.stdout) or {}).get("applications") or {}
    except (subprocess.TimeoutExpired, yaml.YAMLError, AttributeError):
        return False
    return bool(apps) and all(app.get("status") == "RUNNING" for app in apps.values())


def stop(timeout: float = 15.0) -> int:
    """Stop every process of the local cluster; returns how many there were."""
    procs = _processes()
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited on its own meanwhile
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return len(procs)


def _processes() -> list[psutil.Process]:
    """Processes started for the cluster: their command lines name its temp dir, or they
    descend from one that does (workers get the session dir through their raylet)."""
    marker = str(TEMP_DIR)
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or []) and proc.pid != os.getpid():
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())
