"""Drafting heads next to the target: they draft the next round from the hidden state
of the verification pass just run, with no draft model and no network hop.

Medusa (Cai et al., 2024): K heads on the target's last hidden state h_t; head k
predicts the token k+2 positions after t (the target's own LM head predicts t+1, the
token the round just emitted). Each head's top candidates fill a token tree given as
data (core/tree.py ``ChoiceTree``): node i takes head depth_i's rank_i-th candidate, one
gather for the whole tree. The candidates are chosen deterministically, so each is a
point mass to the tree acceptor: lossless under sampling too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .kv_chunks import KVChunk
from .proposals import Proposal
from .sampling import SamplingParams
from .tree import ChoiceTree
from .tree_planner import TreePlanner

# hidden [H] -> logits [K, V]: what each head predicts at offsets 2..K+1.
Heads = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class HeadState:
    hidden: torch.Tensor | None = None  # [H] where the target chose committed[-1]
    length: int = 0  # len(committed) when it was taken: a stale state drafts nothing
    drafted: ChoiceTree | None = None  # the tree the last round drafted (what its path indexes)


class PlannedTree:
    """A head proposer's tree: fixed, or the plan of a replica's ``TreePlanner``
    (core/tree_planner.py), which learns from every round's accepted path."""

    tree: ChoiceTree
    planner: TreePlanner | None = None

    @property
    def max_nodes(self) -> int:
        return len(self.tree.shape) if self.planner is None else max(len(self.tree.shape), self.planner.max_nodes)

    def round_tree(self, state, gamma: int) -> ChoiceTree | None:
        """This round's tree, no deeper than ``gamma``; None: draft nothing."""
        tree = self.tree if self.planner is None else self.planner.tree
        if tree is not None and gamma < tree.shape.max_depth:
            tree = tree.prune(gamma)
        state.drafted = tree
        return tree

    def observe_path(self, state, path: tuple[int, ...]) -> None:
        """The round's accepted nodes (indices into the tree it drafted), for the planner."""
        if self.planner is None:
            return
        if state.drafted is None:
            self.planner.idle()
        else:
            self.planner.observe(state.drafted, state.drafted.choices[path[-1]] if path else ())


class MedusaProposer(PlannedTree):
    uses_target_hidden = True

    def __init__(self, heads: Heads, tree: ChoiceTree, device: torch.device | str = "cpu",
                 planner: TreePlanner | None = None):
        self.heads, self.tree, self.device, self.planner = heads, tree, device, planner

    def new_state(self) -> HeadState:
        return HeadState()

    def restore_state(self, chunks: list[KVChunk]) -> HeadState:
        return HeadState()  # heads are stateless given the committed tokens: the next pass refills it

    def observe(self, state: HeadState, start: int, hidden: torch.Tensor) -> None:
        """``hidden`` [n, H]: the target's final hidden states at positions start..start+n-1
        (row i where it chose token start+i+1). Medusa drafts from the last one."""
        state.hidden, state.length = hidden[-1], start + len(hidden) + 1

    @torch.inference_mode()
    def propose(self, state: HeadState, committed: list[int], gamma: int, params: SamplingParams,
                stop=None) -> Proposal:
        """A tree no deeper than ``gamma`` (the round's draft budget) after ``committed``."""
        if state.hidden is None or state.length != len(committed) or gamma <= 0:
            state.drafted = None
            return Proposal.empty(self.device)
        tree = self.round_tree(state, gamma)
        if tree is None:
            return Proposal.empty(self.device)
        # heads: [K, V'] over their draft vocabulary, if they have one
        return tree_of_candidates(tree, self.heads(state.hidden), self.device, getattr(self.heads, "draft_vocab", None))


def tree_of_candidates(tree: ChoiceTree, logits: torch.Tensor, device, vocab: torch.Tensor | None = None) -> Proposal:
    """Fill ``tree`` from per-depth logits [>= D, V']: node i takes the rank_i-th
    candidate at its depth, one top-k and one gather for the whole tree. ``vocab``
    [V']: the token id of each logit (a draft vocabulary); None = the identity."""
    candidates = logits[: tree.shape.max_depth].topk(int(tree.rank.max()) + 1, dim=-1).indices  # [D, R]
    if vocab is not None:
        candidates = vocab.to(candidates.device)[candidates]
    rows = (tree.shape.depth - 1).to(candidates.device)
    tokens = candidates[rows, tree.rank.to(candidates.device)]  # [N]
    return Proposal(tokens=tokens.to(device), tree=tree.shape)
