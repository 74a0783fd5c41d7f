"""EAGLE-3 draft layer on a frozen target, in the layout the community publishes.

The drafter fuses the target's states entering three decoder layers (low, middle,
high: EAGLE-3's ``(2, N // 2, N - 3)`` by default) with ``fc`` (3H -> H), and runs one
Llama decoder layer ("midlayer") whose attention reads [norm(embedding of the next
token); norm(feature)] (2H wide) and whose residual is the feature. Its output is the
next position's feature (drafting feeds it back in place of the fused target states)
and, through ``norm`` and its own ``lm_head`` over a draft vocabulary, the next token:

    g_j = Layer(emb(x_{j+1}), f_j),  f_j = fc([l_j; m_j; h_j]) (the target's) or g_{j-1} (its own)
    p(x_{j+2}) = softmax(lm_head(norm(g_j)))  over the draft vocabulary; token = d + d2t[d]

Layout (yuhuili/EAGLE3-*, SpecForge, vLLM, SGLang): ``config.json`` a Llama config
with ``draft_vocab_size`` (and ``eagle_config.eagle_aux_hidden_state_layer_ids``,
``target_hidden_size`` where given); tensors ``fc.weight``, ``midlayer.*``,
``norm.weight``, ``lm_head.weight`` [K, H], ``d2t`` [K] (target id minus draft id) and
``t2d`` [V] bool. ``embed_tokens.weight`` when shipped (else the target's). Outrider
saves the same layout, with its tuned tree under ``outrider``, so one loader serves both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from ..core.eagle_proposer import EagleTree
from ..core.target import layer_features
from .heads import CONFIG, WEIGHTS, OwnKV
from .lean import attention, gated_mlp

ARCHITECTURE = "LlamaForCausalLMEagle3"


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, middle and high layers; spread evenly where a shallow target
    would repeat one (6 layers: (2, 3, 3) -> (1, 3, 5))."""
    low, mid, high = 2, num_layers // 2, num_layers - 3
    return (low, mid, high) if low < mid < high else (1, num_layers // 2, num_layers - 1)


def is_eagle3(config: dict) -> bool:
    return "draft_vocab_size" in config or any("Eagle3" in a for a in config.get("architectures", ()))


def eagle_config(target, draft_vocab_size: int, layers=None, tree: EagleTree | None = None) -> LlamaConfig:
    """A drafter config for ``target``: its width, heads and rope, one layer."""
    text = target.config.get_text_config(decoder=True)
    layers = tuple(layers or default_feature_layers(text.num_hidden_layers))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    config = LlamaConfig(
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size, num_hidden_layers=1,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        head_dim=head_dim, rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6), vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings, rope_parameters=dict(text.rope_parameters),
        tie_word_embeddings=False, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        pad_token_id=getattr(text, "pad_token_id", None))
    config.architectures = [ARCHITECTURE]
    config.draft_vocab_size = draft_vocab_size
    config.eagle_config = {"eagle_aux_hidden_state_layer_ids": list(layers)}
    config.outrider = (tree or EagleTree()).as_dict()
    return config


def fused(fc: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """EAGLE-3's fusion of the target's layer states [..., 3H] -> [..., H]; a function of
    fc alone, so that a verifier relaying features holds fc and not the whole drafter."""
    return fc(features.to(fc.weight.dtype))


class EagleLayer(nn.Module):
    """The midlayer: a Llama decoder layer whose q/k/v read [embedding; feature]."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm, self.hidden_norm = LlamaRMSNorm(H, eps), LlamaRMSNorm(H, eps)
        self.post_attention_layernorm = LlamaRMSNorm(H, eps)
        self.self_attn = LlamaAttention(config, layer_idx=0)
        attn, bias = self.self_attn, config.attention_bias
        for name, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads),
                            ("v_proj", config.num_key_value_heads)):
            setattr(attn, name, nn.Linear(2 * H, heads * attn.head_dim, bias=bias))
        self.mlp = LlamaMLP(config)
        # Some published drafters take the normed feature as the residual.
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, embedded, feature, position_embeddings, mask=None, cache=None) -> torch.Tensor:
        """embedded, feature [B, n, H] -> the next features [B, n, H]; appends n entries to cache.

        The attention and the MLP run as plain ops over the modules' weights
        (models/lean.py): a drafting step is one row through one layer,
        so transformers' per-module machinery is most of its host time (the bundled
        drafter, one thread: 1.5-1.7 ms a step against 1.8-2.2 ms through the modules,
        identical features). Still differentiable: ``outrider build-heads`` trains it."""
        normed = self.hidden_norm(feature)
        residual = normed if self.norm_before_residual else feature
        x = torch.cat([self.input_layernorm(embedded), normed], -1)
        h = residual + attention(self.self_attn, x, position_embeddings, mask, cache, 0)
        return h + gated_mlp(self.mlp, self.post_attention_layernorm(h))


class Eagle3Drafter(OwnKV, nn.Module):
    """The draft layer and what drafting needs of it (core/eagle_proposer.py EagleModel)."""

    kind = "eagle"

    def __init__(self, config: LlamaConfig, target):
        super().__init__()
        config._attn_implementation = "sdpa"
        self.config = config
        text = target.config.get_text_config(decoder=True)
        layers = (getattr(config, "eagle_config", None) or {}).get("eagle_aux_hidden_state_layer_ids")
        # Published drafters without the field use EAGLE-3's rule as is.
        N = text.num_hidden_layers
        self.layers = tuple(layers) if layers else (2, N // 2, N - 3)
        self.target_hidden = layer_features(self.layers)
        H = config.hidden_size
        target_H = getattr(config, "target_hidden_size", None) or text.hidden_size
        self.fc = nn.Linear(len(self.layers) * target_H, H, bias=False)
        self.midlayer = EagleLayer(config)
        self.norm = LlamaRMSNorm(H, config.rms_norm_eps)
        K = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.lm_head = nn.Linear(H, K, bias=False)
        self.rotary = LlamaRotaryEmbedding(config)
        # Token id of each draft logit; None when the draft vocabulary is the target's.
        self.register_buffer("draft_vocab", torch.arange(K) if K != config.vocab_size else None, persistent=False)
        self.tree = EagleTree(**getattr(config, "outrider", None) or {})
        self._embed = [target.get_input_embeddings()]  # a list: shared, never trained nor saved

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The target's concatenated layer states [..., 3H] -> features [..., H]."""
        return fused(self.fc, features)

    def step(self, feature: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, mask=None,
             cache=None) -> torch.Tensor:
        """feature [B, n, H], tokens [B, n] (x_{j+1}), positions [B, n] -> g [B, n, H].
        ``mask``: additive [B, 1, n, keys] or None (one row: sees every cached key)."""
        embedded = self._embed[0](tokens).to(self.dtype)
        return self.midlayer(embedded, feature.to(self.dtype), self.rotary(embedded, positions), mask, cache)

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., K] over the draft vocabulary."""
        return self.lm_head(self.norm(g))

    def candidates(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        top = logits.topk(k, dim=-1).indices
        return top if self.draft_vocab is None else self.draft_vocab.to(top.device)[top]

    def forward_train(self, features: torch.Tensor, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test over windows: features [B, T, 3H] (the target's at 0..T-1),
        tokens [B, T + steps] (x_j). Step s's logits [B, T, K] at anchor j predict
        x_{j+s+2}, from the drafter's own features after step 0, with attention as
        drafting has it: the step-0 (committed) keys up to the anchor, and the anchor's
        own keys of steps 1..s. One cache grows by T keys a step; the mask is
        [causal | eye | ... | eye]."""
        B, T, _ = features.shape
        device = features.device
        cache, g, out = self.new_cache(), self.fuse(features), []
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=device)
        for s in range(steps):
            allowed = torch.cat([causal] + [eye] * s, -1)
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=device).masked_fill(
                ~allowed, torch.finfo(self.dtype).min)[None, None]
            positions = (torch.arange(T, device=device) + s)[None].expand(B, T)
            g = self.step(g, tokens[:, s + 1 : s + 1 + T], positions, mask, cache)
            out.append(self.logits(g))
        return out

    def save(self, folder: Path, dtype: torch.dtype = torch.bfloat16) -> None:
        """The published layout, with d2t/t2d from the draft vocabulary."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()
                 if not k.startswith("rotary.")}
        if self.draft_vocab is not None:
            ids = self.draft_vocab.cpu()
            state["d2t"] = ids - torch.arange(len(ids))
            t2d = torch.zeros(self.config.vocab_size, dtype=torch.bool)
            t2d[ids] = True
            state["t2d"] = t2d
        save_file(state, folder / WEIGHTS)
        self.config.outrider = self.tree.as_dict()
        (folder / CONFIG).write_text(self.config.to_json_string())


def init_from_target(drafter: Eagle3Drafter, target) -> None:
    """A trainable start: the midlayer a copy of the target's last layer reading the
    feature half (the embedding half at zero), fc passing the highest feature through,
    the norm and the LM head the target's (its draft-vocabulary rows)."""
    last = target.get_decoder().layers[-1]
    H = drafter.config.hidden_size
    with torch.no_grad():
        mid = drafter.midlayer
        for name in ("q_proj", "k_proj", "v_proj"):
            ours, theirs = getattr(mid.self_attn, name), getattr(last.self_attn, name)
            ours.weight.zero_()
            ours.weight[:, H:].copy_(theirs.weight)
            if ours.bias is not None and getattr(theirs, "bias", None) is not None:
                ours.bias.copy_(theirs.bias)
        mid.self_attn.o_proj.load_state_dict(last.self_attn.o_proj.state_dict())
        mid.mlp.load_state_dict(last.mlp.state_dict())
        mid.post_attention_layernorm.load_state_dict(last.post_attention_layernorm.state_dict())
        mid.hidden_norm.load_state_dict(last.input_layernorm.state_dict())
        drafter.fc.weight.zero_()
        drafter.fc.weight[:, -H:].copy_(torch.eye(H))
        drafter.norm.load_state_dict(target.get_decoder().norm.state_dict())
        head = target.get_output_embeddings().weight
        rows = drafter.draft_vocab if drafter.draft_vocab is not None else torch.arange(len(head))
        drafter.lm_head.weight.copy_(head[rows.to(head.device)])


def new_drafter(target, draft_vocab: torch.Tensor | None, layers=None) -> Eagle3Drafter:
    """An untrained drafter for ``target`` with draft vocabulary ``draft_vocab`` (token ids, most useful first)."""
    V = target.get_output_embeddings().weight.shape[0]
    drafter = Eagle3Drafter(eagle_config(target, V if draft_vocab is None else len(draft_vocab), layers), target)
    if draft_vocab is not None:
        drafter.draft_vocab = draft_vocab.to(torch.long)
    return drafter


def load_eagle(folder: Path, target) -> Eagle3Drafter:
    """An EAGLE-3 drafter in the published layout (ours included), for ``target``, on its device and dtype."""
    folder = Path(folder)
    raw = json.loads((folder / CONFIG).read_text())
    if not is_eagle3(raw):
        raise ValueError(f"{folder}: not an EAGLE-3 drafter (no draft_vocab_size, architectures {raw.get('architectures')})")
    config = LlamaConfig.from_dict(raw)
    V = target.get_output_embeddings().weight.shape[0]
    if config.vocab_size != V:
        raise ValueError(f"{folder}: an EAGLE-3 drafter for a vocabulary of {config.vocab_size}, the target has {V}")
    drafter = Eagle3Drafter(config, target)
    N = target.config.get_text_config(decoder=True).num_hidden_layers
    if not all(0 <= i < N for i in drafter.layers):
        raise ValueError(f"{folder}: feature layers {list(drafter.layers)} outside the target's {N}")
    state = load_file(folder / WEIGHTS)
    d2t = state.pop("d2t", None)
    state.pop("t2d", None)  # implied by d2t
    embed = state.pop("embed_tokens.weight", None)
    if embed is not None:  # its own copy (a drafter narrower than the target has one)
        drafter._embed = [nn.Embedding.from_pretrained(embed.to(target.dtype), freeze=True).to(target.device)]
    if drafter.draft_vocab is not None:
        if d2t is None:
            raise ValueError(f"{folder}: a draft vocabulary of {len(drafter.draft_vocab)} without d2t")
        drafter.draft_vocab = torch.arange(len(d2t)) + d2t.to(torch.long)
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("rotary.")] or unexpected:
        raise ValueError(f"{folder}: EAGLE-3 weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return drafter.to(device=target.device, dtype=target.dtype).eval()
