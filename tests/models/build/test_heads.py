"""``outrider build-heads``: self-distilled Medusa heads for any target, resumable,
saved in Hub format with a tree tuned for the measured verify cost."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_pair, tiny

from services.models.build.heads import HeadsBuild, build_heads, choose_tree
from services.models.heads import HeadsConfig, MedusaHeads, load_heads
from services.models.loading import load_model

SOURCE = "def f{i}(x):\n    y = x * {i}\n    return y + {i}\n\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    corpus = root / "stdlib"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"mod{i}.py").write_text(SOURCE.format(i=i) * 4)
    target, _ = save_tiny_pair(root)
    cfg = HeadsBuild(target=str(target), out_dir=root / "target-medusa", work_dir=root / "work", num_heads=3,
                     sequences=8, heldout_sequences=4, prompt_len=8, gen_len=24, gen_batch=4, steps=6, positions=32,
                     max_tree_nodes=12, corpus_root=corpus, ckpt_every_s=0.0, eval_prompts=2, eval_max_new_tokens=12)
    return cfg, build_heads(cfg)


@pytest.fixture(scope="module")
def built_mtp(built):
    """MTP modules for the same target, from the same work folder's continuations."""
    cfg, _ = built
    mtp = dataclasses.replace(cfg, kind="mtp", out_dir=cfg.out_dir.with_name("target-mtp"), num_heads=1, depths=2,
                              window=16, lr=1e-3, draft_vocab=100)
    return mtp, build_heads(mtp)


@pytest.fixture(scope="module")
def built_eagle(built):
    """An EAGLE-3 drafter for the same target, from the same work folder's continuations."""
    cfg, _ = built
    eagle = dataclasses.replace(cfg, kind="eagle", out_dir=cfg.out_dir.with_name("target-eagle"), depths=3,
                                window=12, lr=1e-3, draft_vocab=100, eagle_tree="3,2,4")
    return eagle, build_heads(eagle)


def test_heads_are_saved_in_hub_format_and_load_by_path(built):
    cfg, report = built
    target = load_model(cfg.target)
    heads = load_heads(cfg.out_dir, target)
    config = json.loads((cfg.out_dir / "config.json").read_text())
    assert config["kind"] == "medusa" and config["num_heads"] == 3 and config["tree_choices"] == report["tree_choices"]
    tree = heads.config.tree()
    assert 1 <= len(tree.shape) <= 12 and tree.shape.max_depth <= 3
    assert all(t.dtype == torch.bfloat16 for t in load_file(cfg.out_dir / "model.safetensors").values())
    assert heads(torch.zeros(5, config["hidden_size"])).shape == (5, 3, config["vocab_size"])
    assert len(report["heldout_acceptance_per_head_rank"]) == 3 and report["verify_cost_vs_one_token"]["1"] >= 1.0


def test_a_second_run_resumes_from_the_work_folder(built):
    cfg, report = built
    again = build_heads(cfg)  # every stage's result is there: nothing is recomputed
    assert again["tree_choices"] == report["tree_choices"]
    assert again["heldout_acceptance_per_head_rank"] == report["heldout_acceptance_per_head_rank"]


def test_heads_for_another_target_are_refused(built):
    cfg, _ = built
    with pytest.raises(ValueError, match="do not fit"):
        load_heads(cfg.out_dir, tiny("llama", seed=0, hidden=48))


def test_mtp_modules_build_resume_and_draft_exactly(built_mtp):
    cfg, report = built_mtp
    target = load_model(cfg.target)
    mtp = load_heads(cfg.out_dir, target, "mtp")
    config = json.loads((cfg.out_dir / "config.json").read_text())
    assert config["kind"] == "mtp" and config["num_heads"] == 1 and config["tree_choices"] == report["tree_choices"]
    assert mtp.config.tree().shape.max_depth <= 2
    saved = load_file(cfg.out_dir / "model.safetensors")
    assert saved.pop("draft_vocab").dtype == torch.int64 and all(t.dtype == torch.bfloat16 for t in saved.values())
    assert len(report["draft_cost_vs_one_token_per_depth"]) == 2 and len(report["heldout_acceptance_per_head_rank"]) == 2
    assert report["draft_vocab_size"] == 100 == len(mtp.draft_vocab) and 0 < report["heldout_tokens_in_draft_vocab"] <= 1
    held = report["heldout_acceptance"]
    assert held["drafter"] == "mtp" and held["prompts"] == 2 and held["mean_acceptance_length"] >= 1
    assert build_heads(cfg)["tree_choices"] == report["tree_choices"]  # resumed: the same tree


def test_an_eagle_drafter_builds_in_the_published_layout_resumes_and_drafts(built_eagle):
    cfg, report = built_eagle
    target = load_model(cfg.target)
    drafter = load_heads(cfg.out_dir, target, "eagle")
    config = json.loads((cfg.out_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 100
    assert config["outrider"] == {"depth": 3, "top_k": 2, "nodes": 4} == report["tree"]
    saved = load_file(cfg.out_dir / "model.safetensors")
    assert {"fc.weight", "midlayer.hidden_norm.weight", "lm_head.weight", "d2t", "t2d"} <= set(saved)
    assert saved["lm_head.weight"].shape == (100, 32) and saved["lm_head.weight"].dtype == torch.bfloat16
    assert int(saved["t2d"].sum()) == 100 and len(set(drafter.draft_vocab.tolist())) == 100
    assert len(report["heldout_top1_acceptance_per_step"]) == 3 and report["feature_layers"] == list(drafter.layers)
    held = report["heldout_acceptance"]
    assert held["drafter"] == "eagle" and held["prompts"] == 2 and held["mean_acceptance_length"] >= 1
    assert held["draft_shape"] == "eagle4:d3k2"
    again = build_heads(cfg)  # resumed: the trained weights are in the work folder
    assert again["heldout_acceptance_per_step_rank"] == report["heldout_acceptance_per_step_rank"]


def test_the_tree_grows_by_likeliest_path_and_stops_where_cost_outweighs():
    # Ranks of the truth among 2 heads' candidates at 10 positions (16 = not in the top 16).
    ranks = np.array([[0, 0]] * 4 + [[0, 1]] * 2 + [[1, 0]] * 2 + [[0, 16]] + [[2, 3]])
    free = np.ones(40)  # verifying more nodes costs nothing: take every path that is ever right
    choices, expected = choose_tree(ranks, free, 39)
    assert choices == ((0,), (0, 0), (1,), (0, 1), (1, 0), (2,), (2, 3))
    assert expected == pytest.approx((7 + 4 + 2 + 2 + 2 + 1 + 1) / 10)  # counted, not multiplied out
    steep = 1 + np.arange(40) * 0.5  # each node costs half a pass: only the best path pays
    choices, expected = choose_tree(ranks, steep, 39)
    assert choices == ((0,),) and expected == pytest.approx(0.7)
    # Drafting that costs a pass per depth (MTP) keeps the tree shallow.
    choices, _ = choose_tree(ranks, free, 39, draft_cost=np.array([0.0, 0.1, 5.0]))
    assert choices == ((0,), (1,), (2,))


def test_a_fresh_head_starts_as_the_target_lm_head():
    target = tiny("llama", seed=0)
    heads = MedusaHeads(HeadsConfig(hidden_size=32, vocab_size=96, num_heads=2), target.get_output_embeddings())
    h = torch.randn(4, 32)
    torch.testing.assert_close(heads(h), target.get_output_embeddings()(h)[:, None].expand(4, 2, 96))
    assert not any(p is target.get_output_embeddings().weight for p in heads.parameters())  # shared, not owned


def test_the_report_says_what_a_user_gets_in_process(built):
    _, report = built
    held = report["heldout_acceptance"]
    assert held["drafter"] == "medusa" and held["prompts"] == 2 and held["draft_shape"].startswith("tree")
    assert held["mean_acceptance_length"] >= 1 and len(held["acceptance_per_position"]) <= 3  # one position per head
