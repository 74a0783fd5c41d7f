"""Long contexts and sliding-window models: greedy speculative decoding stays
token-identical to transformers' own decoding, with rejections (rollbacks) at and past
the window edge; models whose layer state cannot be rolled back are refused at load."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM, Qwen3NextConfig

from services.core.engine import SpeculativeEngine
from services.core.errors import UnsupportedModel
from services.core.gamma import GammaSchedule
from services.core.kv import check_rollback
from services.core.proposers import DraftModelProposer
from services.core.target import TargetRunner
from services.core.verifier import TargetVerifier
from tiny_models import hf_greedy, noisy_copy

WINDOW = 64


def _sliding(family: str, context: int, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=context, sliding_window=WINDOW, eos_token_id=1)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    else:  # Gemma-2: sliding and full layers alternate
        model = Gemma2ForCausalLM(Gemma2Config(head_dim=8, **common))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def _engine(target, draft, gamma):
    return SpeculativeEngine(TargetVerifier(TargetRunner(target)), DraftModelProposer(draft), None,
                             target.config.max_position_embeddings, GammaSchedule(gamma))


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_rollbacks_past_the_window_are_exact(family):
    target = _sliding(family, 512)
    draft = noisy_copy(target, 1, 0.6)  # rejects often: rollbacks at every distance from the edge
    prompt = torch.randint(2, 512, (WINDOW * 3,), generator=torch.Generator().manual_seed(2)).tolist()
    result = _engine(target, draft, 5).generate(prompt, 120)
    assert result.stats.rejections > 10
    assert result.token_ids == hf_greedy(target, prompt, 120, eos=None)


def test_a_4096_token_context_is_exact():
    target = _sliding("mistral", 4096)
    draft = noisy_copy(target, 1, 0.4)
    prompt = torch.randint(2, 512, (4000,), generator=torch.Generator().manual_seed(3)).tolist()
    result = _engine(target, draft, 6).generate(prompt, 64)
    assert result.stats.rejections > 0
    assert result.token_ids == hf_greedy(target, prompt, 64, eos=None)


def test_layers_without_a_rollback_are_refused_at_load():
    with pytest.raises(UnsupportedModel, match="linear_attention"):
        check_rollback(Qwen3NextConfig(num_hidden_layers=4))
