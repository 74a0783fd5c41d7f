"""The CLI contract scripts rely on: JSON shapes, streaming, and exit code 2 on bad input."""

import json
import subprocess
import sys

import pytest
from tiny_models import random_eagle, random_heads, random_mtp, save_tiny_pair

from services.cli.main import main
from services.core.sampling import sample_seed
from services.models.loading import bundled_paths, load_model


@pytest.fixture(scope="module")
def pair_args(tmp_path_factory):
    """A tiny pair with Medusa heads, MTP modules and an EAGLE drafter beside its target,
    where build-heads puts them."""
    target, draft = save_tiny_pair(tmp_path_factory.mktemp("pair"))
    model = load_model(str(target))
    random_heads(model, seed=1, num_heads=3).save(target.with_name("target-medusa"))
    random_mtp(model, seed=1).save(target.with_name("target-mtp"))
    random_eagle(model, seed=1).save(target.with_name("target-eagle"))
    return ["--target", str(target), "--draft", str(draft), "--threads", "1"]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_models_json_defaults_to_bundled_and_honours_overrides(capsys):
    bundled = bundled_paths()
    assert run_json(capsys, ["models", "--json"]) == {"target": bundled.target, "draft": bundled.draft,
                                                      "medusa": bundled.medusa, "mtp": bundled.mtp,
                                                      "eagle": bundled.eagle}
    assert run_json(capsys, ["models", "--json", "--target", "t", "--draft", "d"]) == {
        "target": "t", "draft": "d", "medusa": None, "mtp": None, "eagle": None}
    assert run_json(capsys, ["models", "--json", "--medusa", "m", "--mtp", "p", "--eagle", "e"])["eagle"] == "e"


@pytest.mark.parametrize("drafter", ["draft", "ngram", "medusa", "mtp", "eagle", "none"])
def test_generate_json_shape_and_greedy_agreement(capsys, pair_args, drafter):
    out = run_json(capsys, ["generate", "def add(a, b):", "--json", "--max-new-tokens", "9", "--drafter", drafter]
                   + pair_args)
    assert set(out) == {"prompt_token_ids", "samples", "stats"}
    assert len(out["samples"]) == 1 and len(out["samples"][0]["token_ids"]) <= 9
    assert {"rounds", "drafted", "accepted", "acceptance_per_position", "mean_acceptance_length",
            "draft_time_s", "verify_time_s"} <= set(out["stats"])
    baseline = run_json(capsys, ["generate", "def add(a, b):", "--json", "--max-new-tokens", "9", "--drafter", "none"]
                        + pair_args)
    assert out["samples"][0]["token_ids"] == baseline["samples"][0]["token_ids"]


def test_generate_n_samples_are_seeded(capsys, pair_args):
    argv = ["generate", "print(", "--json", "--n", "3", "--temperature", "1.0", "--seed", "5",
            "--max-new-tokens", "12"] + pair_args
    first, second = run_json(capsys, argv), run_json(capsys, argv)
    assert len(first["samples"]) == 3 and first["samples"] == [
        {**s, "stats": t["stats"]} for s, t in zip(second["samples"], first["samples"])
    ]
    assert len({tuple(s["token_ids"]) for s in first["samples"]}) > 1
    # Sample i is the run alone with sample i's seed, as the server derives it for n.
    alone = run_json(capsys, argv[:3] + ["--temperature", "1.0", "--seed", str(sample_seed(5, 2)),
                                         "--max-new-tokens", "12"] + pair_args)
    assert alone["samples"][0]["token_ids"] == first["samples"][2]["token_ids"]


def test_generate_stops_logprobs_and_penalties_exactly_as_target_only(capsys, pair_args):
    base = ["generate", "def add(a, b):", "--json", "--max-new-tokens", "16", "--repetition-penalty", "1.3",
            "--logprobs", "2"] + pair_args
    plain = run_json(capsys, base + ["--drafter", "none"])["samples"][0]
    assert len(plain["logprobs"]) == len(plain["token_ids"]) and all(len(t) == 2 for t in plain["top_logprobs"])
    stop = plain["text"][3:5]
    assert len(stop) == 2, plain["text"]
    for drafter in ("draft", "none"):
        sample = run_json(capsys, base + ["--drafter", drafter, "--stop", stop])["samples"][0]
        assert sample["finish_reason"] == "stop" and sample["text"] == plain["text"][: plain["text"].index(stop)]
        n = len(sample["token_ids"])
        assert sample["token_ids"] == plain["token_ids"][:n]
        assert sample["logprobs"] == pytest.approx(plain["logprobs"][:n], abs=1e-5)


def test_generate_streams_text(capsys, pair_args):
    assert main(["generate", "def add(a, b):", "--max-new-tokens", "8"] + pair_args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def add(a, b):") and len(captured.out.strip()) > len("def add(a, b):")
    assert "tok/s" in captured.err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--max-new-tokens", "100000"], "context"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-k", "-2"], "top_k"),
        (["--drafter", "spec"], "unknown drafter"),
        (["--gamma", "-1"], "gamma"),
        (["--logprobs", "21"], "--logprobs"),
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--presence-penalty", "3"], "presence_penalty"),
        (["--stop", ""], "--stop"),
    ],
)
def test_generate_bad_input_exits_2(capsys, pair_args, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "x = 1"] + extra + pair_args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_empty_prompt_and_vocab_mismatch_exit_2(capsys, pair_args, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["generate", ""] + pair_args)
    assert exc.value.code == 2 and "empty" in capsys.readouterr().err
    from tiny_models import tiny
    from transformers import AutoTokenizer

    target_dir = pair_args[1]
    tiny("llama", seed=4, vocab=500).save_pretrained(tmp_path / "odd")
    AutoTokenizer.from_pretrained(target_dir).save_pretrained(tmp_path / "odd")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "x", "--target", target_dir, "--draft", str(tmp_path / "odd")])
    assert exc.value.code == 2 and "does not match" in capsys.readouterr().err


def test_bench_writes_required_keys_and_plot(tmp_path, pair_args, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def add(a, b):", "print(add("]))
    out = tmp_path / "bench.json"
    assert main(["bench", "--prompts", str(prompts), "--max-new-tokens", "6", "--gammas", "1,3", "--repeat", "2",
                 "--json", str(out)] + pair_args) == 0
    result = json.loads(out.read_text())
    for key in ("ar_tokens_per_s", "sd_tokens_per_s", "hf_assisted_tokens_per_s", "speedup_vs_ar",
                "speedup_vs_hf", "acceptance_rate", "mean_accepted_length", "theoretical_speedup"):
        assert isinstance(result[key], float), key
    assert result["outputs_identical"] is True
    # Ratios come from one pass (the median one); every pass's ratio is listed.
    assert result["passes"] == 2 and len(result["speedup_vs_ar_per_pass"]) == 2
    assert result["speedup_vs_ar"] in result["speedup_vs_ar_per_pass"]
    assert {r["method"] for r in result["runs"]} == {
        "target-only", "outrider-draft", "outrider-ngram", "hf-target-only", "hf-assisted"}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "tok/s" in capsys.readouterr().out


def test_bench_measures_tree_drafters_once_each_and_reports_the_best_per_drafter(tmp_path, pair_args):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n")
    out = tmp_path / "bench.json"
    assert main(["bench", "--prompts", str(prompts), "--max-new-tokens", "6", "--gammas", "1,2", "--no-hf",
                 "--drafters", "draft,medusa,mtp,eagle", "--json", str(out)] + pair_args) == 0
    result = json.loads(out.read_text())
    labels = [r["config"] for r in result["runs"]]
    assert labels == ["target-only", "outrider-draft gamma=1", "outrider-draft gamma=2", "outrider-medusa tree9:4-3-2",
                      "outrider-mtp tree5:2-2-1", "outrider-eagle eagle8:d5k2"]
    best = result["best_by_drafter"]
    assert set(best) == {"draft", "medusa", "mtp", "eagle"} and best["medusa"]["gamma_or_tree"] == "tree9:4-3-2"
    assert best["mtp"]["gamma_or_tree"] == "tree5:2-2-1" and best["eagle"]["gamma_or_tree"] == "eagle8:d5k2"
    assert best["draft"]["gamma_or_tree"] in ("1", "2") and result["outputs_identical"] is True
    assert all(isinstance(v["speedup_vs_ar"], float) and v["mean_accepted_length"] >= 1 for v in best.values())
    assert result["verify_cost"]["tree16_vs_chain5"] > 0


def test_bench_concurrency_list_reports_each_level_with_ttft_percentiles_and_a_plot(tmp_path, pair_args):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def add(a, b):", "print(add("]))
    out = tmp_path / "bench.json"
    assert main(["bench", "--prompts", str(prompts), "--max-new-tokens", "6", "--gammas", "3", "--drafters", "draft",
                 "--concurrency", "1,3", "--repeat", "2", "--json", str(out)] + pair_args) == 0
    result = json.loads(out.read_text())
    assert set(result["by_concurrency"]) == {"1", "3"}
    for level in result["by_concurrency"].values():
        assert level["speculative_vs_target_only"] > 0 and len(level["per_pass"]) == 2
        assert level["speculative_vs_target_only"] in level["per_pass"]
        assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"]
        assert level["config"].startswith("outrider-draft x")
    # A level runs max(streams, prompts) requests: 3 streams, 3 requests, one TTFT each.
    runs = {r["config"]: r for r in result["runs"]}
    assert result["outputs_identical"] is True and "target-only x3 batched" in runs
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--prompts", str(prompts), "--concurrency", "1,0"] + pair_args)
    assert exc.value.code == 2


def test_bench_concurrency_samples_seeded_requests_identically_and_unseeded_without_a_comparison(tmp_path, pair_args):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def add(a, b):", "print(add("]))
    out = tmp_path / "bench.json"
    base = ["bench", "--prompts", str(prompts), "--max-new-tokens", "6", "--gammas", "3", "--drafters", "draft",
            "--concurrency", "2", "--json", str(out)] + pair_args
    # Seeded (coupled) sampling: speculative output is target-only's, token for token.
    assert main(base + ["--temperature", "1.0"]) == 0
    result = json.loads(out.read_text())
    assert result["outputs_identical"] is True and result["meta"]["temperature"] == 1.0 and result["meta"]["seeded"]
    assert main(base + ["--temperature", "1.0", "--unseeded"]) == 0
    result = json.loads(out.read_text())
    assert result["outputs_identical"] is None and result["meta"]["seeded"] is False
    for bad in (["--temperature", "-1"], ["--unseeded"], ["--temperature", "nan"]):
        with pytest.raises(SystemExit) as exc:
            main(base + bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--prompts", str(prompts), "--temperature", "0.7"] + pair_args)  # no --concurrency
    assert exc.value.code == 2


def test_bench_profile_feeds_the_capacity_planner(tmp_path, pair_args):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def add(a, b):", "print(add("]))
    profile = tmp_path / "profile.json"
    assert main(["bench", "--prompts", str(prompts), "--max-new-tokens", "8", "--profile", str(profile)] + pair_args) == 0
    measured = json.loads(profile.read_text())
    assert {(r["batch"], r["gamma"]) for r in measured["verify_pass"]} >= {(1, 0), (16, 8)}
    assert all(r["seconds"] > 0 for r in measured["verify_pass"] + measured["draft_step"])
    assert 0 <= measured["alpha"] <= 1 and measured["bytes_per_round"] > 0 and measured["draft_kv_bytes_per_token"] > 0
    depths = measured["acceptance_per_position"]
    assert depths and all(0 <= p <= 1 for p in depths) and 0 <= measured["colocated_overlap"] <= 1
    assert "served" not in measured  # no --server: nothing served was measured
    plan = tmp_path / "plan.json"
    assert main(["capacity", "--profile", str(profile), "--rps", "1", "--tpot-ms", "1000", "--json", str(plan)]) == 0
    assert json.loads(plan.read_text())["verifier_replicas"] >= 1


@pytest.mark.parametrize("content,message", [("", "no prompts"), ("{\"text\": 1}\n", "prompt"),
                                             ("not json\n", "prompt")])
def test_bench_bad_prompts_exit_2(tmp_path, pair_args, capsys, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--prompts", str(prompts)] + pair_args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_console_script_exit_code():
    proc = subprocess.run([sys.executable, "-m", "services.cli.main", "generate", "x", "--drafter", "nope",
                           "--target", "/nonexistent"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown drafter" in proc.stderr


def test_generate_compare_reports_speedup_against_target_only(capsys, pair_args):
    out = run_json(capsys, ["generate", "def add(a, b):", "--json", "--compare", "--max-new-tokens", "10"]
                   + pair_args)
    comparison = out["comparison"]
    assert comparison["identical"] is True  # greedy: token for token
    assert comparison["target_only_tokens_per_s"] > 0
    assert comparison["speedup"] == pytest.approx(out["stats"]["tokens_per_s"] / comparison["target_only_tokens_per_s"])


def test_medusa_trees_are_chosen_per_call_and_bad_ones_refused(capsys, pair_args, tmp_path):
    out = run_json(capsys, ["generate", "def add(a, b):", "--json", "--max-new-tokens", "9", "--drafter", "medusa",
                            "--tree", "0;1;0.0"] + pair_args)
    assert out["stats"]["draft_shape"] == "tree3:2-1"
    for tree, reason in [("0;0.0;0.0.0;0.0.0.0", "exceeds the 3 Medusa heads"), ("1.1", "parent paths")]:
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "x", "--drafter", "medusa", "--tree", tree] + pair_args)
        assert exit_.value.code == 2 and reason in capsys.readouterr().err
    out = run_json(capsys, ["generate", "def add(a, b):", "--json", "--max-new-tokens", "9", "--drafter", "mtp",
                            "--tree", "0;0.0;0.0.0;0.0.0.0;1"] + pair_args)
    assert out["stats"]["draft_shape"] == "tree5:2-1-1-1"  # deeper than the 2 modules: the last is reused
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--drafter", "mtp", "--tree", ";".join(".".join(["0"] * d) for d in range(1, 10))]
             + pair_args)
    assert exit_.value.code == 2 and "exceeds 8 MTP depths" in capsys.readouterr().err
    out = run_json(capsys, ["generate", "def add(a, b):", "--json", "--max-new-tokens", "9", "--drafter", "eagle",
                            "--eagle-tree", "3,2,4", "--tree", "0;1"] + pair_args)  # --tree is Medusa's and MTP's
    assert out["stats"]["draft_shape"] == "eagle4:d3k2"
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--drafter", "eagle", "--eagle-tree", "3,2"] + pair_args)
    assert exit_.value.code == 2 and "depth,top_k,nodes" in capsys.readouterr().err
    target, draft = save_tiny_pair(tmp_path)  # no heads beside this one
    for kind in ("medusa", "mtp", "eagle"):
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "x", "--drafter", kind, "--target", str(target), "--draft", str(draft)])
        assert exit_.value.code == 2 and f"build-heads --kind {kind}" in capsys.readouterr().err
