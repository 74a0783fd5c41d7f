"""The draft worker's side of pipelined drafting with a speculation cache: every branch
is exactly what a fresh draft after its assumed outcome would have been (greedy and
sampled), budgets hold, resolve keeps the branch for the outcome that happened and
never another outcome's."""

import random

import pytest
import torch

from services.core.pipeline import DraftSession, pipeline_hit
from services.core.proposals import DraftAlternatives, Proposal
from services.core.proposers import DraftModelProposer, NgramProposer
from services.core.sampling import Penalties, SamplingParams
from tiny_models import noisy_copy, tiny

PROMPT = [4, 8, 15, 16, 23]
NGRAM_PROMPT = [1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 5, 7, 1, 2, 3]


@pytest.fixture(scope="module")
def draft():
    return tiny("llama", seed=11)


def session(draft, gamma=3, max_new=40, params=SamplingParams(seed=0), fanout=4):
    return DraftSession(DraftModelProposer(draft), PROMPT, max_new, params, gamma, fanout=fanout)


def fresh_after(draft, block, branch, params, kind="draft"):
    """A new session's fresh block after the prefix ``branch`` assumed."""
    proposer = DraftModelProposer(draft) if kind == "draft" else NgramProposer()
    s = DraftSession(proposer, PROMPT if kind == "draft" else NGRAM_PROMPT, 40, params, 3)
    s.committed += block.proposal.tokens.tolist()[: branch.accepted] + [branch.guess]
    return s.draft(branch.round)


PENALIZED = dict(penalties=Penalties(repetition=1.3, presence=0.4, frequency=0.2), prompt_len=len(PROMPT))


@pytest.mark.parametrize("params", [SamplingParams(seed=0), SamplingParams(temperature=1.0, seed=3),
                                    SamplingParams(seed=0, **PENALIZED), SamplingParams(temperature=1.0, seed=3, **PENALIZED),
                                    SamplingParams(temperature=1.0, seed=3, coupled=True, **PENALIZED)],
                         ids=["greedy", "sampled", "greedy-penalized", "sampled-penalized", "coupled-penalized"])
def test_every_branch_equals_a_fresh_draft_after_its_outcome(draft, params):
    s = session(draft, params=params)
    block = s.draft(0)
    branches = s.draft_branches()
    assert len(branches) > 1 and len({(b.accepted, b.guess) for b in branches}) == len(branches)
    for branch in branches:
        assert branch.speculative and branch.round == 1 and len(branch.proposal) > 0
        fresh = fresh_after(draft, block, branch, params)
        assert branch.proposal.tokens.tolist() == fresh.proposal.tokens.tolist()
        if not params.greedy and not params.coupled:
            assert torch.equal(branch.proposal.draft_q.levels, fresh.proposal.draft_q.levels)
        else:  # an argmax, under the position's noise when coupled: no q
            assert branch.proposal.draft_q is None


def test_the_first_branch_is_plain_pipelinings_guess(draft):
    """Full acceptance and the draft's own likeliest next token (its argmax, also when
    sampling: a guess drawn from q would miss more often)."""
    for params in (SamplingParams(seed=0), SamplingParams(temperature=1.0, seed=3)):
        s = session(draft, params=params)
        block = s.draft(0)
        first = s.draft_branches()[0]
        one = session(draft, params=SamplingParams(seed=0), fanout=1)
        one.committed += block.proposal.tokens.tolist()
        argmax = one.proposer.propose(one.state, one.committed, 1, SamplingParams(seed=0)).tokens.tolist()
        assert (first.accepted, [first.guess]) == (len(block.proposal), argmax)
    # Coupled: the draft's own token there, drawn under the noise the target's bonus will be.
    coupled = SamplingParams(temperature=1.0, seed=3, coupled=True)
    s = session(draft, params=coupled)
    block = s.draft(0)
    first = s.draft_branches()[0]
    one = session(draft, params=coupled, fanout=1)
    one.committed += block.proposal.tokens.tolist()
    own = one.proposer.propose(one.state, one.committed, 1, coupled).tokens.tolist()
    assert (first.accepted, [first.guess]) == (len(block.proposal), own)


def test_ngram_branches_follow_the_lookup():
    s = DraftSession(NgramProposer(), NGRAM_PROMPT, 40, SamplingParams(seed=0), 3, fanout=4)
    block = s.draft(0)
    branches = s.draft_branches()
    assert len(branches) == 1  # a lookup has no alternatives: one guess
    assert branches[0].proposal.tokens.tolist() == fresh_after(None, block, branches[0], s.params, "ngram").proposal.tokens.tolist()


def test_resolve_keeps_the_branch_the_verifier_took(draft):
    s = session(draft)
    block = s.draft(0)
    branches = s.draft_branches()
    taken = branches[-1]
    committed = block.proposal.tokens.tolist()[: taken.accepted] + [taken.guess]
    assert s.resolve(committed, hit=True, next_gamma=3) is None
    assert s.in_flight is taken and s.branches == {} and s.committed == PROMPT + committed
    # The next round's branches draft from the taken branch's own KV.
    again = s.draft_branches()
    assert again and all(b.round == 2 for b in again)


def test_a_miss_with_a_branch_for_the_outcome_sends_that_branch(draft):
    s = session(draft)
    block = s.draft(0)
    branch = s.draft_branches()[1]
    committed = block.proposal.tokens.tolist()[: branch.accepted] + [branch.guess]
    cached = s.resolve(committed, hit=False, next_gamma=3)
    assert cached is not None and cached.from_cache and not cached.speculative and cached.round == 1
    assert cached.proposal.tokens.tolist() == branch.proposal.tokens.tolist() and s.in_flight is cached


@pytest.mark.parametrize("sampled", [False, True])
def test_penalized_rounds_after_hits_and_misses_equal_fresh_drafts(draft, sampled):
    """The draft's penalties count each round's context from the last round's count
    (core/shaping.py CountedContext): rounds that take a branch, miss every branch, or
    reject drafts each give exactly a fresh session's block after the same text."""
    params = SamplingParams(temperature=1.0 if sampled else 0.0, seed=3, **PENALIZED)
    s = session(draft, params=params, max_new=200)
    block = s.draft(0)
    for round in range(1, 7):
        branches = s.draft_branches()
        drafts = block.proposal.tokens.tolist()
        if round % 3 == 0 and branches:  # the outcome of a branch
            committed = drafts[: branches[-1].accepted] + [branches[-1].guess]
        else:  # a rejection nobody guessed
            committed = drafts[: round % 2] + [next(t for t in range(40, 90) if t not in {b.guess for b in branches})]
        block = s.resolve(committed, hit=False, next_gamma=3) or s.draft(round)
        fresh = DraftSession(DraftModelProposer(draft), list(s.committed), 200, params, 3).draft(round)
        assert block.proposal.tokens.tolist() == fresh.proposal.tokens.tolist(), round
        if sampled:
            assert torch.equal(block.proposal.draft_q.levels, fresh.proposal.draft_q.levels)


def test_a_miss_with_no_branch_for_the_outcome_drafts_afresh(draft):
    s = session(draft)
    s.draft(0)
    branches = s.draft_branches()
    guesses = {b.guess for b in branches}
    other = next(t for t in range(50, 90) if t not in guesses)
    assert s.resolve([other], hit=False, next_gamma=2) is None
    assert s.in_flight is None and s.committed[-1] == other and s.gamma == 2


def test_a_catch_up_that_began_with_the_blocks_drafts_verifies_the_rest_and_learns_nothing_of_acceptance(draft):
    s = session(draft, gamma=4)
    block = s.draft(0)
    s.draft_branches()
    drafts = block.proposal.tokens.tolist()
    seen = (list(s.history.reached), list(s.history.accepted))
    s.catch_up(drafts[:1], round=3, next_gamma=4, rest_taken=True)  # rounds 0-2 decoded without it
    assert s.committed == PROMPT + drafts[:1] and s.branches == {}
    assert s.in_flight.round == 3 and s.in_flight.proposal.tokens.tolist() == drafts[1:]
    assert (s.history.reached, s.history.accepted) == seen  # never verified: no acceptance to learn
    # The next round's branches continue from the rest, as after any block.
    branch = s.draft_branches()[0]
    assert branch.round == 4
    fresh = session(draft, gamma=4)
    fresh.committed += drafts + [branch.guess]
    assert fresh.draft(4).proposal.tokens.tolist() == branch.proposal.tokens.tolist()


def test_a_catch_up_with_other_tokens_drafts_afresh_after_all_of_them(draft):
    s = session(draft, gamma=4)
    block = s.draft(0)
    other = [t for t in range(50, 90) if t != block.proposal.tokens[0]][:3]
    s.catch_up(other, round=3, next_gamma=2, rest_taken=False)
    assert s.in_flight is None and s.gamma == 2 and s.committed == PROMPT + other
    fresh = session(draft, gamma=2)
    fresh.committed += other
    assert s.draft(3).proposal.tokens.tolist() == fresh.draft(3).proposal.tokens.tolist()


def test_a_hit_for_an_outcome_no_branch_assumed_is_refused(draft):
    s = session(draft)
    block = s.draft(0)
    branches = s.draft_branches()
    with pytest.raises(ValueError, match="no branch"):
        s.resolve(block.proposal.tokens.tolist() + [max(b.guess for b in branches) + 1], hit=True, next_gamma=3)


def test_an_outcome_reported_while_drafting_keeps_only_its_branch(draft):
    s = session(draft)
    block = s.draft(0)
    planned = session(draft)
    planned.draft(0)
    second = planned.draft_branches()[1]
    s.report(block.proposal.tokens.tolist()[: second.accepted] + [second.guess])
    branches = s.draft_branches()
    assert [(b.accepted, b.guess) for b in branches] == [(second.accepted, second.guess)]
    assert branches[0].proposal.tokens.tolist() == second.proposal.tokens.tolist()


def test_no_draft_passes_the_token_budget(draft):
    s = session(draft, gamma=8, max_new=6)
    block = s.draft(0)
    assert len(block.proposal) == 5  # the round's last token is always the target's
    assert s.draft_branches() == []  # nothing left after 5 + bonus
    s = session(draft, gamma=8, max_new=9)
    block = s.draft(0)
    for branch in s.draft_branches():
        # A branch after fewer accepted drafts has more room left.
        assert len(branch.proposal) <= min(8, 9 - branch.accepted - 1 - 1)


def test_a_stopped_draft_has_no_branches(draft):
    s = session(draft)
    s.draft(0)
    assert s.draft_branches(stop=lambda: True) == []


def test_fanout_one_is_a_single_guess(draft):
    s = session(draft, fanout=1)
    s.draft(0)
    assert len(s.draft_branches()) == 1


def test_pipeline_hit_needs_the_branchs_outcome(draft):
    s = session(draft)
    block = s.draft(0)
    verified = block.proposal
    for branch in s.draft_branches():
        assert pipeline_hit(verified, branch.accepted, branch.guess, branch)
        assert not pipeline_hit(verified, branch.accepted, branch.guess + 1, branch)
        assert not pipeline_hit(verified, (branch.accepted + 1) % (len(verified) + 1), branch.guess, branch)
    assert not pipeline_hit(verified, len(verified), 3, None)
    empty = type(block)(1, Proposal.empty(), True, 3, 0.0, len(verified))
    assert not pipeline_hit(verified, len(verified), 3, empty)


class MarkingProposer:
    """Drafts tokens that name the prefix they were drafted after, with alternatives at
    every position so that the cache branches on rejections too: a block used for the
    wrong outcome shows."""

    device = "cpu"

    def new_state(self):
        return None

    def restore_state(self, chunks):
        return None

    def propose(self, state, committed, gamma, params, stop=None):
        tokens = [1000 + hash((tuple(committed), i)) % 10_000 for i in range(gamma)]
        ids = torch.tensor([[t, t + 1, t + 2] for t in tokens], dtype=torch.long).reshape(-1, 3)
        probs = torch.tensor([[0.6, 0.3, 0.1]] * len(tokens)).reshape(-1, 3)
        return Proposal(tokens=torch.tensor(tokens, dtype=torch.long), alternatives=DraftAlternatives(ids, probs))


def test_a_cache_hit_never_hands_out_another_outcomes_block():
    """Random outcomes, some a branch assumed, some not, taken by the verifier or sent
    from the cache: every block a round runs on was drafted after exactly what was
    committed."""
    rng = random.Random(0)
    marker = MarkingProposer()
    s = DraftSession(marker, PROMPT, 10_000, SamplingParams(seed=0), 4, fanout=6)
    block, used, partial = s.draft(0), 0, 0
    for round in range(1, 300):
        branches = s.draft_branches()
        assert len(branches) > 1
        drafts = block.proposal.tokens.tolist()
        if rng.random() < 0.7:
            b = rng.choice(branches)
            committed = drafts[: b.accepted] + [b.guess]
        else:
            a = rng.randrange(len(drafts) + 1)
            committed = drafts[:a] + [rng.randrange(2, 96)]
        assumed = any((b.accepted, b.guess) == (len(committed) - 1, committed[-1]) for b in branches)
        hit = assumed and rng.random() < 0.5
        cached = s.resolve(committed, hit, 4)
        block = s.in_flight if hit else cached or s.draft(round)
        used += assumed
        partial += assumed and len(committed) - 1 < len(drafts)
        assert (hit or cached is not None) == assumed
        assert block.proposal.tokens.tolist() == marker.propose(None, s.committed, 4, None).tokens.tolist()
    assert used > 100 and partial > 30


def test_branches_follow_a_noisy_draft_of_the_target():
    """With a draft close to the target, the branches cover rejections too."""
    target = tiny("llama", seed=5)
    s = DraftSession(DraftModelProposer(noisy_copy(target, 6, 0.3)), PROMPT, 40, SamplingParams(seed=0), 6, fanout=6)
    s.draft(0)
    accepted = {b.accepted for b in s.draft_branches()}
    assert 6 in accepted and len(accepted) > 1
