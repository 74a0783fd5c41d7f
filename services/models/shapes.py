"""Random-init model pairs with the shapes users serve: real vocabularies (Llama-3's
128,256, Qwen2.5's 151,936), GQA head layouts, long position ranges, sliding windows.
Made in seconds; the bundled pair's 8k vocabulary and short prompts hide what only
shows at this scale (message sizes, full-vocabulary passes, long-context KV).

Width and depth are scaled down so that a CPU runs them; what scales with the
vocabulary and the context (LM head, q on the wire, KV per position and head layout)
is real. Logits are sharpened as a trained model's are, so that distributions are
peaked rather than flat; the draft is the target plus noise, so it agrees often but
not always.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from .attention import use_outrider_attention


@dataclass(frozen=True)
class Shape:
    family: str
    vocab: int
    heads: int
    kv_heads: int
    context: int
    sliding_window: int | None = None


SHAPES = {
    "llama3": Shape("llama", 128_256, 8, 2, 8192),  # Llama-3: 128k vocabulary, GQA 4:1, rope 500k
    "qwen2": Shape("qwen2", 151_936, 8, 2, 8192),  # Qwen2.5: 152k vocabulary, QKV bias, GQA
    "mistral": Shape("mistral", 32_768, 8, 2, 8192, sliding_window=1024),  # sliding-window attention
}
_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def random_model(shape: str, layers: int = 2, hidden: int = 256, seed: int = 0, sharpen: float = 20.0,
                 vocab: int | None = None):
    """``vocab``: another vocabulary size than the shape's."""
    spec = SHAPES[shape] if vocab is None else replace(SHAPES[shape], vocab=vocab)
    config_cls, model_cls = _CLASSES[spec.family]
    extra = {"rope_theta": 500_000.0} if shape == "llama3" else {}
    if spec.sliding_window:
        extra["sliding_window"] = spec.sliding_window
    config = config_cls(
        vocab_size=spec.vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.context,
        bos_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False, **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return use_outrider_attention(model).eval()


def noisy_draft(target, seed: int = 1, scale: float = 0.3):
    """The target plus relative noise on every weight: a draft of the same shape."""
    draft = type(target)(target.config)
    draft.load_state_dict(target.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std().clamp_min(1e-3))
    return draft.eval()


def random_pair(shape: str, layers: int = 2, hidden: int = 256, seed: int = 0):
    target = random_model(shape, layers, hidden, seed)
    return target, noisy_draft(target, seed + 1)


def save_random_pair(root: str | Path, shape: str, tokenizer_dir: str | Path | None = None, **kwargs) -> tuple[Path, Path]:
    """Save a pair as Hub-format folders (``target/``, ``draft/``) that ``outrider
    serve --config`` can point at. ``tokenizer_dir``: a tokenizer to save beside each
    (any; the ids are random). Without one, serve with token-id prompts."""
    root = Path(root)
    target, draft = random_pair(shape, **kwargs)
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / name)
    return root / "target", root / "draft"
