"""The target side of a round: score a proposal in one forward pass, accept, and roll
the target KV back to exactly the committed prefix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv import KVState, extend
from .proposals import Proposal, VerifyOutcome
from .rejection import accept_greedy, accept_sampled
from .sampling import SamplingParams, adjusted_probs


@dataclass
class VerifyRequest:
    """One sequence's share of a verification batch."""

    kv: KVState  # the target's KV for this sequence
    committed: list[int]  # prompt + tokens generated so far
    proposal: Proposal  # drafts to check after committed[-1]
    params: SamplingParams
    generator: torch.Generator


class TargetVerifier:
    """Verifies a *batch* of sequences. Today it runs them one after another; batched
    verification across requests pads them into one forward pass behind this same API."""

    def __init__(self, model):
        self.model = model

    def new_state(self) -> KVState:
        return KVState.empty(self.model)

    def prefill(self, kv: KVState, tokens: list[int]) -> None:
        kv.rollback_to_prefix_of(tokens)
        if len(tokens) > len(kv):
            extend(self.model, kv, tokens[len(kv) :], logits_to_keep=1)

    def verify(self, batch: list[VerifyRequest]) -> list[VerifyOutcome]:
        return [self._verify_one(req) for req in batch]

    def _verify_one(self, req: VerifyRequest) -> VerifyOutcome:
        proposal = req.proposal
        if not proposal.is_chain:
            raise ValueError("tree proposals need tree attention; see the note in core/proposals.py")
        g = len(proposal)
        req.kv.rollback_to_prefix_of(req.committed)
        # Feed what the cache lacks (the whole prompt on round one, else the last
        # committed token) plus the drafts; the last g+1 logits are p_1..p_{g+1}.
        feed = req.committed[len(req.kv) :] + proposal.tokens.tolist()
        logits = extend(self.model, req.kv, feed, logits_to_keep=g + 1)  # [g+1, V]
        if req.params.greedy:
            outcome = accept_greedy(proposal.tokens, logits)
        else:
            p = adjusted_probs(logits, req.params)  # [g+1, V]
            outcome = accept_sampled(proposal.tokens, proposal.draft_probs, p, req.generator)
        # Keep KV for committed + accepted drafts; the correction/bonus token is fed next round.
        req.kv.truncate(len(req.committed) + outcome.num_accepted)
        return outcome
