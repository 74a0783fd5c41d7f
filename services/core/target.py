"""The target model's side of verification: run feeds through the model on top of each
session's cached KV, one padded forward pass for the whole batch.

``TargetRunner`` owns the KV of every session it serves, keyed by session id, so that
the same runner can sit in the verifier's process (TP=1) or on each rank of a
tensor-parallel group, where every rank keeps its own head-shard of the cache and only
token ids and logits cross process boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv import KVState, extend, extend_batch
from .kv_chunks import KVChunk, export_chunk, exportable, restore_kv


@dataclass(frozen=True)
class Feed:
    """One session's share of a forward pass."""

    session: str
    keep: int  # cached positions to keep; the rest (rejected drafts) are dropped first
    tokens: list[int]  # fed after them, and cached
    logits_to_keep: int  # logits wanted for the last positions of ``tokens``


class TargetRunner:
    def __init__(self, model):
        self.model = model
        self.sessions: dict[str, KVState] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """Logits [logits_to_keep, V] per feed, in order."""
        if len({f.session for f in feeds}) != len(feeds):
            raise ValueError("a session appears twice in one batch")
        kvs = []
        for feed in feeds:
            kv = self.sessions.setdefault(feed.session, KVState.empty(self.model))
            if feed.keep > len(kv):
                raise ValueError(f"session {feed.session}: keep {feed.keep} > {len(kv)} cached positions")
            kv.truncate(feed.keep)
            kvs.append(kv)
        return extend_batch(self.model, kvs, [f.tokens for f in feeds], [f.logits_to_keep for f in feeds])

    def prefill(self, session: str, tokens: list[int], cached: list[KVChunk]) -> None:
        """Cache ``tokens`` for a new session, starting from ``cached`` (chunks of a
        shared prefix, computed by any replica) and computing only the rest."""
        kv = restore_kv(self.model, cached)
        if kv.tokens != tokens[: len(kv)]:
            raise ValueError(f"session {session}: cached chunks are not a prefix of its tokens")
        self.sessions[session] = kv
        if len(tokens) > len(kv):
            extend(self.model, kv, tokens[len(kv) :], logits_to_keep=1)

    def export(self, session: str, start: int, end: int) -> KVChunk | None:
        """Positions [start, end) of a session's cache, or None if it cannot be shared."""
        kv = self.sessions.get(session)
        if kv is None or len(kv) < end or not exportable(kv):
            return None
        return export_chunk(kv, start, end)

    def release(self, sessions: list[str]) -> None:
        for session in sessions:
            self.sessions.pop(session, None)

    def cached_positions(self) -> int:
        return sum(len(kv) for kv in self.sessions.values())
