"""The capacity planner: its arithmetic on a synthetic profile, which resource binds,
and the CLI's contract."""

import dataclasses
import json
import math

import pytest

from services.bench.capacity import Model, fit_pass, plan
from services.core.goodput import fit_line
from services.cli.main import main


def profile(a=0.020, b=0.0005, c=0.002, e=0.0002, alpha=0.8, hop=0.001, bytes_per_round=300.0, kv=4096.0, m=0.0):
    """What `outrider bench --profile` writes, from exact lines."""
    return {
        "prompt_tokens": 64, "prefill_s": 0.030, "alpha": alpha, "bytes_per_round": bytes_per_round,
        "transport_s_per_round": hop, "draft_kv_bytes_per_token": kv,
        "verify_pass": [{"batch": bt, "gamma": g, "positions": bt * (g + 1), "seconds": a + m * bt + b * bt * (g + 1)}
                        for bt in (1, 2, 4, 8, 16) for g in (0, 2, 4, 8)],
        "draft_step": [{"rows": r, "seconds": c + e * r} for r in (1, 2, 4, 8, 16)],
    }


def test_the_fits_recover_the_profile_lines():
    model = Model.from_profile(profile())
    assert model.verify == pytest.approx((0.020, 0.0, 0.0005)) and model.step == pytest.approx((0.002, 0.0002))
    assert fit_line([1, 1], [3, 5]) == (4, 0)  # one x: no slope
    # A cost per session on top of the cost per position is told apart from it.
    assert Model.from_profile(profile(m=0.001)).verify == pytest.approx((0.020, 0.001, 0.0005))


def test_a_term_that_fits_negative_is_dropped_not_kept():
    rows = [{"batch": bt, "positions": bt * (g + 1), "seconds": 0.001 * bt * (g + 1) - 0.0001 * bt}
            for bt in (1, 4, 16) for g in (0, 8)]
    a, m, b = fit_pass(rows)
    assert m == 0 and a >= 0 and b > 0


def served_profile(levels=((1, 0.030, 0.100), (16, 0.090, 0.600)), **kw):
    """A profile with served target-only levels: (streams, seconds a token, TTFT)."""
    return {**profile(**kw), "served": [{"streams": n, "token_s": t, "ttft_s": f} for n, t, f in levels]}


def test_a_served_profile_prices_what_serving_adds_to_each_round():
    model = Model.from_profile(served_profile())
    # At the levels it measured, a target-only round is what was measured...
    assert model.round_s(1, 0) == pytest.approx(0.030) and model.round_s(16, 0) == pytest.approx(0.090)
    assert model.first_token_s(1) == pytest.approx(0.100) and model.first_token_s(16) == pytest.approx(0.600)
    # ...and requests of O tokens take TTFT + (O - 1) rounds of one token.
    assert model.streams_tokens_per_s(16, False, output_tokens=128) == pytest.approx(16 * 128 / (0.600 + 127 * 0.090))
    # Serving's cost is added to speculative rounds too: every round pays it once.
    plain = Model.from_profile(profile())
    extra = model.round_s(4, 0) - plain.round_s(4, 0)
    assert extra > 0 and model.round_s(4, 6) - plain.round_s(4, 6) == pytest.approx(extra)
    # Without a served measurement nothing is added.
    assert plain.service == (0.0, 0.0) and plain.ttft is None


def test_a_served_speculative_profile_prices_what_the_round_model_misses():
    base = served_profile(c=0.002, e=0.0)
    model = Model.from_profile(base)
    out = 100

    def level(n, drafts, per_round, extra):
        # Served at n streams, each round took ``extra`` more than the model says.
        round_s = model.round_s(n, drafts) + extra
        return {"streams": n, "drafted_per_round": drafts, "tokens_per_round": per_round, "output_tokens": out,
                "tokens_per_s": n * out / (model.first_token_s(n) + (out - 1) / per_round * round_s)}

    spec = [level(2, 6.0, 4.0, 0.012), level(8, 3.0, 2.5, 0.018)]  # 10 ms + 1 ms a session
    calibrated = Model.from_profile({**base, "gamma": 8, "served_speculative": spec}, max_gamma=8)
    # Measured under a ceiling of 8: under another, the model chooses the gamma.
    assert not Model.from_profile({**base, "gamma": 8, "served_speculative": spec}, max_gamma=4).served_points
    assert calibrated.speculative_service == pytest.approx((0.010, 0.001))
    # It gives back what was measured where it was measured...
    for n, measured in zip((2, 8), spec):
        assert calibrated.streams_tokens_per_s(n, output_tokens=out) == pytest.approx(measured["tokens_per_s"])
    # ...drafts what the controller drafted, in between and past the ends...
    assert calibrated.operating_point(5) == pytest.approx((4.5, 3.25))
    assert calibrated.operating_point(16) == pytest.approx((3.0, 2.5)) and calibrated.operating_point(1)[0] == 6.0
    # ...and a drafting round of several sessions carries r(B); a round without drafts does not.
    for n in (2, 4, 16):
        assert calibrated.round_s(n, 4) - model.round_s(n, 4) == pytest.approx(0.010 + 0.001 * n)
        assert calibrated.round_s(n, 0) == pytest.approx(model.round_s(n, 0))
    assert calibrated.round_s(1, 4) == pytest.approx(model.round_s(1, 4))  # a lone session is never out of step
    # A level of one stream gives its operating point, not r.
    lone = {**level(1, 7.0, 5.0, 0.5), "streams": 1}
    assert Model.from_profile({**base, "gamma": 8, "served_speculative": [lone, *spec]}, max_gamma=8).speculative_service \
        == pytest.approx((0.010, 0.001))
    assert model.speculative_service == (0.0, 0.0) and model.operating_point(4) == (model.best_gamma(4),
                                                                                    model.tokens_per_round(model.best_gamma(4)))
    # Where drafting rounds cost that much more than plain ones, the model stops drafting.
    assert model.best_gamma(16) > 0 and dataclasses.replace(calibrated, speculative_service=(1.0, 0.0)).best_gamma(16) == 0


def test_tokens_a_round_follow_the_measured_depths_not_a_geometric_run():
    model = dataclasses.replace(Model.from_profile(profile(alpha=0.5)), accept=(0.9, 0.6, 0.7))
    assert model.tokens_per_round(0) == 1
    assert model.tokens_per_round(1) == pytest.approx(1.9)
    assert model.tokens_per_round(3) == pytest.approx(1 + 0.9 + 0.6 + 0.6)  # a share never rises with depth
    assert model.tokens_per_round(4) == pytest.approx(1 + 0.9 + 0.6 + 0.6 + 0.3)  # alpha past the deepest


def test_shared_hardware_exposes_the_measured_share_of_drafting():
    base = {**profile(c=0.002, e=0.0), "colocated_overlap": 0.5}
    apart, shared = Model.from_profile(base), Model.from_profile(base, shared=True)
    verify, draft = apart.pass_s(1, 4), 4 * 0.002  # the draft hides under the pass on separate nodes
    assert apart.round_s(1, 4) == pytest.approx(verify + 0.001)
    assert shared.round_s(1, 4) == pytest.approx(verify + 0.001 + 0.5 * draft)
    unmeasured = Model.from_profile(profile(c=0.002, e=0.0), shared=True)
    assert unmeasured.round_s(1, 4) == pytest.approx(verify + 0.001 + draft)


def test_a_pipeline_miss_waits_for_a_fresh_draft():
    base = {**profile(c=0.002, e=0.0), "pipeline_hit_rate": 0.25, "colocated_overlap": 0.5}
    apart, shared = Model.from_profile(base), Model.from_profile(base, shared=True)
    verify, draft = apart.pass_s(1, 4), 4 * 0.002  # shorter than the pass: a hit hides all of it
    assert apart.round_s(1, 4) == pytest.approx(verify + 0.001 + 0.75 * draft)
    # Sharing hardware, the worker drafts during every pass, hit or miss.
    assert shared.round_s(1, 4) == pytest.approx(verify + 0.001 + 0.75 * draft + 0.5 * draft)
    # Misses make deep drafts dearer, so the plan drafts less.
    assert Model.from_profile({**profile(c=0.004, e=0.0), "pipeline_hit_rate": 0.0}).best_gamma(1) \
        < Model.from_profile(profile(c=0.004, e=0.0)).best_gamma(1)


def test_the_clients_gamma_ceiling_bounds_the_plan():
    model = Model.from_profile(profile(), max_gamma=2)
    assert model.best_gamma(1) <= 2 < Model.from_profile(profile()).best_gamma(1)


def test_the_plan_meets_the_tpot_and_counts_replicas_from_throughput():
    model = Model.from_profile(profile())
    out = plan(model, rps=4.0, tpot_s=0.015, prompt_tokens=64, output_tokens=128)
    assert out["expected_tpot_s"] <= 0.015
    batch, gamma = out["batch_per_verifier"], out["gamma"]
    rate = batch * model.tokens_per_round(gamma) / model.round_s(batch, gamma)
    assert out["tokens_per_s_per_verifier"] == pytest.approx(rate)
    assert out["verifier_replicas"] == math.ceil(4.0 * 128 / rate + 4.0 * 0.030)
    assert gamma == model.best_gamma(batch) > 0
    # A looser TPOT packs more sessions on a replica: never more replicas.
    loose = plan(model, rps=4.0, tpot_s=0.05, prompt_tokens=64, output_tokens=128)
    assert loose["batch_per_verifier"] >= batch and loose["verifier_replicas"] <= out["verifier_replicas"]
    with pytest.raises(ValueError, match="out of reach"):
        plan(model, rps=1.0, tpot_s=0.001, prompt_tokens=64, output_tokens=128)


@pytest.mark.parametrize("changes, binds", [
    ({}, "target compute"),
    ({"link_bytes_s": 1e3}, "network"),
    ({"object_store_bytes": 1e5}, "object store"),
])
def test_which_resource_binds_first(changes, binds):
    out = plan(Model.from_profile(profile()), 4.0, 0.05, 64, 128, **changes)
    assert out["binds_first"] == binds


def test_slow_draft_steps_make_the_drafter_bind():
    # The planned fleet saturates first where its utilization is highest.
    out = plan(Model.from_profile(profile(c=0.003, e=0.001)), 7.0, 0.05, 64, 128)
    assert out["binds_first"] == "drafter compute" and out["draft_replicas"] >= 1
    assert out["utilization"]["drafter compute"] > out["utilization"]["target compute"]
    # Draft steps too slow to hide under a pass: no drafting, so no draft replicas.
    assert plan(Model.from_profile(profile(c=0.004, e=0.004)), 4.0, 0.05, 64, 128)["draft_replicas"] == 0


def test_speculation_pays_alone_and_stops_when_verification_is_compute_bound():
    model = Model.from_profile(profile())
    assert model.streams_tokens_per_s(1) > 1.5 * model.streams_tokens_per_s(1, speculative=False)
    heavy = Model.from_profile(profile(a=0.001, b=0.004))  # every position costs: no draft pays at batch 16
    assert heavy.best_gamma(16) == 0
    assert heavy.streams_tokens_per_s(16) == pytest.approx(heavy.streams_tokens_per_s(16, speculative=False))


def test_cli_plans_from_a_profile_and_refuses_a_bad_one(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile()))
    out = tmp_path / "plan.json"
    assert main(["capacity", "--profile", str(path), "--rps", "4", "--tpot-ms", "20", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["verifier_replicas"] >= 1 and result["binds_first"] in result["utilization"]
    assert "binds first" in capsys.readouterr().out
    assert main(["capacity", "--profile", str(path), "--streams", "1,4,16", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["by_concurrency"]) == {"1", "4", "16"}
    assert "serving's own cost per round is left out" in capsys.readouterr().out
    path.write_text(json.dumps(served_profile()))
    assert main(["capacity", "--profile", str(path), "--streams", "16", "--gamma", "4", "--drafter-placement",
                 "shared", "--output-tokens", "64", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["by_concurrency"]["16"]
    assert row["gamma"] <= 4 and row["target_only_tokens_per_s"] == pytest.approx(16 * 64 / (0.600 + 63 * 0.090))
    for bad in (["--gamma", "-1"], ["--drafter-placement", "nowhere"]):
        with pytest.raises(SystemExit) as exc:
            main(["capacity", "--profile", str(path), "--streams", "4"] + bad)
        assert exc.value.code == 2
    path.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main(["capacity", "--profile", str(path)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["capacity", "--profile", str(tmp_path / "missing.json")])
    assert exc.value.code == 2
