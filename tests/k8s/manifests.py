"""Reading the rendered KubeRay manifests: the RayService, its serve config, its node
groups and what each group's pods offer Ray. Rendered by the real `kubectl kustomize`
(kustomize v5), as `kubectl apply -k` renders them."""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu", "gpu-pvc", "production")
GPU = "nvidia.com/gpu"


@functools.cache
def _kustomize(folder: str) -> str:
    if shutil.which("kubectl") is None:
        pytest.skip("rendering the manifests needs kubectl (with kustomize)")
    done = subprocess.run(["kubectl", "kustomize", folder], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {folder}: {done.stderr}"
    return done.stdout


def render(folder: Path) -> list[dict]:
    """The documents `kubectl kustomize folder` gives (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_kustomize(str(folder))) if doc]


def rendered(overlay: str) -> list[dict]:
    return render(K8S / "overlays" / overlay)


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def rayservice(docs: list[dict]) -> dict:
    return find(docs, "RayService", "outrider")


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])


def app_args(docs: list[dict]) -> dict:
    (app,) = serve_config(docs)["applications"]
    return app["args"]


def groups(docs: list[dict]) -> dict[str, dict]:
    """Node groups by name: "head" and each worker group's groupName."""
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container


def ray_resources(group: dict) -> dict[str, float]:
    """The custom resources a group's pods offer: KubeRay passes rayStartParams.resources
    to `ray start --resources=VALUE` through a shell, so unquote it as the shell does."""
    value = group["rayStartParams"].get("resources")
    if value is None:
        return {}
    (unquoted,) = shlex.split(value)
    return json.loads(unquoted)


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_cpus(group: dict) -> float:
    """Ray's logical CPUs on a group's pods: rayStartParams num-cpus, else (as KubeRay
    does) the container's CPU limit."""
    params = group["rayStartParams"]
    if "num-cpus" in params:
        return float(params["num-cpus"])
    return _quantity(container(group)["resources"]["limits"]["cpu"])


def pod_gpus(group: dict) -> int:
    return int(container(group).get("resources", {}).get("limits", {}).get(GPU, 0))
