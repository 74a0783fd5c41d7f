"""An EAGLE-3 drafter loaded away from its target (a draft worker): the drafter and,
of the target, only its config and input embedding, read from the one checkpoint
shard that holds it. It equals the drafter loaded beside the whole target."""

import pytest
import torch
from tiny_models import random_eagle, tiny

from services.models.eagle import load_eagle
from services.models.eagle_away import embedding_name, load_eagle_away, read_embedding
from services.models.loading import load_config


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_the_drafter_away_equals_the_drafter_beside_the_target(tmp_path, shard):
    target = tiny("qwen2", seed=0, layers=4)
    target.save_pretrained(tmp_path / "target", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "target" / "model.safetensors.index.json").exists() == bool(shard)
    random_eagle(target, 1, torch.arange(0, 96, 3)).save(tmp_path / "eagle", torch.float32)
    beside = load_eagle(tmp_path / "eagle", target)
    away = load_eagle_away(str(tmp_path / "eagle"), str(tmp_path / "target"), dtype="float32")
    assert beside.state_dict().keys() == away.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(beside.state_dict().values(), away.state_dict().values()))
    assert torch.equal(away._embed[0].weight, target.get_input_embeddings().weight)
    assert torch.equal(away.draft_vocab, beside.draft_vocab) and away.layers == beside.layers


@pytest.mark.parametrize("family,name", [("llama", "model.embed_tokens.weight"), ("gpt2", "transformer.wte.weight")])
def test_the_embedding_is_found_by_its_name_in_each_family(tmp_path, family, name):
    target = tiny(family, seed=0)
    target.save_pretrained(tmp_path)
    assert embedding_name(load_config(str(tmp_path))) == name
    assert torch.equal(read_embedding(str(tmp_path), name), target.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="no input embedding"):
        read_embedding(str(tmp_path), "model.not_there.weight")
