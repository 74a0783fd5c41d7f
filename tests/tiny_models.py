"""Tiny random-init models of each supported family, built in milliseconds."""

from __future__ import annotations

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

from services.models.shapes import noisy_draft

VOCAB = 96


def tiny(family: str, seed: int, layers: int = 2, hidden: int = 32, vocab: int = VOCAB):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=0)
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



FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]


def random_heads(target, seed: int, num_heads: int = 4):
    """Medusa heads for ``target`` with random weights (acceptance is poor, output exact)."""
    from services.models.heads import HeadsConfig, MedusaHeads

    text = target.config.get_text_config(decoder=True)
    heads = MedusaHeads(HeadsConfig(hidden_size=text.hidden_size, vocab_size=text.vocab_size, num_heads=num_heads),
                        target.get_output_embeddings())
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    return heads.eval()


def tiny_deepseek_v3(seed: int):
    """A tiny DeepSeek-V3 (MLA attention, MoE after the first layer): its MTP modules'
    blocks are MoE layers, as the real checkpoint's."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
                              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                              max_position_embeddings=256, n_shared_experts=1, bos_token_id=0, eos_token_id=1,
                              pad_token_id=0)
    return DeepseekV3ForCausalLM(config).eval()


def random_mtp(target, seed: int, num_modules: int = 2):
    """MTP modules for ``target`` (random init; acceptance is poor, output exact)."""
    from services.models.heads import HeadsConfig
    from services.models.mtp import MtpHeads

    text = target.config.get_text_config(decoder=True)
    torch.manual_seed(seed)
    config = HeadsConfig(kind="mtp", hidden_size=text.hidden_size, vocab_size=text.vocab_size, num_heads=num_modules)
    return MtpHeads(config, target).eval()


def random_eagle(target, seed: int, draft_vocab: torch.Tensor | None = None, layers=None, tree=None):
    """An EAGLE-3 drafter for ``target`` (random init; acceptance is poor, output exact)."""
    from services.models.eagle import new_drafter

    torch.manual_seed(seed)
    drafter = new_drafter(target, draft_vocab, layers)
    if tree is not None:
        drafter.tree = tree
    return drafter.eval()


def noisy_copy(model, seed: int, scale: float):
    """A draft that agrees with ``model`` often but not always: its weights plus noise."""
    return noisy_draft(model, seed, scale)


def plain_logits(model, tokens: list[int]) -> torch.Tensor:
    """logits [len(tokens), V] of one transformers forward over ``tokens`` with no cache:
    the reference every cached path (pooled, paged, batched, rolled back) must equal."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens], device=model.device)).logits[0]


_GREEDY_CACHE: dict = {}


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """transformers' own greedy decoding: the reference every proposer must reproduce."""
    key = (id(model), tuple(prompt), max_new_tokens, eos)
    # The entry keeps its model alive: a collected model's id could be reused by another.
    if key not in _GREEDY_CACHE or _GREEDY_CACHE[key][0] is not model:
        _GREEDY_CACHE[key] = (model, _hf_greedy(model, prompt, max_new_tokens, eos))
    return list(_GREEDY_CACHE[key][1])


def _hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def save_tiny_pair(root, family: str = "llama", vocab: int = 300):
    """A target/draft pair with a real byte-level BPE tokenizer, saved like hub models."""
    from pathlib import Path

    from services.models.build.tokenizer import train_tokenizer

    root = Path(root)
    corpus = root / "corpus.py"
    corpus.write_text("def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 50)
    tokenizer = train_tokenizer([corpus], vocab)
    target = tiny(family, seed=0, vocab=len(tokenizer))
    draft = noisy_copy(target, 1, 0.5)
    for name, model in (("target", target), ("draft", draft)):
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "target", root / "draft"


QWEN2_VOCAB = 151_936


def qwen2_real_shape(layers: int = 4):
    """A Qwen2-shaped target at real scale where it matters (151,936 tokens, GQA 8:2, a
    4k context), narrow elsewhere, its LM head scaled so that distributions are peaked
    as a trained model's are. Seeds torch's global generator (0) first."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    target = Qwen2ForCausalLM(Qwen2Config(vocab_size=QWEN2_VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                          max_position_embeddings=4096, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        target.get_output_embeddings().weight.mul_(8.0)
    return target
