"""The typed messages between proposer, verifier and rejection sampler.

A proposal is a token tree: a chain is the tree with one child per node
(``tree = None``). The verifier scores every node in one forward pass with an ancestor
attention mask and per-node positions (core/target.py), and the acceptor walks down
from the root trying each accepted node's children in sibling order (core/tree_accept.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .draft_q import SparseQ
from .tree import TreeShape


@dataclass(frozen=True)
class DraftAlternatives:
    """The draft's likeliest tokens at each drafted position, from the distribution it
    drafted from (after shaping; a greedy draft's at temperature 1). What the
    speculation cache guesses the target's next token from (core/speculation_cache.py).
    A TREE's chain sends its ids to the verifier (DraftOpen.alternatives) as leaves."""

    ids: torch.Tensor  # [N, K] int64 token ids, likeliest first
    probs: torch.Tensor  # [N, K] float32 their probabilities


@dataclass(frozen=True)
class Proposal:
    """Draft tokens for one sequence, proposed after its last committed token."""

    tokens: torch.Tensor  # [N] int64 drafted token ids, one per node
    # q each token was sampled from, truncated and quantized ([N, K], see core/draft_q.py);
    # None when the proposer is deterministic (greedy drafting, n-gram lookup, a head's
    # top-k candidates), i.e. q is one-hot on the token.
    draft_q: SparseQ | None = None
    # The nodes' parents (core/tree.py); None = a chain, node i the parent of node i+1.
    tree: TreeShape | None = None
    # A draft model's alternatives at each position ([N, K]); None for other proposers.
    alternatives: DraftAlternatives | None = None

    def __post_init__(self) -> None:
        if self.tree is not None and len(self.tree) != len(self):
            raise ValueError(f"a tree of {len(self.tree)} nodes for {len(self)} tokens")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __reduce__(self):
        """Pickled (by Ray; to a tensor-parallel group's rank 0) with its tokens in numpy,
        which pickles in a tenth of a torch tensor's time. Loads on the CPU."""
        return _proposal_from, (self.tokens.cpu().numpy(), self.draft_q, self.tree, self.alternatives)

    @property
    def is_chain(self) -> bool:
        return self.tree is None or self.tree.is_chain

    @property
    def depth(self) -> int:
        """Tokens on the longest path: the most a round can accept."""
        return len(self) if self.tree is None else self.tree.max_depth

    def after(self, committed: int) -> "Proposal":
        """A chain's drafts after its first ``committed`` ones: once exactly those are
        committed, the rest is what the draft would propose next, drawn from q given
        that very prefix."""
        if not self.is_chain:
            raise ValueError("only a chain continues past committed drafts")
        alt = self.alternatives
        return Proposal(self.tokens[committed:], None if self.draft_q is None else self.draft_q.rows(committed), None,
                        None if alt is None else DraftAlternatives(alt.ids[committed:], alt.probs[committed:]))

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "Proposal":
        return Proposal(tokens=torch.empty(0, dtype=torch.long, device=device))


def _proposal_from(tokens: np.ndarray, draft_q, tree, alternatives) -> Proposal:
    return Proposal(torch.from_numpy(tokens), draft_q, tree, alternatives)


@dataclass(frozen=True)
class VerifyOutcome:
    """What one verification round commits for one sequence."""

    num_accepted: int  # how many proposed tokens passed the acceptance test (the path's depth)
    tokens: list[int]  # the accepted drafts followed by the correction or bonus token
    path: tuple[int, ...] = ()  # the accepted nodes, root to leaf (a chain's: 0..n-1)
    # The target's hidden states [num_accepted + 1, H] (of the kind asked: final or
    # pre-norm) where it chose each of ``tokens`` (at the last committed token, then at
    # each accepted node): what drafting heads on the verifier (Medusa, MTP) draft the
    # next round from. Only when asked.
    hidden: torch.Tensor | None = None
    # With logprobs asked for: each of ``tokens``' log-probability under the distribution
    # the target drew it from (core/shaping.py slot_logprobs), and per token the top
    # alternatives as (token id, log-probability).
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
