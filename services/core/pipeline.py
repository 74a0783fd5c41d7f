"""Pipelined drafting (PEARL's "post-verify"), the draft worker's side.

While the target verifies round k, the draft worker already drafts round k+1 on two
assumptions: every draft of round k is accepted, and the target's bonus token equals
the draft's own next token, its *guess*. The verifier keeps that early block only when
both hold (``pipeline_hit``); otherwise the worker redrafts from what was committed.

Why this stays exactly lossless: an early block that is kept was sampled from q given
exactly the prefix that got committed (prefix + round k's drafts + guess == bonus), and
from the draft's own random stream, independent of the target's draws that decided the
hit. Testing it against p is the standard test at its exact prefix. Every block gets
its own random stream keyed by (seed, round, early/fresh), so a seeded request
reproduces whatever the timing of cancellations was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .proposals import Proposal
from .proposers import Proposer, StopCheck
from .sampling import SamplingParams, derive_seed


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
        seed: int,
    ):
        self.proposer = proposer
        self.state = proposer.new_state()
        self.committed = list(prompt_ids)
        self.limit = len(prompt_ids) + max_new_tokens  # committed length at which generation ends
        self.params = params
        self.gamma = gamma
        self.seed = seed
        self.in_flight: DraftBlock | None = None  # the last block sent, not yet verified
        self.early: DraftBlock | None = None  # drafted ahead for in_flight.round + 1

    def budget(self, committed_len: int) -> int:
        # The verifier uses the same bound (SequenceState.draft_budget).
        return max(0, min(self.gamma, self.limit - committed_len - 1))

    def draft(self, round: int) -> DraftBlock:
        """A fresh block for ``round`` after the committed tokens."""
        tokens, probs, draft_s = self._propose(self.committed, self.budget(len(self.committed)), round, False, None)
        self.in_flight = DraftBlock(round, Proposal(tokens, probs), speculative=False, guess=None, draft_s=draft_s)
        self.early = None
        return self.in_flight

    def draft_ahead(self, stop: StopCheck | None = None) -> DraftBlock:
        """The early block for the round after ``in_flight``, assuming it is accepted in
        full. The first drafted token is the guess of the bonus; the rest is the block.
        An empty block (guess None) means there is no room or the draft was stopped."""
        assert self.in_flight is not None, "draft a block before drafting ahead"
        base = self.committed + self.in_flight.proposal.tokens.tolist()
        count = self.budget(len(base) + 1)
        round = self.in_flight.round + 1
        if count == 0:
            self.early = DraftBlock(round, _empty_like(self.in_flight), True, None, 0.0)
            return self.early
        tokens, probs, draft_s = self._propose(base, count + 1, round, True, stop)
        if len(tokens) < 2:  # stopped before drafting anything past the guess
            self.early = DraftBlock(round, _empty_like(self.in_flight), True, None, draft_s)
            return self.early
        proposal = Proposal(tokens[1:], None if probs is None else probs[1:])
        self.early = DraftBlock(round, proposal, speculative=True, guess=int(tokens[0]), draft_s=draft_s)
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

    def _propose(self, base: list[int], count: int, round: int, speculative: bool, stop: StopCheck | None):
        generator = torch.Generator(device=_device(self.proposer)).manual_seed(
            derive_seed(self.seed, f"draft:{round}:{'early' if speculative else 'fresh'}")
        )
        t0 = time.perf_counter()
        proposal = self.proposer.propose(self.state, base, count, self.params, generator, stop)
        return proposal.tokens, proposal.draft_probs, time.perf_counter() - t0


def _empty_like(block: DraftBlock) -> Proposal:
    return Proposal.empty(block.proposal.tokens.device)


def _device(proposer: Proposer) -> torch.device:
    model = getattr(proposer, "model", None)
    return model.device if model is not None else torch.device(getattr(proposer, "device", "cpu"))
