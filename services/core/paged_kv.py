"""A draft model's per-session KV in a paged pool (core/kv_pool.py), as the target's
is: the draft worker's half of the real-scale data path.

A draft worker drafts for every session it serves, and its speculation cache forks a
session's KV into branches, one per likely verify outcome (core/pipeline.py). In a
transformers ``DynamicCache`` every step concatenated each layer's whole history into
a new tensor (a copy of the context per drafted token), a batched step first copied
every session's history into a left-padded batch, and
memory grew with whatever the sessions and their branches held, until the collector
freed it. Here a worker's sessions share one pool, preallocated by bytes:

- a step writes only its new positions (the pass reads each row's blocks in place or
  gathers them: ``pass_cache``, the target's code);
- a rollback moves a length pointer; the blocks stay for the positions written next;
- a fork shares the blocks of its prefix, and a block is copied only when one of its
  holders is about to write it (copy on write: in practice the partial block at the
  fork point, at most BLOCK_TOKENS positions);
- a state that is dropped (an ended session, a branch the verifier did not take)
  returns its blocks, whichever thread drops it;
- a state that cannot get the blocks for its next positions raises ``PoolExhausted``
  having changed nothing, and every other session goes on.
"""

from __future__ import annotations

import weakref

import torch

from .kv import common_prefix_len, forward_logits
from .kv_chunks import KVChunk
from .kv_pool import BLOCK_TOKENS, KVPool, pass_cache, ragged_inputs, real_rows

DEFAULT_DRAFT_KV_CACHE_BYTES = 2**30


class PagedKV:
    """One sequence's draft KV: a block table in ``pool`` and the tokens it covers."""

    def __init__(self, pool: KVPool, tokens: list[int] | None = None, blocks: list[int] | None = None,
                 counted: object = None):
        self.pool = pool
        self.blocks: list[int] = [] if blocks is None else blocks  # held once each (pool.refs)
        self.tokens: list[int] = [] if tokens is None else tokens  # token ids whose KV is cached
        # A drafter's counts of its last context for penalties (core/shaping.py
        # CountedContext): forks share it, and whoever drafts next counts only what it adds.
        self.counted = counted
        # The blocks go back when the state is dropped, by whoever drops it: at the pool's
        # next reserve or count (the list object is the finalizer's: never rebind it).
        weakref.finalize(self, pool.dropped.append, self.blocks)

    @classmethod
    def restored(cls, pool: KVPool, chunks: list[KVChunk]) -> "PagedKV":
        """A state holding the chunks' positions; they must run contiguously from 0."""
        state = cls(pool)
        if chunks:
            state.reserve(chunks[-1].end)
            pool.restore(state, chunks)
        return state

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        """Keep the KV of the first ``length`` cached tokens."""
        del self.tokens[length:]

    def rollback_to_prefix_of(self, committed: list[int]) -> None:
        """Drop cached positions that disagree with ``committed`` (rejected drafts)."""
        self.truncate(common_prefix_len(self.tokens, committed))

    def fork(self, length: int | None = None) -> "PagedKV":
        """The first ``length`` cached positions (all by default), as a state that grows
        on its own: the blocks holding them are shared, not copied."""
        length = len(self) if length is None else min(length, len(self))
        shared = self.blocks[: -(-length // BLOCK_TOKENS)]
        self.pool.share(shared)
        return PagedKV(self.pool, self.tokens[:length], list(shared), self.counted)

    def reserve(self, length: int) -> None:
        """Blocks of this state's own for its positions up to ``length``: new ones from
        the pool, and a private copy of any shared block it would write. All or nothing
        (PoolExhausted)."""
        pool = self.pool
        with pool.lock:
            shared, grow = self.needs(length)
            pool.check_free(grow + len(shared))
            for i in shared:
                old, (new,) = self.blocks[i], pool.take(1)
                in_use = len(self) - i * BLOCK_TOKENS  # > 0 only for the block at the state's end
                if in_use > 0:
                    pool.copy_block(old, new, in_use)
                self.blocks[i] = new
                pool.drop([old])
            self.blocks += pool.take(grow)

    def needs(self, length: int) -> tuple[list[int], int]:
        """What ``reserve(length)`` takes: (table indices of the shared blocks it would
        write, blocks to add)."""
        first, last = len(self) // BLOCK_TOKENS, -(-length // BLOCK_TOKENS)
        refs = self.pool.refs
        return [i for i in range(first, min(last, len(self.blocks))) if refs[self.blocks[i]] > 1], \
            max(0, last - len(self.blocks))

    def export(self, start: int, end: int) -> KVChunk:
        """A copy of positions [start, end): what the session store and prefix sharing keep."""
        return self.pool.export(self, start, end)


@torch.inference_mode()
def extend_paged(model, states: list[PagedKV], feeds: list[list[int]], logits_to_keep: list[int]) -> list[torch.Tensor]:
    """Feed ``feeds[i]`` to ``states[i]`` (all in one pool) in one forward pass and cache
    them. Returns each one's logits [logits_to_keep_i, V] for its last positions.
    Raises PoolExhausted, having fed nothing, when a state cannot get its blocks."""
    if min(logits_to_keep) < 1 or any(not 1 <= k <= len(f) for f, k in zip(feeds, logits_to_keep)):
        raise ValueError("a feed needs at least one token, and a logit for at most every token it feeds")
    pool = states[0].pool
    if any(state.pool is not pool for state in states):
        raise ValueError("states of different pools cannot share a pass")
    with pool.lock:  # all the blocks or none (a proposer reserves a block's positions up front: usually none)
        plans = [state.needs(len(state) + len(feed)) for state, feed in zip(states, feeds)]
        if any(shared or grow for shared, grow in plans):
            pool.check_free(sum(len(shared) + grow for shared, grow in plans))
            for state, feed in zip(states, feeds):
                state.reserve(len(state) + len(feed))
    past, new = [len(s) for s in states], [len(f) for f in feeds]
    cache, P, N = pass_cache(pool, states, past, new)
    ids = torch.tensor([f + [0] * (N - len(f)) for f in feeds], dtype=torch.long).to(pool.device)
    window = max(N - n + k for n, k in zip(new, logits_to_keep))
    # (only real rows' logits are read below: a padded row's may be left out)
    out = forward_logits(model, ids, cache, window, real_rows=real_rows(new), **ragged_inputs(past, new, pool.device))
    logits = []
    for i, (state, feed, k) in enumerate(zip(states, feeds, logits_to_keep)):
        end = window - (N - len(feed))
        logits.append(out[i, end - k : end])
        state.tokens.extend(feed)
    return logits

