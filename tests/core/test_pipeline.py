"""The draft worker's side of pipelined drafting: early blocks are exactly what a fresh
draft after the assumed outcome would have been (greedy), budgets hold, and resolve
keeps or drops them as the verifier decides."""

import pytest
import torch

from services.core.pipeline import DraftSession, pipeline_hit
from services.core.proposals import Proposal
from services.core.proposers import DraftModelProposer, NgramProposer
from services.core.sampling import SamplingParams
from tiny_models import tiny

PROMPT = [4, 8, 15, 16, 23]


@pytest.fixture(scope="module")
def draft():
    return tiny("llama", seed=11)


def session(draft, gamma=3, max_new=40, params=SamplingParams(seed=0)):
    return DraftSession(DraftModelProposer(draft), PROMPT, max_new, params, gamma)


@pytest.mark.parametrize("kind", ["draft", "ngram"])
def test_early_block_equals_a_fresh_draft_after_full_acceptance_and_the_guess(draft, kind):
    def make():
        proposer = DraftModelProposer(draft) if kind == "draft" else NgramProposer()
        prompt = PROMPT if kind == "draft" else [1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 5, 7, 1, 2, 3]
        return DraftSession(proposer, prompt, 40, SamplingParams(seed=0), 3)

    s = make()
    block = s.draft(0)
    early = s.draft_ahead()
    assert len(early.proposal) > 0 and early.speculative and early.round == 1
    fresh = make()
    fresh.committed += block.proposal.tokens.tolist() + [early.guess]
    assert early.proposal.tokens.tolist() == fresh.draft(1).proposal.tokens.tolist()


def test_resolve_keeps_the_early_block_on_a_hit_and_drops_it_on_a_miss(draft):
    s = session(draft)
    block = s.draft(0)
    early = s.draft_ahead()
    s.resolve(block.proposal.tokens.tolist() + [early.guess], hit=True, next_gamma=3)
    assert s.in_flight is early and s.early is None
    s.draft_ahead()
    s.resolve([1, 2], hit=False, next_gamma=2)
    assert s.in_flight is None and s.early is None and s.committed[-2:] == [1, 2] and s.gamma == 2


def test_a_hit_for_tokens_the_early_block_did_not_assume_is_refused(draft):
    s = session(draft)
    block = s.draft(0)
    early = s.draft_ahead()
    with pytest.raises(ValueError, match="did not assume"):
        s.resolve(block.proposal.tokens.tolist() + [early.guess + 1], hit=True, next_gamma=3)


def test_no_draft_passes_the_token_budget(draft):
    s = session(draft, gamma=8, max_new=6)
    block = s.draft(0)
    assert len(block.proposal) == 5  # the round's last token is always the target's
    early = s.draft_ahead()
    assert len(early.proposal) == 0 and early.guess is None  # nothing left after 5 + bonus


def test_a_stopped_early_draft_is_empty(draft):
    s = session(draft)
    s.draft(0)
    early = s.draft_ahead(stop=lambda: True)
    assert len(early.proposal) == 0 and early.guess is None


def test_sampled_blocks_carry_q_for_every_draft(draft):
    s = session(draft, params=SamplingParams(temperature=1.0, seed=3))
    s.draft(0)
    early = s.draft_ahead()
    q = early.proposal.draft_q.dense()
    assert q.shape == (len(early.proposal), draft.config.vocab_size)
    torch.testing.assert_close(q.sum(-1), torch.ones(len(early.proposal)))
    assert (q[torch.arange(len(early.proposal)), early.proposal.tokens] > 0).all()


def test_sampled_early_block_equals_the_fresh_block_after_the_same_outcome(draft):
    """Each position draws from its own keyed stream, so the early block and a fresh
    one after the outcome it assumed are the same block, sampled too."""
    params = SamplingParams(temperature=1.0, seed=3)
    s = session(draft, params=params)
    block = s.draft(0)
    early = s.draft_ahead()
    fresh = session(draft, params=params)
    fresh.committed += block.proposal.tokens.tolist() + [early.guess]
    again = fresh.draft(1)
    assert early.proposal.tokens.tolist() == again.proposal.tokens.tolist()
    assert torch.equal(early.proposal.draft_q.levels, again.proposal.draft_q.levels)


def test_pipeline_hit_needs_full_acceptance_and_the_right_guess(draft):
    s = session(draft)
    block = s.draft(0)
    early = s.draft_ahead()
    verified = block.proposal
    assert pipeline_hit(verified, len(verified), early.guess, early)
    assert not pipeline_hit(verified, len(verified) - 1, early.guess, early)
    assert not pipeline_hit(verified, len(verified), early.guess + 1, early)
    assert not pipeline_hit(verified, len(verified), early.guess, None)
    empty = type(early)(1, Proposal.empty(), True, None, 0.0)
    assert not pipeline_hit(verified, len(verified), early.guess, empty)
