"""Outrider's attention (services/models/attention.py) is transformers' SDPA with the
K/V heads read per group, not copied per query head: the same logits, on the models
users load, through a masked batch (where transformers would repeat K and V)."""

import pytest
import torch

from services.models.attention import OUTRIDER_SDPA, use_outrider_attention
from services.models.loading import load_model, resolve_paths
from services.models.shapes import random_model


@pytest.mark.parametrize("shape", ["llama3", "qwen2", "mistral"])
def test_the_same_logits_as_transformers_sdpa_through_a_masked_batch(shape, monkeypatch):
    model = random_model(shape, layers=2, hidden=128)
    assert model.config._attn_implementation == OUTRIDER_SDPA
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 1000, (3, 24), generator=g)
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, :7] = 0  # a left-padded row: the pass carries a mask
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.inference_mode():
        ours = model(input_ids=ids, attention_mask=mask).logits
        assert calls and all(calls)  # every layer read the K/V heads per group
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_loaded_models_run_it_and_other_attentions_are_left_alone():
    paths = resolve_paths(None, None, None, None, None)
    assert load_model(paths.target).config._attn_implementation == OUTRIDER_SDPA
    model = random_model("llama3", layers=1, hidden=64)
    model.set_attn_implementation("eager")
    assert use_outrider_attention(model).config._attn_implementation == "eager"
