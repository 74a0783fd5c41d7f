"""Tiny random-init models of each supported family, built in milliseconds."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

torch.set_num_threads(1)

VOCAB = 96


def tiny(family: str, seed: int, layers: int = 2, hidden: int = 32):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common))
    else:
        cls, cfg = {
            "llama": (LlamaForCausalLM, LlamaConfig),
            "qwen2": (Qwen2ForCausalLM, Qwen2Config),
            "mistral": (MistralForCausalLM, MistralConfig),
        }[family]
        model = cls(
            cfg(
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                **common,
            )
        )
    # Sharpen the random logits so greedy output has structure (repeats) and the
    # distributions are not flat: more realistic acceptance patterns in tests.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="session")
def llama_pair():
    return tiny("llama", seed=0), tiny("llama", seed=1, layers=1)


FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]
