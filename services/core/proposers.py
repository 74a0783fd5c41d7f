"""Proposers guess tokens ahead of the last committed token.

Per-sequence proposer state (the draft model's KV) lives in the sequence's own state
object, never on the proposer or the model, so one proposer serves many sequences.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from .draft_q import SparseQ, compact
from .kv import KVState, extend
from .kv_chunks import KVChunk, restore_kv
from .proposals import Proposal
from .sampling import SamplingParams, adjusted_probs
from .shaping import ContextCounts, ShapeRow, shape_logits, shapes


# Polled between drafted tokens; True abandons the rest of the draft (a pipelined
# draft whose assumption the verifier has just refuted).
StopCheck = Callable[[], bool]
# One forward step of a draft model: feed tokens on top of a KV state, get the logits
# [V] of the last one.
Step = Callable[[KVState, list[int]], torch.Tensor]


class Proposer(Protocol):
    def new_state(self) -> object: ...

    def restore_state(self, chunks: list[KVChunk]) -> object:
        """A state that already caches the chunks' positions (a session continued on
        another draft worker)."""
        ...

    def propose(
        self,
        state: object,
        committed: list[int],
        gamma: int,
        params: SamplingParams,
        stop: StopCheck | None = None,
    ) -> Proposal:
        """Up to ``gamma`` tokens after ``committed``. A sampled draft at absolute
        position t draws from the stream keyed by (params.seed, t) (``SparseQ.sample``):
        whichever block drafts a position, early or fresh, on whichever worker, it draws
        the same numbers. Lossless because a position's draws decide at most one tested
        draft: once a draft at t is tested, t is committed and never drafted again."""
        ...


class DraftModelProposer:
    """A small causal LM with the target's tokenizer drafts autoregressively.

    ``confidence_stop``: stop drafting early once the draft's own probability of the
    token it just drafted falls below this (transformers' default is 0.4); 0 disables.
    ``step``: runs one draft forward step, (kv, new tokens) -> next-token logits [V];
    a draft worker passes one that batches the steps of concurrent sessions.
    """

    def __init__(self, model, confidence_stop: float = 0.0, step: Step | None = None):
        self.model = model
        self.confidence_stop = confidence_stop
        self.step = step or (lambda kv, tokens: extend(model, kv, tokens, logits_to_keep=1)[-1])

    def new_state(self) -> KVState:
        return KVState.empty(self.model)

    def restore_state(self, chunks: list[KVChunk]) -> KVState:
        return restore_kv(self.model, chunks)

    def propose(
        self,
        state: KVState,
        committed: list[int],
        gamma: int,
        params: SamplingParams,
        stop: StopCheck | None = None,
    ) -> Proposal:
        if gamma <= 0:
            return Proposal.empty(self.model.device)
        # Positions drafted last round but rejected are dropped; accepted ones are kept.
        state.rollback_to_prefix_of(committed)
        if len(state) == len(committed):
            # Everything is cached (drafts from an early block the verifier passed up
            # were all committed), but the next token needs the last one's logits.
            state.truncate(len(committed) - 1)
        pending = committed[len(state) :]
        tokens: list[int] = []
        qs: list[SparseQ] = []
        counts = ContextCounts()  # the context counted once a round, then a token a step
        for _ in range(gamma):
            if stop is not None and stop():
                break
            logits = self.step(state, pending)  # [V]
            if shapes(params):  # the same penalties the verifier applies to the target, at this position
                logits = shape_logits(logits[None, None], [ShapeRow(params, committed + tokens, [], counts=counts)])[0, 0]
            if params.greedy:
                token = int(logits.argmax())
            else:
                # Sample from the compact q that is sent, never from the full one.
                q = compact(adjusted_probs(logits, params))
                token = q.sample(params.seed, len(committed) + len(tokens))
                qs.append(q)
            tokens.append(token)
            pending = [token]
            if self.confidence_stop > 0 and float(logits.float().softmax(-1)[token]) < self.confidence_stop:
                break
        # The last drafted token is not fed to the draft here; if it is accepted it is
        # fed next round as part of ``pending``, so no work is wasted on a rejection.
        return Proposal(
            tokens=torch.tensor(tokens, dtype=torch.long, device=self.model.device),
            draft_q=SparseQ.stack(qs) if qs else None,
        )


class NgramProposer:
    """Prompt lookup: find the most recent earlier occurrence of the longest suffix
    (``max_n`` down to ``min_n`` tokens) of the committed text, and propose what
    followed it. No model; the proposal is deterministic, so q is one-hot."""

    def __init__(self, min_n: int = 1, max_n: int = 4, device: torch.device | str = "cpu"):
        if not 1 <= min_n <= max_n:
            raise ValueError("n-gram sizes need 1 <= min_n <= max_n")
        self.min_n, self.max_n, self.device = min_n, max_n, device

    def new_state(self) -> None:
        return None

    def restore_state(self, chunks: list[KVChunk]) -> None:
        return None  # lookup reads the committed tokens alone

    def propose(
        self,
        state: None,
        committed: list[int],
        gamma: int,
        params: SamplingParams,
        stop: StopCheck | None = None,
    ) -> Proposal:
        return Proposal(tokens=torch.tensor(self.lookup(committed, gamma), dtype=torch.long, device=self.device))

    def lookup(self, committed: list[int], gamma: int) -> list[int]:
        if gamma <= 0:
            return []
        seq = np.asarray(committed, dtype=np.int64)
        for n in range(min(self.max_n, len(seq) - 1), self.min_n - 1, -1):
            # windows[i] == seq[i:i+n]; the suffix itself (i = len-n) is excluded.
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return seq[start : start + gamma].tolist()
        return []
