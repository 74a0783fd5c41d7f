"""KV cache bookkeeping: a transformers ``DynamicCache`` plus the tokens it covers.

Rollback is exact and cheap: keeping a prefix of the cached positions is a crop, so
accepted positions are never recomputed. transformers 5.x changed ``crop``: it now
takes a *negative* count of tokens to drop (a positive absolute length raises).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class KVState:
    cache: DynamicCache
    tokens: list[int] = field(default_factory=list)  # token ids whose KV is cached

    @classmethod
    def empty(cls, model) -> "KVState":
        return cls(cache=DynamicCache(config=model.config))

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        """Keep the KV of the first ``length`` cached tokens."""
        drop = len(self.tokens) - length
        if drop > 0:
            self.cache.crop(-drop)
            del self.tokens[length:]

    def rollback_to_prefix_of(self, committed: list[int]) -> None:
        """Drop cached positions that disagree with ``committed`` (rejected drafts)."""
        # This runs twice a round: find the longest common prefix with C-level slice
        # comparisons (usually one; binary search on a mismatch), not a Python loop
        # over the whole context.
        lo, hi = 0, min(len(self.tokens), len(committed))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.tokens[:mid] == committed[:mid]:
                lo = mid
            else:
                hi = mid - 1
        self.truncate(lo)


@torch.inference_mode()
def extend(model, kv: KVState, new_tokens: list[int], logits_to_keep: int = 0) -> torch.Tensor:
    """Run ``new_tokens`` through ``model`` on top of ``kv`` and cache them.

    Returns logits [len(new_tokens) or logits_to_keep, V] for the last positions.
    """
    ids = torch.tensor([new_tokens], dtype=torch.long, device=model.device)
    out = model(input_ids=ids, cache=kv.cache, use_cache=True, logits_to_keep=logits_to_keep)
    kv.tokens.extend(new_tokens)
    return out.logits[0]
