"""The README's main job end to end: `outrider serve --detach` starts a local cluster
with a node per role, deploys cluster/serve_config.yaml with `serve deploy` and answers
a first request; `generate --server` and `bench --server` use it; `outrider stop`
stops exactly that cluster."""

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from serving_cluster import free_port

REPO = Path(__file__).resolve().parents[2]
OUTRIDER = str(Path(sys.executable).with_name("outrider"))


def local_config(tmp_path, **args) -> tuple[Path, int]:
    """A copy of cluster/serve_config.yaml on free ports, with ``args`` set in the app's
    args; returns its path and gRPC port."""
    config = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    grpc_port = free_port()
    config["grpc_options"]["port"] = grpc_port
    config["http_options"]["port"] = free_port()
    config["applications"][0]["args"].update(args)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, grpc_port


def outrider_command(name: str, **env):
    """Runs `outrider` with its own temp dir: `outrider stop` must stop this test's
    cluster and nothing else."""
    env = {**os.environ, "OUTRIDER_RAY_TEMP": str(Path("/tmp") / f"outrider-test-{name}-{os.getpid()}"), **env}

    def outrider(*args, timeout=600):
        return subprocess.run([OUTRIDER, *args], env=env, capture_output=True, text=True, timeout=timeout)

    return outrider


def test_serve_generate_bench_stop(tmp_path):
    path, grpc_port = local_config(tmp_path)
    outrider = outrider_command("main")
    ray_port, dashboard_port = free_port(), free_port()
    try:
        served = outrider("serve", "--detach", "--config", str(path), "--ray-port", str(ray_port),
                          "--dashboard-port", str(dashboard_port), "--max-new-tokens", "16")
        assert served.returncode == 0, served.stdout + served.stderr
        http_url = f"http://127.0.0.1:{yaml.safe_load(path.read_text())['http_options']['port']}/v1"
        assert f"serving gRPC on 127.0.0.1:{grpc_port} and the OpenAI-compatible API on {http_url}" in served.stdout
        with urllib.request.urlopen(f"{http_url}/models", timeout=30) as reply:  # what `curl` in the README does
            assert json.load(reply)["data"][0]["id"] == "outrider"
        assert "def parse_args(argv):" in served.stdout
        # The first request's summary; rounds decoded while a fresh worker read the prompt are told apart.
        assert re.search(r"\[16 tokens in [\d.]+ s; mean acceptance length [\d.]+; .*overlap [\d.]+"
                         r"(; \d+ of \d+ rounds decoded while the draft worker read the prompt)?\]", served.stdout)

        address = f"127.0.0.1:{grpc_port}"
        generated = outrider("generate", "def f(x):", "--server", address, "--max-new-tokens", "12", "--json",
                             "--compare")
        assert generated.returncode == 0, generated.stderr
        out = json.loads(generated.stdout)
        assert len(out["samples"][0]["token_ids"]) == 12 and out["prompt_token_ids"]
        assert out["comparison"]["identical"] is True

        medusa = outrider("generate", "def f(x):", "--server", address, "--max-new-tokens", "12", "--json",
                          "--compare", "--drafter", "medusa")
        assert medusa.returncode == 0, medusa.stderr
        out = json.loads(medusa.stdout)
        assert out["comparison"]["identical"] is True and out["stats"]["draft_shape"].startswith("tree")

        bad = outrider("generate", "x", "--server", address, "--max-new-tokens", "100000")
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr

        report = tmp_path / "bench.json"
        bench = outrider("bench", "--server", address, "--limit", "1", "--max-new-tokens", "12", "--gammas", "3",
                         "--drafters", "draft,medusa", "--json", str(report))
        assert bench.returncode == 0, bench.stderr
        result = json.loads(report.read_text())
        assert result["outputs_identical"] is True
        assert {"pipeline_hit_rate", "overlap", "round_breakdown_ms", "speedup_vs_ar", "speedup_vs_hf"} <= set(result)
        labels = {row["config"] for row in result["runs"]}
        assert {"target-only", "outrider-draft gamma=3", "outrider-draft-serial gamma=3", "hf-assisted gamma=3"} <= labels
        best = result["best_by_drafter"]
        assert set(best) == {"draft", "medusa"} and best["medusa"]["gamma_or_tree"].startswith("tree")
        assert all({"speedup_vs_ar", "mean_accepted_length", "gamma_or_tree"} <= set(v) for v in best.values())

        cancels = outrider("bench", "--server", address, "--cancels", "4", "--ray-address", f"127.0.0.1:{ray_port}",
                           "--json", str(tmp_path / "cancels.json"))
        assert cancels.returncode == 0, cancels.stdout + cancels.stderr
        assert json.loads((tmp_path / "cancels.json").read_text())["summary"]["cancels"]["freed_within_1s"] == 4

        fuzzed = outrider("fuzz", "--server", address, "--requests", "30", "--dashboard",
                          f"http://127.0.0.1:{dashboard_port}", "--json", str(tmp_path / "fuzz.json"))
        assert fuzzed.returncode == 0, fuzzed.stdout + fuzzed.stderr
        result = json.loads((tmp_path / "fuzz.json").read_text())
        assert (result["requests"], result["wrong_status"], result["replica_restarts"]) == (30, 0, 0)

        soaked = outrider("soak", "--server", address, "--streams", "2", "--minutes", "0.25", "--methods", "draft",
                          "--ray-address", f"127.0.0.1:{ray_port}", "--json", str(tmp_path / "soak.json"))
        assert soaked.returncode == 0, soaked.stdout + soaked.stderr
        result = json.loads((tmp_path / "soak.json").read_text())
        assert result["streams"] >= 2 and (result["lost"], result["corrupted"], result["hung"]) == (0, 0, 0)
        assert result["memory_growth_ratio"] is not None and not any(result["leftover"].values())
    finally:
        stopped = outrider("stop", timeout=120)
    assert stopped.returncode == 0 and "stopped the local Outrider cluster" in stopped.stdout
    assert outrider("stop", timeout=120).stdout.strip() == "no local Outrider cluster was running"


def test_serve_sizes_its_nodes_for_a_tensor_parallel_config(tmp_path):
    """The config a user makes by setting tensor_parallel_size: 2 in a copy of
    cluster/serve_config.yaml: the verifier node gets room for the replica and both
    ranks (3 CPUs; it had 1 and the deploy hung), and the stream is served."""
    path, _ = local_config(tmp_path, tensor_parallel_size=2)
    outrider = outrider_command("tp")
    try:
        served = outrider("serve", "--detach", "--config", str(path), "--ray-port", str(free_port()),
                          "--dashboard-port", str(free_port()), "--max-new-tokens", "8", "--timeout", "500")
        assert served.returncode == 0, served.stdout + served.stderr
        assert "verifier node 3 CPU" in served.stdout and "[8 tokens" in served.stdout
    finally:
        outrider("stop", timeout=120)


def test_a_config_this_machine_cannot_place_fails_fast_naming_what_is_missing(tmp_path):
    path, _ = local_config(tmp_path, device="cuda", tensor_parallel_size=2,
                           drafter={"num_replicas": 1, "num_cpus": 1, "num_gpus": 0.5,
                                    "resources": {"outrider_drafter": 1}})
    result = outrider_command("nogpu", CUDA_VISIBLE_DEVICES="")("serve", "--config", str(path), timeout=120)
    assert result.returncode == 2
    assert "cannot be placed here" in result.stderr and "2 on the verifier node" in result.stderr


def test_set_overrides_app_args_and_refuses_bad_ones(tmp_path, monkeypatch):
    from services.cli import local_cluster
    from services.cli.common import UsageError
    from services.cli.serve import parse_sets, with_overrides

    monkeypatch.setattr(local_cluster, "TEMP_DIR", tmp_path)
    path, _ = local_config(tmp_path)
    assert with_overrides(path, {}) == path
    copy = with_overrides(path, parse_sets(["fanout_policy=requested", "drafter.num_replicas=2", "default_fanout=4"]))
    args = yaml.safe_load(copy.read_text())["applications"][0]["args"]
    assert args["fanout_policy"] == "requested" and args["default_fanout"] == 4
    assert args["drafter"]["num_replicas"] == 2 and args["drafter"]["resources"]  # the rest of drafter kept
    for bad in (["fanout_policy=sometimes"], ["no_such_arg=1"], ["default_fanout"]):
        try:
            with_overrides(path, parse_sets(bad))
        except UsageError as err:
            assert "--set" in str(err)
        else:
            raise AssertionError(f"{bad} was accepted")
