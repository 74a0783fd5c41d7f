"""Proposals travel by pickle to a tensor-parallel group's rank 0 (core/verifier.py
AcceptRow): they must arrive as they left, their q derived again to the same bits."""

import pickle

import torch

from services.core.draft_q import SparseQ, compact
from services.core.proposals import DraftAlternatives, Proposal
from services.core.tree import tree_shape


def test_a_proposal_pickles_to_the_same_tokens_q_tree_and_alternatives():
    gen = torch.Generator().manual_seed(0)
    V = 151_936
    qs = [compact(torch.softmax(torch.randn(V, generator=gen) * 3, -1)) for _ in range(4)]
    q = SparseQ.stack(qs)
    tokens = torch.tensor([7, 151_935, 3, 99])
    alternatives = DraftAlternatives(torch.tensor([[1, 2]] * 4), torch.tensor([[0.5, 0.25]] * 4))
    proposal = Proposal(tokens, q, tree_shape((-1, 0, 0, 2)), alternatives)
    back = pickle.loads(pickle.dumps(proposal))
    assert torch.equal(back.tokens, tokens) and back.tokens.dtype == torch.int64
    for name in ("ids", "levels", "tail_weight", "probs", "tail"):
        got, want = getattr(back.draft_q, name), getattr(q, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert back.draft_q.vocab == V
    assert back.tree.parents == (-1, 0, 0, 2) and not back.is_chain
    assert torch.equal(back.alternatives.ids, alternatives.ids)
    # A third of the bytes of the tensors themselves: ids as int32, q' derived on load.
    assert len(pickle.dumps(q)) < q.ids.numel() * 6


def test_a_proposal_without_q_pickles_too():
    back = pickle.loads(pickle.dumps(Proposal(torch.tensor([4, 5]))))
    assert back.tokens.tolist() == [4, 5] and back.draft_q is None and back.is_chain


def test_the_rest_of_a_chain_after_committed_drafts_keeps_each_drafts_q_and_alternatives():
    gen = torch.Generator().manual_seed(1)
    q = SparseQ.stack([compact(torch.softmax(torch.randn(1000, generator=gen) * 3, -1)) for _ in range(5)])
    alternatives = DraftAlternatives(torch.arange(10).view(5, 2), torch.rand(5, 2, generator=gen))
    chain = Proposal(torch.tensor([9, 8, 7, 6, 5]), q, None, alternatives)
    rest = chain.after(2)
    assert rest.tokens.tolist() == [7, 6, 5] and rest.is_chain and rest.draft_q.vocab == 1000
    for name in ("ids", "levels", "tail_weight", "probs", "tail"):
        assert torch.equal(getattr(rest.draft_q, name), getattr(q, name)[2:]), name
    assert torch.equal(rest.alternatives.ids, alternatives.ids[2:])
    assert torch.equal(rest.draft_q.dense(), q.dense()[2:])
    assert Proposal(torch.tensor([4, 5])).after(1).tokens.tolist() == [5]
    try:
        Proposal(torch.tensor([1, 2, 3]), None, tree_shape((-1, 0, 0))).after(1)
    except ValueError:
        pass
    else:
        raise AssertionError("a tree has no single rest")
