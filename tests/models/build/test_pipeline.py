"""The build is deterministic, resumable, and produces a pair that loads like any hub model."""

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny

from services.models.build.corpus import is_heldout, split_corpus
from services.models.build.pipeline import BuildConfig, build_models
from services.models.build.train import TrainSpec, lm_loss, run_training
from services.models.loading import ModelPaths
from services.models.pair import load_pair

SOURCE = '''def f{i}(x, y):
    """Return the {i}th combination."""
    total = x * {i} + y
    for k in range({i}):
        total += k
    return total
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    for i in range(48):
        (root / f"mod{i}.py").write_text(SOURCE.format(i=i) * 3)
    assert any(is_heldout(f"mod{i}") for i in range(48))
    return root


def test_split_is_by_module_and_stable(corpus):
    a, b = split_corpus(corpus), split_corpus(corpus)
    assert a == b and a.heldout and a.train
    assert not {p.stem for p in a.train} & {p.stem for p in a.heldout}


def test_training_resumes_to_identical_weights(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 96, 5000).astype(np.uint16)
    spec = TrainSpec(steps=6, lr=1e-3, batch_size=2, seq_len=16, seed=0, ckpt_every_s=0.0, warmup=2)

    straight = tiny("llama", seed=0)
    run_training("straight", straight, lm_loss(straight), tokens, spec, tmp_path / "a.ckpt", "cpu")

    resumed = tiny("llama", seed=0)
    loss = lm_loss(resumed)
    calls = {"n": 0}

    def interrupted(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return loss(batch)

    with pytest.raises(KeyboardInterrupt):
        run_training("resumed", resumed, interrupted, tokens, spec, tmp_path / "b.ckpt", "cpu")
    fresh = tiny("llama", seed=5)  # a new process: different init, state comes from the checkpoint
    run_training("resumed", fresh, lm_loss(fresh), tokens, spec, tmp_path / "b.ckpt", "cpu")
    for (name, a), (_, b) in zip(straight.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name


def test_build_models_end_to_end(corpus, tmp_path):
    cfg = BuildConfig(out_dir=tmp_path / "out", work_dir=tmp_path / "work", corpus_root=corpus, vocab_size=300,
                      seq_len=32, batch_size=2, target_hidden=128, target_layers=2, target_intermediate=128,
                      draft_hidden=64, draft_intermediate=128,
                      target_steps=3, draft_steps=3, eval_prompts=2, eval_max_new_tokens=8)
    report = build_models(cfg)
    assert report["target_params"] > report["draft_params"] > 0
    assert np.isfinite(report["target_heldout_loss"])
    saved = json.loads((cfg.out_dir / "build_report.json").read_text())
    assert saved["heldout_acceptance"][0]["drafter"] == "draft"
    assert 0 <= saved["heldout_acceptance"][0]["acceptance_rate"] <= 1
    prompts = (cfg.out_dir / "heldout_prompts.jsonl").read_text().splitlines()
    assert len(prompts) == 2 and all(json.loads(p)["prompt"] for p in prompts)
    # Saved as safetensors in bf16 and loaded back through the generic hub path.
    assert (cfg.out_dir / "target" / "model.safetensors").exists()
    pair = load_pair(ModelPaths(str(cfg.out_dir / "target"), str(cfg.out_dir / "draft")), dtype="auto")
    assert pair.target.dtype == torch.bfloat16 and pair.draft.config.num_hidden_layers == 1
    assert pair.draft.config.hidden_size == 64 < pair.target.config.hidden_size
    # The same seed in a separate work folder rebuilds the same tokenizer and weights.
    from dataclasses import replace

    other = replace(cfg, out_dir=tmp_path / "out2", work_dir=tmp_path / "work2")
    build_models(other)
    assert (other.out_dir / "target" / "tokenizer.json").read_text() == (
        cfg.out_dir / "target" / "tokenizer.json").read_text()
    again = load_pair(ModelPaths(str(other.out_dir / "target"), str(other.out_dir / "draft")), dtype="auto")
    for model, twin in ((pair.target, again.target), (pair.draft, again.draft)):
        for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
            assert torch.equal(a, b)
