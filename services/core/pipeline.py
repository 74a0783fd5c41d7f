"""Pipelined drafting (PEARL's "post-verify") with a speculation cache, the draft
worker's side.

While the target verifies round k, the draft worker already drafts round k+1: one
branch per outcome of round k it finds likely (core/speculation_cache.py), each a block
drafted after the prefix that outcome would commit. With a fan-out of 1 that is plain
pipelining's single assumption: every draft of round k accepted, and the target's bonus
token equal to the draft's own likeliest next token, its *guess*. The verifier takes the
branch for the outcome that happened when it holds it (``pipeline_hit``); otherwise the
worker sends the branch it drafted for that outcome at once, or drafts afresh.

Why this stays exactly lossless: a branch that is used was drafted from q given exactly
the prefix that got committed, from the draft's own random streams, independent of the
target's draws that decided the outcome. Testing it against p is the standard test at
its exact prefix. Every drafted position draws from its own stream keyed by
(seed, position), so a branch and a fresh block after the same prefix are the same
block, and a seeded request reproduces whatever the timing of cancellations, failovers
or cache hits was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from .gamma import draft_budget
from .kv import common_prefix_len
from .kv_chunks import KVChunk
from .paged_kv import PagedKV
from .proposals import Proposal
from .proposers import Proposer, StopCheck, propose_branches
from .sampling import SamplingParams
from .speculation_cache import AcceptanceHistory, likely_outcomes


@dataclass(frozen=True)
class DraftBlock:
    round: int  # the round these drafts are for
    proposal: Proposal
    speculative: bool  # drafted before round - 1 was verified: a branch of the speculation cache
    guess: int | None  # speculative only: the token the target emits after round - 1's accepted drafts
    draft_s: float  # compute time spent drafting it (a branch: the batch of branches it was drafted in)
    accepted: int = 0  # speculative only: how many of round - 1's drafts the branch assumes accepted
    from_cache: bool = False  # a fresh block that was drafted as a branch for the outcome just reported
    rest_of: int | None = None  # the rest of the first block drafted for this round, after rounds decoded without it

    @classmethod
    def undrafted(cls, round: int, device) -> "DraftBlock":
        """No drafts for ``round``: the round is a plain decoding step."""
        return cls(round, Proposal.empty(device), False, None, 0.0)


def pipeline_hit(verified: Proposal, num_accepted: int, bonus: int, early: DraftBlock | None) -> bool:
    """``early`` is the branch for what the verified round did: it accepted the drafts
    the branch assumed and then emitted its guess."""
    return (
        early is not None
        and early.guess is not None
        and len(early.proposal) > 0
        and num_accepted == early.accepted <= len(verified)
        and bonus == early.guess
    )


@dataclass
class _Branch:
    block: DraftBlock
    state: object  # the proposer's state after drafting it


class DraftSession:
    """One session's drafting state on a draft worker: the committed tokens it has
    been told about, the proposer's own state (draft KV), the block in flight and the
    branches drafted for its outcomes."""

    def __init__(
        self,
        proposer: Proposer,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams,
        gamma: int,
        state: object | None = None,
        fanout: int = 1,
    ):
        """``state``: the proposer's state restored from chunks (a session continued
        here after it ran on another draft worker). ``fanout``: the most branches to
        draft a round (1: plain pipelining)."""
        self.proposer = proposer
        self.state = proposer.new_state() if state is None else state
        self.committed = list(prompt_ids)
        self.limit = len(prompt_ids) + max_new_tokens  # committed length at which generation ends
        self.params = params
        self.gamma = gamma
        self.fanout = fanout
        self.history = AcceptanceHistory()
        self.in_flight: DraftBlock | None = None  # the last block sent, not yet verified
        self.branches: dict[tuple[int, int], _Branch] = {}  # (accepted, token) -> drafted for in_flight.round + 1
        self.planned = 0  # how many branches the last draft_branches set out to draft
        self.window: float | None = None  # seconds a round's verification takes, as this worker sees it
        # The outcome the verifier reported while branches draft (set from the event
        # loop, read between steps by the drafting thread: one reference, no lock needed).
        self._reported: tuple[int, int] | None = None

    def budget(self, committed_len: int) -> int:
        return draft_budget(self.gamma, self.limit - committed_len)

    def draft(self, round: int) -> DraftBlock:
        """A fresh block for ``round`` after the committed tokens."""
        t0 = time.perf_counter()
        proposal = self.proposer.propose(self.state, self.committed, self.budget(len(self.committed)), self.params)
        self.in_flight = DraftBlock(round, proposal, speculative=False, guess=None, draft_s=time.perf_counter() - t0)
        self.branches = {}
        return self.in_flight

    def draft_branches(self, fanout: int | None = None, stop: StopCheck | None = None) -> list[DraftBlock]:
        """The branches for the round after ``in_flight``, likeliest outcome first (the
        first is plain pipelining's guess), drafted together: one batched forward a
        step. Empty: no room, no guess, or a stopped draft. Once the verifier's outcome
        is reported (``report``), only its branch goes on drafting."""
        assert self.in_flight is not None, "draft a block before drafting ahead"
        self.branches, self.planned = {}, 0
        if not self.in_flight.proposal.is_chain:  # a tree's outcome is a path: its next round is drafted fresh
            return []
        drafts = self.in_flight.proposal.tokens.tolist()
        base = self.committed + drafts
        round = self.in_flight.round + 1
        if self.budget(len(base) + 1) == 0:  # no room after a fully accepted block and its bonus
            return []
        t0 = time.perf_counter()
        # The draft's next token after the whole block: the bonus guesses.
        after = self.proposer.propose(self.state, base, 1, self.params, stop)
        if not len(after):  # no n-gram match, or stopped
            return []
        outcomes = likely_outcomes(self.in_flight.proposal, after.alternatives, int(after.tokens[0]), self.history,
                                   self.fanout if fanout is None else fanout)
        self.planned = len(outcomes)
        prefixes = [self.committed + drafts[: o.accepted] + [o.token] for o in outcomes]
        states = [self._fork(len(p) - 1) for p in prefixes]
        budgets = [self.budget(len(p)) for p in prefixes]

        def wanted():
            if stop is not None and stop():
                return ()
            reported = self._reported
            if reported is None:
                return None
            return [i for i, o in enumerate(outcomes) if (o.accepted, o.token) == reported]

        proposals = propose_branches(self.proposer, states, prefixes, budgets, self.params, wanted)
        draft_s = time.perf_counter() - t0
        blocks = []
        for outcome, proposal, state in zip(outcomes, proposals, states):
            if not len(proposal):  # no room, no match, stopped, or dropped
                continue
            branch = DraftBlock(round, proposal, True, outcome.token, draft_s, outcome.accepted)
            self.branches[(outcome.accepted, outcome.token)] = _Branch(branch, state)
            blocks.append(branch)
        return blocks

    def observe_features(self, start: int, features) -> None:
        """The target's fused features at positions start.. (EAGLE on a draft worker:
        core/eagle_relay.py); call before ``resolve`` of the round that committed them."""
        self.proposer.observe_fused(self.state, start, features)

    def observe_window(self, seconds: float) -> None:
        """A round's verification took ``seconds`` (from its block reaching the verifier
        to its outcome reaching this worker): the time the next round's branches have."""
        self.window = seconds if self.window is None else 0.8 * self.window + 0.2 * seconds

    def report(self, committed: list[int], undrafted: bool = False) -> None:
        """The verifier's outcome for ``in_flight``, told to branches still drafting:
        only the branch for it goes on, none if the verifier decoded without it
        (``catch_up``; called from another thread)."""
        if undrafted:
            self._reported = (-1, -1)  # the outcome of no branch
        elif committed:
            self._reported = (len(committed) - 1, committed[-1])

    def _fork(self, length: int) -> object:
        """The proposer's state for a branch: the draft KV of the first ``length``
        positions, its blocks shared with the session's (core/paged_kv.py ``fork``)."""
        return self.state.fork(length) if isinstance(self.state, PagedKV) else self.state

    def resolve(self, committed: list[int], hit: bool, next_gamma: int) -> DraftBlock | None:
        """Apply a verified round's outcome: what it committed and whether the verifier
        took the branch drafted for it. Returns that branch as the fresh block for the
        next round when the verifier did not hold it (a cache hit it still needs),
        None when there is none."""
        if self.in_flight is None:  # rounds decoded without drafts (told gamma 0), reported at once
            if hit:
                raise ValueError("pipeline hit reported for a round this worker drafted nothing for")
            self.committed.extend(committed)
            self.gamma = next_gamma
            return None
        drafts = self.in_flight.proposal.tokens.tolist()
        self.history.observe(self.in_flight.proposal.depth, len(committed) - 1)
        branch = self.branches.get((len(committed) - 1, committed[-1])) if committed else None
        if branch is not None and committed != drafts[: branch.block.accepted] + [branch.block.guess]:
            branch = None  # cannot be: keyed by the outcome; never hand out another outcome's block
        if hit and branch is None:
            raise ValueError("pipeline hit reported for tokens no branch was drafted for")
        self.committed.extend(committed)
        self.gamma = next_gamma
        self.branches, self._reported = {}, None
        if branch is None or next_gamma == 0:
            self.in_flight = None
            return None
        self.state = branch.state
        if hit:
            self.in_flight = branch.block
            return None
        self.in_flight = replace(branch.block, speculative=False, guess=None, accepted=0, from_cache=True)
        return self.in_flight

    def catch_up(self, committed: list[int], round: int, next_gamma: int, rest_taken: bool) -> None:
        """The verifier decoded without ``in_flight``, this worker's first block (it came
        after the target was ready), and committed these tokens meanwhile: nothing about
        the block's acceptance. ``rest_taken``: they were the block's own first drafts,
        and the verifier verifies the rest as ``round``'s block (``Proposal.after``);
        otherwise it waits for a fresh block."""
        self.committed.extend(committed)
        self.gamma = next_gamma
        self.branches, self._reported = {}, None
        if rest_taken and self.in_flight is not None:
            self.in_flight = replace(self.in_flight, round=round, proposal=self.in_flight.proposal.after(len(committed)))
        else:
            self.in_flight = None

    def committed_chunk(self, start: int, min_tokens: int) -> KVChunk | None:
        """The draft KV of committed positions from ``start`` on, once there are at
        least ``min_tokens`` of them; None for proposers without a KV cache."""
        if not isinstance(self.state, PagedKV):
            return None
        end = common_prefix_len(self.state.tokens, self.committed)
        if end - start < min_tokens:
            return None
        return self.state.export(start, end)
