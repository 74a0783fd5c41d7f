import pytest
import torch
from tiny_models import save_tiny_pair, tiny

from services.core.errors import InvalidRequest
from services.models.loading import ModelPaths, VocabularyMismatch, bundled_paths, max_context, resolve_paths
from services.models.pair import load_pair, make_engine, make_proposer
from services.core.gamma import GammaSchedule


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


def test_load_pair_from_folders_and_generate(pair_dirs):
    target, draft = pair_dirs
    pair = load_pair(ModelPaths(str(target), str(draft)))
    assert pair.target.dtype == torch.float32 and not pair.target.training
    ids = pair.tokenizer("def add(a, b):")["input_ids"]
    result = make_engine(pair, "draft", GammaSchedule(3)).generate(ids, 12)
    assert len(result.token_ids) <= 12 and result.stats.rounds > 0


def test_dtype_is_selectable(pair_dirs):
    target, draft = pair_dirs
    pair = load_pair(ModelPaths(str(target), str(draft)), dtype="bfloat16", with_draft=False)
    assert pair.target.dtype == torch.bfloat16 and pair.draft is None


def test_mismatched_draft_vocabulary_is_rejected(pair_dirs, tmp_path):
    target, _ = pair_dirs
    other = tiny("llama", seed=3, vocab=200)
    other.save_pretrained(tmp_path / "other")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(target).save_pretrained(tmp_path / "other")
    with pytest.raises(VocabularyMismatch, match="vocab"):
        load_pair(ModelPaths(str(target), str(tmp_path / "other")))


def test_unknown_drafter_is_rejected(pair_dirs):
    target, draft = pair_dirs
    pair = load_pair(ModelPaths(str(target), str(draft)), with_draft=False)
    with pytest.raises(InvalidRequest, match="unknown drafter"):
        make_proposer(pair, "spec")
    for kind in ("medusa", "mtp", "eagle"):
        with pytest.raises(InvalidRequest, match=f"the {kind} drafter needs its heads"):
            make_proposer(pair, kind)
    with pytest.raises(InvalidRequest, match="needs a draft model"):
        make_proposer(pair, "draft")


def test_paths_default_to_bundled_and_can_be_overridden():
    assert resolve_paths() == bundled_paths()
    assert resolve_paths(target="org/big").target == "org/big"
    assert resolve_paths(target="org/big").draft == bundled_paths().draft


def test_max_context_reads_llama_and_gpt2_configs():
    assert max_context(tiny("llama", 0)) == 256
    assert max_context(tiny("gpt2", 0)) == 256
