"""cluster/serve_config.yaml is a valid Serve config for `serve deploy`, builds the app
through build_app, and asks for the resources `outrider serve` gives each node role."""

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from services.app.args import AppArgs
from services.cli.local_cluster import NODES
from services.gateway.deployment import GRPC_SERVICER_FUNCTIONS

CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "serve_config.yaml"


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_it_validates_as_a_serve_deploy_config():
    schema = ServeDeploySchema.model_validate(load())
    assert [app.name for app in schema.applications] == ["outrider"]


def test_it_builds_the_app_with_valid_args_and_registers_the_grpc_services():
    config = load()
    app = config["applications"][0]
    assert app["import_path"] == "services.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert config["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    from services.app import build_app

    build_app(app["args"])  # the graph builds (deployments are not started here)
    # Each deployment asks for a resource that exactly one local node role offers.
    for placement, role in ((args.gateway, "head"), (args.drafter, "drafter"), (args.verifier, "verifier")):
        assert set(placement.resources) == {NODES[role]}
    # ... and the local cluster sizes each node for what its deployments need.
    demand = args.node_demand()
    assert demand[NODES["drafter"]]["CPU"] == args.drafter.num_cpus * args.drafter.num_replicas
    assert demand[NODES["verifier"]]["CPU"] == args.verifier.num_cpus * args.verifier.num_replicas
