"""Pipelined drafting (PEARL's "post-verify"), the draft worker's side.

While the target verifies round k, the draft worker already drafts round k+1 on two
assumptions: every draft of round k is accepted, and the target's bonus token equals
the draft's own next token, its *guess*. The verifier keeps that early block only when
both hold (``pipeline_hit``); otherwise the worker redrafts from what was committed.

Why this stays exactly lossless: an early block that is kept was sampled from q given
exactly the prefix that got committed (prefix + round k's drafts + guess == bonus), and
from the draft's own random stream, independent of the target's draws that decided the
hit. Testing it against p is the standard test at its exact prefix. Every drafted
position draws from its own stream keyed by (seed, position), so an early block and
a fresh block after the same prefix are the same block, and a seeded request
reproduces whatever the timing of cancellations or failovers was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


from .gamma import draft_budget
from .kv import KVState, common_prefix_len
from .kv_chunks import KVChunk, export_chunk, exportable
from .proposals import Proposal
from .proposers import Proposer, StopCheck
from .sampling import SamplingParams


@dataclass(frozen=True)
class DraftBlock:
    round: int  # the round these drafts are for
    proposal: Proposal
    speculative: bool  # drafted before round - 1 was verified
    guess: int | None  # speculative only: the draft's guess of round - 1's bonus token
    draft_s: float  # compute time spent drafting it


def pipeline_hit(verified: Proposal, num_accepted: int, bonus: int, early: DraftBlock | None) -> bool:
    """The early block for the next round is usable: the verified round accepted every
    draft and its bonus token is the guess the early block was drafted after."""
    return (
        early is not None
        and early.guess is not None
        and len(early.proposal) > 0
        and num_accepted == len(verified)
        and bonus == early.guess
    )


class DraftSession:
    """One session's drafting state on a draft worker: the committed tokens it has
    been told about, the proposer's own state (draft KV), and the blocks in flight."""

    def __init__(
        self,
        proposer: Proposer,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams,
        gamma: int,
        state: object | None = None,
    ):
        """``state``: the proposer's state restored from chunks (a session continued
        here after it ran on another draft worker)."""
        self.proposer = proposer
        self.state = proposer.new_state() if state is None else state
        self.committed = list(prompt_ids)
        self.limit = len(prompt_ids) + max_new_tokens  # committed length at which generation ends
        self.params = params
        self.gamma = gamma
        self.in_flight: DraftBlock | None = None  # the last block sent, not yet verified
        self.early: DraftBlock | None = None  # drafted ahead for in_flight.round + 1

    def budget(self, committed_len: int) -> int:
        return draft_budget(self.gamma, self.limit - committed_len)

    def draft(self, round: int) -> DraftBlock:
        """A fresh block for ``round`` after the committed tokens."""
        t0 = time.perf_counter()
        proposal = self.proposer.propose(self.state, self.committed, self.budget(len(self.committed)), self.params)
        self.in_flight = DraftBlock(round, proposal, speculative=False, guess=None, draft_s=time.perf_counter() - t0)
        self.early = None
        return self.in_flight

    def draft_ahead(self, stop: StopCheck | None = None) -> DraftBlock:
        """The early block for the round after ``in_flight``, assuming it is accepted in
        full: first the guess of its bonus token, then the block after the guess. An
        empty block (guess None) means no room, no n-gram match, or a stopped draft."""
        assert self.in_flight is not None, "draft a block before drafting ahead"
        base = self.committed + self.in_flight.proposal.tokens.tolist()
        count = self.budget(len(base) + 1)
        round = self.in_flight.round + 1
        if count == 0:
            self.early = DraftBlock(round, Proposal.empty(self.in_flight.proposal.tokens.device), True, None, 0.0)
            return self.early
        t0 = time.perf_counter()
        # Two calls, guess then block, so the block is exactly what a fresh draft after
        # `base + [guess]` would propose: the same for a draft model (each position
        # draws from its own keyed stream), and the lookup a prompt-lookup proposer
        # would do after it.
        guess = self.proposer.propose(self.state, base, 1, self.params, stop)
        block = Proposal.empty(guess.tokens.device)
        if len(guess):
            block = self.proposer.propose(self.state, base + guess.tokens.tolist(), count, self.params, stop)
        draft_s = time.perf_counter() - t0
        if not len(block):  # no room, no match, or stopped
            self.early = DraftBlock(round, block, True, None, draft_s)
        else:
            self.early = DraftBlock(round, block, speculative=True, guess=int(guess.tokens[0]), draft_s=draft_s)
        return self.early

    def resolve(self, committed: list[int], hit: bool, next_gamma: int) -> None:
        """Apply a verified round's outcome: what it committed and whether the verifier
        took the early block."""
        if hit:
            assert self.in_flight is not None and self.early is not None
            expected = self.in_flight.proposal.tokens.tolist() + [self.early.guess]
            if committed != expected:
                raise ValueError("pipeline hit reported for tokens the early block did not assume")
        self.committed.extend(committed)
        self.gamma = next_gamma
        self.in_flight, self.early = (self.early, None) if hit else (None, None)

    def committed_chunk(self, start: int, min_tokens: int) -> KVChunk | None:
        """The draft KV of committed positions from ``start`` on, once there are at
        least ``min_tokens`` of them; None for proposers without a KV cache."""
        if not isinstance(self.state, KVState) or not exportable(self.state):
            return None
        end = common_prefix_len(self.state.tokens, self.committed)
        if end - start < min_tokens:
            return None
        return export_chunk(self.state, start, end)
