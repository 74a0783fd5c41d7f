"""KV cache bookkeeping: a transformers ``DynamicCache`` plus the tokens it covers.

Rollback is exact and cheap: keeping a prefix of the cached positions is a crop, so
accepted positions are never recomputed. transformers 5.x changed ``crop``: it now
takes a *negative* count of tokens to drop (a positive absolute length raises).

Sliding-window layers (Mistral v0.1, Gemma-2/3, Phi-3) are cached as full layers:
transformers' sliding layer drops positions older than the window, and a rollback
past the window then cannot be undone (``crop`` raises). The model builds its
sliding-window mask from its config, not from the cache, so attention still sees the
window only; the price is memory for positions outside it. Layer kinds that keep
other state (linear attention, convolutions) cannot be rolled back by a crop at all,
and such models are refused at load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs

from .errors import UnsupportedModel

# Attention layers a full DynamicLayer caches exactly (the mask does the rest).
ROLLBACK_SAFE_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def new_cache(config) -> DynamicCache:
    """An empty cache of plain full-attention layers, one per decoder layer."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unsupported = sorted(set(layer_types) - ROLLBACK_SAFE_LAYERS)
    if unsupported:
        raise UnsupportedModel(
            f"{config.model_type} has {', '.join(unsupported)} layers, whose state a speculative rollback cannot "
            f"undo; Outrider serves models whose layers are {sorted(ROLLBACK_SAFE_LAYERS)}"
        )
    cache = DynamicCache()
    cache.layers = [DynamicLayer() for _ in layer_types]
    return cache


@dataclass
class KVState:
    cache: DynamicCache
    tokens: list[int] = field(default_factory=list)  # token ids whose KV is cached
    # A drafter's counts of its last context for penalties (core/shaping.py
    # CountedContext): forks share it, and whoever drafts next counts only what it adds.
    counted: object = None

    @classmethod
    def empty(cls, model) -> "KVState":
        return cls(cache=new_cache(model.config))

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        """Keep the KV of the first ``length`` cached tokens."""
        drop = len(self.tokens) - length
        if drop > 0:
            self.cache.crop(-drop)
            del self.tokens[length:]

    def fork(self, length: int | None = None) -> "KVState":
        """A copy of the first ``length`` cached positions (all by default) that grows
        on its own: the speculation cache drafts one branch per assumed outcome from
        one session's KV. Zero-copy: ``DynamicLayer`` never writes a tensor in place (an
        update concatenates into a new one, a crop takes a view), so the fork and this
        state can share the tensors they have in common."""
        if not batchable(self):
            raise ValueError("only a cache of plain DynamicLayers can be forked")
        cache = DynamicCache()
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        fork = KVState(cache, list(self.tokens), self.counted)
        fork.truncate(len(self) if length is None else length)
        return fork

    def rollback_to_prefix_of(self, committed: list[int]) -> None:
        """Drop cached positions that disagree with ``committed`` (rejected drafts)."""
        self.truncate(common_prefix_len(self.tokens, committed))


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix. This runs for every session in every
    pass, on lists as long as the context, and the lists nearly always agree up to the
    last few positions (rejected drafts): so look from the end. Each probe is one
    C-level slice comparison; the probes step back 1, 2, 4... positions until the
    prefixes agree (a few probes, not log2(context) of them as a bisection from the
    middle takes), then a Python scan covers the small gap that is left."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    good, step = n, 1
    while good > 0:
        good = max(0, n - step)
        if a[:good] == b[:good]:
            break
        n, step = good, step * 2
    # a[:good] == b[:good] and a[:n] != b[:n]: the first mismatch is in [good, n).
    i = good
    while a[i] == b[i]:
        i += 1
    return i


@torch.inference_mode()
def extend(model, kv: KVState, new_tokens: list[int], logits_to_keep: int = 0) -> torch.Tensor:
    """Run ``new_tokens`` through ``model`` on top of ``kv`` and cache them.

    Returns logits [len(new_tokens) or logits_to_keep, V] for the last positions.
    """
    ids = torch.tensor([new_tokens], dtype=torch.long, device=model.device)
    logits = forward_logits(model, ids, kv.cache, logits_to_keep)
    kv.tokens.extend(new_tokens)
    return logits[0]


def forward_logits(model, ids: torch.Tensor, cache, logits_to_keep: int, attention_mask=None,
                   position_ids: torch.Tensor | None = None, states: dict | None = None) -> torch.Tensor:
    """logits [B, logits_to_keep or N, V] of ``ids`` [B, N] fed on top of ``cache``.
    ``attention_mask``: [B, P + N] on the host, or the 4-D mask (or a dict of them per
    layer type) of a tree pass. A model loaded with a lean decoder (models/lean.py)
    runs it, for the same logits and cache at a fraction of the host time, and keeps
    the hidden states ``states`` names (filled in place; core/target.py); any other
    model runs its transformers forward, and ``states`` must then be None (hooks on
    its modules read them)."""
    decoder = getattr(model, "lean_decoder", None)
    if decoder is not None:
        return decoder(ids, cache, logits_to_keep, attention_mask, position_ids, states)
    if states:
        raise ValueError("only a lean decoder keeps hidden states; hook the model's modules")
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = attention_mask.to(ids.device)
    return model(
        input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True,
        logits_to_keep=logits_to_keep,
    ).logits


def batchable(kv: KVState) -> bool:
    # Plain full-attention layers only (what ``new_cache`` makes): a cache made some
    # other way may keep bookkeeping a padded batch would corrupt; it runs alone.
    return all(type(layer) is DynamicLayer for layer in kv.cache.layers)


@torch.inference_mode()
def extend_batch(model, kvs: list[KVState], feeds: list[list[int]], logits_to_keep: list[int]) -> list[torch.Tensor]:
    """``extend`` for several sequences in one forward pass; returns each one's logits
    [logits_to_keep_i, V] for its last positions.

    Layout of row i (P = longest cache, N = longest feed):
        [left pad | its cached KV (P_i) | its feed (N_i) | right pad]
    The attention mask hides both pads and position ids count real tokens only, so
    every row attends to exactly what it would alone; a right pad sits after all of
    the row's real tokens, so causality keeps it out of their attention. Afterwards
    each sequence keeps a view of its own rows of the batched cache (the pads
    stripped), which its next ``update`` copies anyway.
    """
    if len(kvs) == 1 or not all(map(batchable, kvs)):
        return [extend(model, kv, f, k) for kv, f, k in zip(kvs, feeds, logits_to_keep)]
    if min(logits_to_keep) < 1 or min(map(len, feeds)) < 1:
        raise ValueError("a batched feed needs at least one token and one logit")
    device, B = model.device, len(kvs)
    past = [len(kv) for kv in kvs]
    P, N = max(past), max(map(len, feeds))
    ids = torch.zeros(B, N, dtype=torch.long)
    mask = torch.zeros(B, P + N, dtype=torch.long)
    for i, (p, feed) in enumerate(zip(past, feeds)):
        ids[i, : len(feed)] = torch.tensor(feed)
        mask[i, P - p : P + len(feed)] = 1
    positions = torch.tensor(past)[:, None] + torch.arange(N)[None, :]
    batched = new_cache(model.config)
    if P:
        template = next(kv for kv in kvs if len(kv))
        for index, (layer, ref) in enumerate(zip(batched.layers, template.cache.layers)):
            keys = _left_padded([kv.cache.layers[index].keys for kv in kvs], past, P, ref.keys)
            values = _left_padded([kv.cache.layers[index].values for kv in kvs], past, P, ref.values)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
    window = max(N - len(f) + k for f, k in zip(feeds, logits_to_keep))
    out = forward_logits(model, ids.to(device), batched, window, mask, positions.to(device))
    logits = []
    for i, (kv, p, feed, k) in enumerate(zip(kvs, past, feeds, logits_to_keep)):
        end = window - (N - len(feed))
        logits.append(out[i, end - k : end])
        for own, layer in zip(kv.cache.layers, batched.layers):
            if not own.is_initialized:
                own.lazy_initialization(layer.keys, layer.values)
            own.keys = layer.keys[i : i + 1, :, P - p : P + len(feed)]
            own.values = layer.values[i : i + 1, :, P - p : P + len(feed)]
        kv.tokens.extend(feed)
    return logits


def _left_padded(parts: list[torch.Tensor | None], lengths: list[int], P: int, ref: torch.Tensor) -> torch.Tensor:
    """[B, H, P, D]: each sequence's [1, H, P_i, D] right-aligned, zeros before it."""
    out = ref.new_zeros(len(parts), ref.shape[1], P, ref.shape[3])
    for i, (part, length) in enumerate(zip(parts, lengths)):
        if length:
            out[i, :, P - length :] = part[0]
    return out
