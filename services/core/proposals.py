"""The typed messages between proposer, verifier and rejection sampler.

How a token *tree* fits (Medusa, EAGLE-2, multi-drafter SpecInfer trees):
a chain is the special case ``parents = [-1, 0, 1, ..., N-2]``. A tree is the same
``Proposal`` with any parent list whose parents precede their children. The verifier
turns ``parents`` once into index buffers: position ids (prefix length + node depth)
and an ancestor attention mask (each node sees the prefix and its ancestors), scores
all N nodes in one forward pass, and the acceptor walks down from the root trying the
children of each accepted node in sibling order, subtracting each rejected child's q
from p before testing the next (SpecInfer's multi-draft rejection, which stays
lossless). Only ``parents`` and the acceptor's walk change; the verifier API and the
``VerifyOutcome`` it returns stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .draft_q import SparseQ


@dataclass(frozen=True)
class Proposal:
    """Draft tokens for one sequence, proposed after its last committed token."""

    tokens: torch.Tensor  # [N] int64 drafted token ids
    # q each token was sampled from, truncated and quantized ([N, K], see core/draft_q.py);
    # None when the proposer is deterministic (greedy drafting, n-gram lookup), i.e. q
    # is one-hot on the token.
    draft_q: SparseQ | None = None
    # [N] int64 parent node of each token, -1 = the last committed token; None = chain.
    parents: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_chain(self) -> bool:
        return self.parents is None or bool(
            torch.equal(self.parents, torch.arange(-1, len(self) - 1, device=self.parents.device))
        )

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "Proposal":
        return Proposal(tokens=torch.empty(0, dtype=torch.long, device=device))


@dataclass(frozen=True)
class VerifyOutcome:
    """What one verification round commits for one sequence."""

    num_accepted: int  # how many proposed tokens passed the acceptance test
    tokens: list[int]  # the accepted drafts followed by the correction or bonus token
