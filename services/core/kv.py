"""KV bookkeeping shared by the target's pool (core/kv_pool.py, core/target.py) and the
draft's paged states (core/paged_kv.py): which models a speculative rollback can serve,
where a cache and the committed text part ways, and one forward pass over a cache.

Rollback is a length pointer in both: rejected positions are simply overwritten by the
next feed. Sliding-window layers (Mistral v0.1, Gemma-2/3, Phi-3) are cached as full
layers: every position is kept, and the model builds its sliding-window mask from its
config, so attention still sees the window only; the price is memory for positions
outside it, and the gain is that a rollback past the window is exact (transformers'
sliding cache drops old positions, and its ``crop`` then raises). Layer kinds that
keep other state (linear attention, convolutions) cannot be rolled back by moving a
pointer at all, and such models are refused at load.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

from .errors import UnsupportedModel

# Attention layers whose cache a length pointer rolls back exactly (the mask does the rest).
ROLLBACK_SAFE_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def check_rollback(config) -> None:
    """Refuse, with the reason, a model some of whose layers keep state a rollback
    cannot undo."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unsupported = sorted(set(layer_types) - ROLLBACK_SAFE_LAYERS)
    if unsupported:
        raise UnsupportedModel(
            f"{config.model_type} has {', '.join(unsupported)} layers, whose state a speculative rollback cannot "
            f"undo; Outrider serves models whose layers are {sorted(ROLLBACK_SAFE_LAYERS)}"
        )


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


def forward_logits(model, ids: torch.Tensor, cache, logits_to_keep: int, attention_mask=None,
                   position_ids: torch.Tensor | None = None, states: dict | None = None,
                   real_rows: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, logits_to_keep or N, V] of ``ids`` [B, N] fed on top of ``cache``.
    ``attention_mask``: [B, P + N] on the host, or the 4-D mask (or a dict of them per
    layer type) of a tree pass. A model loaded with a lean decoder (models/lean.py)
    runs it, for the same logits and cache at a fraction of the host time, and keeps
    the hidden states ``states`` names (filled in place; core/target.py); any other
    model runs its transformers forward, and ``states`` must then be None (hooks on
    its modules read them). ``real_rows`` [B, N] (host bool, ``kv_pool.real_rows``): a lean
    decoder leaves the other query rows out of its token-wise work, and their logits
    undefined (for a caller that never reads them)."""
    decoder = getattr(model, "lean_decoder", None)
    if decoder is not None:
        return decoder(ids, cache, logits_to_keep, attention_mask, position_ids, states, real_rows)
    if states:
        raise ValueError("only a lean decoder keeps hidden states; hook the model's modules")
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = attention_mask.to(ids.device)
    return model(
        input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True,
        logits_to_keep=logits_to_keep,
    ).logits
