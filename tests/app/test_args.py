"""AppArgs refuses what would deploy wrong, with a message that says why."""

import pytest
from pydantic import ValidationError

from services.app.args import DRAFTER_RESOURCE, VERIFIER_RESOURCE, AppArgs
from services.models.loading import bundled_paths


def test_defaults_place_each_role_on_its_node_group_and_use_the_bundled_pair():
    args = AppArgs()
    assert args.paths == bundled_paths()
    assert args.drafter.actor_options()["resources"] == {DRAFTER_RESOURCE: 1}
    assert args.verifier.actor_options()["resources"] == {VERIFIER_RESOURCE: 1}


@pytest.mark.parametrize("bad,reason", [
    ({"unknown_key": 1}, "extra"),
    ({"default_gamma": 0}, "default_gamma"),
    ({"default_method": "medusa"}, "default_method"),
    ({"device": "cuda"}, "num_gpus"),
    ({"device": "cuda", "verifier": {"num_gpus": 1}}, "drafter.num_gpus"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"verifier_rank": {"num_cpus": 0}}, "num_cpus"),
    ({"drafter": {"num_replicas": 0}}, "num_replicas"),
])
def test_bad_args_are_refused(bad, reason):
    with pytest.raises(ValidationError, match=reason):
        AppArgs.model_validate(bad)


def test_a_gpu_deployment_validates():
    AppArgs.model_validate({"device": "cuda", "verifier": {"num_gpus": 1}, "drafter": {"num_gpus": 0.25}})


def test_tensor_parallel_replicas_reserve_a_bundle_per_rank():
    assert AppArgs().verifier_bundles() is None
    cpu = AppArgs.model_validate({"tensor_parallel_size": 2})
    assert cpu.verifier_bundles() == [{"CPU": 1.0, VERIFIER_RESOURCE: 1}, {"CPU": 1.0}, {"CPU": 1.0}]
    gpu = AppArgs.model_validate({"device": "cuda", "tensor_parallel_size": 4, "drafter": {"num_gpus": 1}})
    # The replica itself needs no GPU: each of its ranks takes one.
    assert gpu.verifier_bundles()[1:] == [{"CPU": 1.0, "GPU": 1.0}] * 4


def test_node_demand_counts_replicas_and_tensor_parallel_ranks():
    args = AppArgs(tensor_parallel_size=2, verifier={"num_replicas": 2, "num_cpus": 1,
                                                     "resources": {VERIFIER_RESOURCE: 1}})
    demand = args.node_demand()
    assert demand[VERIFIER_RESOURCE] == {"CPU": 6.0, "GPU": 0.0}  # 2 x (replica + 2 ranks)
    assert demand[DRAFTER_RESOURCE] == {"CPU": 1.0, "GPU": 0.0}
    gpu = AppArgs(device="cuda", tensor_parallel_size=4, drafter={"num_gpus": 0.5, "num_cpus": 1,
                                                                  "resources": {DRAFTER_RESOURCE: 1}})
    assert gpu.node_demand()[VERIFIER_RESOURCE]["GPU"] == 4.0
    assert gpu.node_demand()[DRAFTER_RESOURCE]["GPU"] == 0.5


def test_head_methods_say_which_heads_are_served_and_why_not(tmp_path):
    from tiny_models import tiny

    served = AppArgs().head_methods()  # the bundled target ships both beside it
    assert served == {"medusa": None, "mtp": None, "eagle": None}
    assert "tensor-parallel" in AppArgs.model_validate({"tensor_parallel_size": 2}).head_methods()["mtp"]
    tiny("llama", seed=0).save_pretrained(tmp_path / "plain")
    why = AppArgs.model_validate({"target": str(tmp_path / "plain")}).head_methods()
    assert "build-heads --kind medusa" in why["medusa"] and "build-heads --kind mtp" in why["mtp"]
    assert "set eagle.path" in why["eagle"] and "build-heads --kind eagle" in why["eagle"]
    assert AppArgs.model_validate({"target": str(tmp_path / "plain"), "eagle": {"path": "org/e"}}).head_methods()["eagle"] is None
    assert AppArgs.model_validate({"eagle": {"placement": "drafter"}}).head_methods()["eagle"] is None
    with pytest.raises(ValidationError, match="placement"):
        AppArgs.model_validate({"eagle": {"placement": "gateway"}})
    with pytest.raises(ValidationError, match="feature_dtype"):
        AppArgs.model_validate({"eagle": {"placement": "drafter", "feature_dtype": "int8"}})
    assert AppArgs.model_validate({"target": str(tmp_path / "plain"), "mtp": "org/mtp"}).head_methods()["mtp"] is None


def test_admission_limits_follow_the_batch_size_unless_set():
    cfg = AppArgs.model_validate({"max_batch_size": 8, "max_sessions": 40})
    assert cfg.session_limits() == {"gateway": 40, "verifier": 32, "drafter": 16}
    verifier, gateway = cfg.serve_options("verifier"), cfg.serve_options("gateway")
    assert verifier["max_ongoing_requests"] == 32 and verifier["max_queued_requests"] == 32
    assert gateway["max_ongoing_requests"] == 80 and gateway["max_queued_requests"] == 40
    assert verifier["num_replicas"] == 1 and "autoscaling_config" not in verifier
    assert AppArgs.model_validate({"verifier_max_sessions": 5}).session_limits()["verifier"] == 5


def test_autoscaled_deployments_scale_on_their_own_load():
    scaling = {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 2, "downscale_delay_s": 5}
    cfg = AppArgs.model_validate({
        "max_batch_size": 4,
        "drafter": {"num_cpus": 1, "resources": {DRAFTER_RESOURCE: 1}, "autoscaling": scaling},
        "verifier": {"num_cpus": 1, "resources": {VERIFIER_RESOURCE: 1}, "autoscaling": {**scaling, "target": 2}},
    })
    drafter, verifier = cfg.serve_options("drafter"), cfg.serve_options("verifier")
    assert "num_replicas" not in drafter and "num_replicas" not in verifier
    # Draft workers on the sessions they report (Serve sees only instant endpoint calls).
    assert drafter["autoscaling_config"]["policy"] == {"policy_function": "services.app.autoscaling:draft_sessions_policy"}
    assert drafter["autoscaling_config"]["target_ongoing_requests"] == 4  # one full batched draft step
    assert verifier["autoscaling_config"]["target_ongoing_requests"] == 2 and "policy" not in verifier["autoscaling_config"]
    assert verifier["autoscaling_config"]["max_replicas"] == 3
    # Nodes are sized for the most replicas autoscaling may start.
    assert cfg.node_demand()[DRAFTER_RESOURCE]["CPU"] == 3
    with pytest.raises(ValidationError, match="max_replicas"):
        AppArgs.model_validate({"drafter": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
