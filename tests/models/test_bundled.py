"""The committed bundled pair: within budget, loads like a hub model, and reproduces
the acceptance figure the README reports."""

import json

import pytest
from tiny_models import hf_greedy

from services.core.gamma import GammaSchedule
from services.models.build.evaluate import greedy_acceptance
from services.models.loading import BUNDLED_DIR, bundled_paths
from services.models.pair import load_pair, make_engine

REPORT = json.loads((BUNDLED_DIR / "build_report.json").read_text())
PROMPTS = [json.loads(line)["prompt"] for line in (BUNDLED_DIR / "heldout_prompts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pair():
    return load_pair(bundled_paths())


def test_pair_is_within_budget_and_shaped_as_specified(pair):
    def size(*folders):
        return sum((BUNDLED_DIR / folder / "model.safetensors").stat().st_size for folder in folders)

    assert size("target", "draft") <= 64 * 2**20  # the pair's budget
    assert size("target-medusa", "target-mtp") <= 24 * 2**20  # both head kinds together
    assert size("target-eagle") <= 16 * 2**20
    assert pair.target.config.model_type == pair.draft.config.model_type == "llama"
    assert sum(p.numel() for p in pair.target.parameters()) >= 15_000_000
    assert 1 <= pair.draft.config.num_hidden_layers <= 2
    assert pair.draft.config.hidden_size < pair.target.config.hidden_size
    stored = json.loads((BUNDLED_DIR / "target" / "config.json").read_text())
    assert stored["dtype"] == "bfloat16"


def test_bundled_greedy_is_token_identical_to_transformers(pair):
    engine = make_engine(pair, "draft", GammaSchedule(4))
    for text in PROMPTS[:2]:
        ids = pair.tokenizer(text)["input_ids"]
        assert engine.generate(ids, 48).token_ids == hf_greedy(pair.target, ids, 48, eos=pair.eos_token_id)


def test_reported_heldout_acceptance_reproduces():
    reported = next(r for r in REPORT["heldout_acceptance"] if r["drafter"] == "draft")
    measured = greedy_acceptance(bundled_paths(), PROMPTS, "draft", reported["gamma"], reported["max_new_tokens"])
    assert measured["acceptance_rate"] == pytest.approx(reported["acceptance_rate"], abs=0.02)
    assert measured["acceptance_rate"] >= 0.6
