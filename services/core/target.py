"""The target model's side of verification: run feeds through the model on top of each
session's cached KV, one forward pass for the whole batch.

``TargetRunner`` owns the KV of every session it serves, in a preallocated paged pool
(core/kv_pool.py), keyed by session id, so that the same runner can sit in the
verifier's process (TP=1) or on each rank of a tensor-parallel group, where every rank
keeps its own head-shard of the cache and only token ids and logits cross process
boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_chunks import KVChunk
from .kv_pool import KVPool, PagedSeq, pass_cache

DEFAULT_KV_CACHE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Feed:
    """One session's share of a forward pass."""

    session: str
    keep: int  # cached positions to keep; the rest (rejected drafts) are dropped first
    tokens: list[int]  # fed after them, and cached
    logits_to_keep: int  # logits wanted for the last positions of ``tokens``


class TargetRunner:
    def __init__(self, model, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, tp_size: int = 1):
        self.model = model
        self.pool = KVPool.for_model(model, kv_cache_bytes, tp_size)
        self.sessions: dict[str, PagedSeq] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """Logits [logits_to_keep, V] per feed, in order. Raises PoolExhausted, having
        changed nothing, when the pool cannot hold the pass."""
        if len({f.session for f in feeds}) != len(feeds):
            raise ValueError("a session appears twice in one batch")
        if min(f.logits_to_keep for f in feeds) < 1 or min(len(f.tokens) for f in feeds) < 1:
            raise ValueError("a feed needs at least one token and one logit")
        seqs = [self.sessions.get(f.session) for f in feeds]
        seqs = [PagedSeq() if seq is None else seq for seq in seqs]  # (an empty PagedSeq is falsy)
        for feed, seq in zip(feeds, seqs):
            if feed.keep > len(seq):
                raise ValueError(f"session {feed.session}: keep {feed.keep} > {len(seq)} cached positions")
        self.pool.reserve(seqs, [f.keep + len(f.tokens) for f in feeds])
        for feed, seq in zip(feeds, seqs):
            self.sessions[feed.session] = seq
            del seq.tokens[feed.keep :]  # rollback: a length pointer
        past, new = [f.keep for f in feeds], [len(f.tokens) for f in feeds]
        cache, P, N = pass_cache(self.pool, seqs, past, new)
        device = self.device
        ids = torch.zeros(len(feeds), N, dtype=torch.long)
        for i, feed in enumerate(feeds):
            ids[i, : len(feed.tokens)] = torch.tensor(feed.tokens)
        extra = {}
        if len(set(past)) > 1 or len(set(new)) > 1:
            # Rows differ: mask both pads, count positions from each row's own start.
            mask = torch.zeros(len(feeds), P + N, dtype=torch.long)
            for i, (p, n) in enumerate(zip(past, new)):
                mask[i, P - p : P + n] = 1
            positions = torch.tensor(past)[:, None] + torch.arange(N)[None, :]
            extra = dict(attention_mask=mask.to(device), position_ids=positions.to(device))
        window = max(N - n + f.logits_to_keep for n, f in zip(new, feeds))
        out = self.model(input_ids=ids.to(device), cache=cache, use_cache=True, logits_to_keep=window, **extra)
        logits = []
        for i, (feed, n) in enumerate(zip(feeds, new)):
            end = window - (N - n)
            logits.append(out.logits[i, end - feed.logits_to_keep : end])
            seqs[i].tokens.extend(feed.tokens)
        return logits

    @torch.inference_mode()  # the pool may have been allocated in a forward: writes need the same mode
    def prefill(self, session: str, tokens: list[int], cached: list[KVChunk], reserve: int = 0) -> None:
        """Cache ``tokens`` for a new session, starting from ``cached`` (chunks of a
        shared prefix, computed by any replica) and computing only the rest. ``reserve``:
        positions to hold for the session from the start (its prompt, its budget of new
        tokens and a block of drafts), so that it cannot run out of pool mid-stream."""
        if sum(len(c.tokens) for c in cached) > len(tokens) or \
                [t for c in cached for t in c.tokens] != tokens[: sum(len(c.tokens) for c in cached)]:
            raise ValueError(f"session {session}: cached chunks are not a prefix of its tokens")
        self.release([session])
        seq = PagedSeq()
        self.pool.reserve([seq], [max(reserve, len(tokens))])
        self.sessions[session] = seq
        position = 0
        for chunk in cached:
            if chunk.start != position:
                raise ValueError(f"chunks are not contiguous: expected start {position}, got {chunk.start}")
            slots = self._slots(seq, chunk.start, chunk.end)
            for index in range(self.pool.num_layers):
                self.pool.write(index, slots, chunk.keys[index], chunk.values[index])
            seq.tokens.extend(chunk.tokens)
            position = chunk.end
        if len(tokens) > len(seq):
            self.forward([Feed(session, len(seq), tokens[len(seq) :], 1)])

    @torch.inference_mode()
    def export(self, session: str, start: int, end: int) -> KVChunk | None:
        """Positions [start, end) of a session's cache (copied), or None if it has fewer."""
        seq = self.sessions.get(session)
        if seq is None or len(seq) < end or not 0 <= start < end:
            return None
        slots = self._slots(seq, start, end)
        pairs = [self.pool.read(index, slots) for index in range(self.pool.num_layers)]
        return KVChunk(start=start, tokens=tuple(seq.tokens[start:end]),
                       keys=tuple(k.to("cpu") for k, _ in pairs), values=tuple(v.to("cpu") for _, v in pairs))

    def _slots(self, seq: PagedSeq, start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end, device=self.pool.device)[None]
        return self.pool.slots(self.pool.table([seq]), positions)[0]

    def release(self, sessions: list[str]) -> None:
        for session in sessions:
            seq = self.sessions.pop(session, None)
            if seq is not None:
                self.pool.release(seq)

    def cached_positions(self) -> int:
        return sum(len(seq) for seq in self.sessions.values())
