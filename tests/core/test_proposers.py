"""Proposers and the proposal type."""

import pytest
import torch
from tiny_models import tiny

from services.core.tree import tree_shape
from services.core.proposals import Proposal
from services.core.proposers import DraftModelProposer, NgramProposer
from services.core.coupling import coupled_choice
from services.core.sampling import SamplingParams, adjusted_probs


def test_ngram_prefers_longest_most_recent_match():
    ngram = NgramProposer(min_n=1, max_n=3)
    #            a  b  c  X  .  a  b  c  Y  .  b  c
    committed = [1, 2, 3, 9, 0, 1, 2, 3, 8, 0, 2, 3]
    assert ngram.lookup(committed, 3) == [8, 0, 2]  # "b c" most recently followed by Y
    assert ngram.lookup([1, 2, 3, 4], 2) == []  # no earlier occurrence
    assert ngram.lookup([7, 7], 4) == [7]  # continuation clipped at the end of the text
    assert ngram.lookup([1, 2, 1], 0) == []


def test_ngram_proposal_is_deterministic_one_hot():
    proposal = NgramProposer().propose(None, [4, 5, 6, 4, 5], 2, SamplingParams(temperature=1.0, seed=0))
    assert proposal.tokens.tolist() == [6, 4] and proposal.draft_q is None and proposal.is_chain


def test_draft_proposer_records_adjusted_q_when_sampling():
    model = tiny("llama", seed=0)
    proposer = DraftModelProposer(model)
    params = SamplingParams(temperature=0.8, top_k=5, seed=1)
    proposal = proposer.propose(proposer.new_state(), [3, 4, 5], 4, params)
    q = proposal.draft_q.dense()
    assert proposal.tokens.shape == (4,) and q.shape == (4, model.config.vocab_size)
    assert torch.allclose(q.sum(-1), torch.ones(4))
    assert ((q > 0).sum(-1) <= 5).all()  # top-k applied to q as to p
    assert (q[torch.arange(4), proposal.tokens] > 0).all()


def test_a_coupled_drafts_alternatives_rank_by_its_perturbed_scores():
    """The target's token at a coupled position is the argmax of its log p plus the
    position's noise, so the draft's guesses of it (the speculation cache's corrections
    and bonus, a TREE's leaves) rank by log q + the same noise: its own token first."""
    model = tiny("llama", seed=0)
    proposer = DraftModelProposer(model)
    params = SamplingParams(temperature=1.0, seed=5, coupled=True)
    context = [3, 4, 5]
    proposal = proposer.propose(proposer.new_state(), context, 6, params)
    alts = proposal.alternatives
    assert proposal.draft_q is None
    assert alts.ids[:, 0].tolist() == proposal.tokens.tolist()
    with torch.no_grad():
        logits = model(torch.tensor([context + proposal.tokens.tolist()])).logits[0, len(context) - 1 : -1]
    positions = torch.arange(len(context), len(context) + 6)
    scores = coupled_choice(adjusted_probs(logits, params).log(), 5, positions)
    assert alts.ids.tolist() == scores.topk(alts.ids.shape[1]).indices.tolist()
    assert (alts.probs.sum(-1) <= 1 + 1e-5).all()
    assert (alts.probs[:, :-1] >= alts.probs[:, 1:]).all()
    # Not q's own ranking: at T = 1 the noise reorders it somewhere in six positions.
    assert alts.ids.tolist() != adjusted_probs(logits, params).topk(alts.ids.shape[1]).indices.tolist()


def test_sampled_drafts_are_keyed_by_position():
    """The same prefix drafts the same tokens, whatever was drafted or rejected
    before (an early block equals a fresh one; a resumed session redrafts the same)."""
    model = tiny("llama", seed=0)
    proposer = DraftModelProposer(model)
    params = SamplingParams(temperature=1.0, seed=5)
    first = proposer.propose(proposer.new_state(), [3, 4, 5], 4, params)
    state = proposer.new_state()
    proposer.propose(state, [3, 4, 5, 9, 9], 3, params)  # a different round on the same state
    again = proposer.propose(state, [3, 4, 5], 4, params)
    assert again.tokens.tolist() == first.tokens.tolist()
    other_seed = proposer.propose(proposer.new_state(), [3, 4, 5], 4, SamplingParams(temperature=1.0, seed=6))
    assert other_seed.tokens.tolist() != first.tokens.tolist()


def test_draft_proposer_greedy_matches_model_argmax():
    model = tiny("gpt2", seed=0)
    proposer = DraftModelProposer(model)
    state = proposer.new_state()
    proposal = proposer.propose(state, [3, 4, 5], 3, SamplingParams(seed=0))
    ids = [3, 4, 5]
    for token in proposal.tokens.tolist():
        assert token == int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
    assert proposal.draft_q is None
    assert state.tokens == [3, 4, 5] + proposal.tokens.tolist()[:-1]  # last draft not fed yet


def test_chain_and_tree_proposals():
    chain = Proposal(tokens=torch.tensor([1, 2, 3]), tree=tree_shape((-1, 0, 1)))
    tree = Proposal(tokens=torch.tensor([1, 2, 3]), tree=tree_shape((-1, -1, 0)))
    assert chain.is_chain and not tree.is_chain and Proposal.empty().is_chain
    assert (chain.depth, tree.depth, Proposal(tokens=torch.tensor([4, 5])).depth) == (3, 2, 2)
    with pytest.raises(ValueError, match="tree of 2 nodes"):
        Proposal(tokens=torch.tensor([1, 2, 3]), tree=tree_shape((-1, 0)))

