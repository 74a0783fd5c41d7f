"""SpeculationMethod.TREE: several drafters' proposals merged into one token tree and
verified in one pass (SpecInfer, Miao et al. 2024).

The acceptor (core/tree_accept.py) tries a node's children in sibling order with
recursive rejection sampling, which stays lossless as long as, given the path to a
node, each child is either drawn from its own q independently of its siblings, or
chosen deterministically (a point mass). Drafters' proposals are exactly that, each on
its own: the draft model samples from its q (or is greedy: a point mass); lookups and a
draft's top-k alternatives are point masses. Merging them needs care only where two
drafters put the same token under the same parent:

- **Order.** Inputs are merged in the order given, and at every node the children of
  an earlier input come first. An order fixed by who drafted, never by what was
  drafted, keeps each child's test the one the rule expects. The sampled draft goes
  first: its test, min(1, r(x)/q(x)), accepts x at least as often as a point mass's r(x).
- **A point-mass duplicate merges into the earlier node**, its children joining the
  earlier node's. If the earlier x is rejected, the residual r has r(x) = 0 (a point
  mass zeroes x; a sampled x is rejected only where r(x) < q(x), and r - q clamps there
  to 0), so the duplicate's own test could only fail, and its residual update (zero x)
  changes nothing: dropping it is exact. If x is accepted, the walk continues below x,
  where every drafter whose path reached x left independent candidates: their union is
  a valid set of children.
- **A sampled duplicate cannot be dropped**: on its rejection r loses its q. It stays
  as a leaf (a "ghost"), which always fails for the same r(x) = 0, and subtracts its q;
  its descendants are unreachable and are dropped.

Two sampled drafts of one position must draw independent numbers; one draft model per
tree keeps that true (its draws are keyed by position, core/draft_q.py).
"""

from __future__ import annotations

import torch

from .draft_q import LEVELS, SparseQ
from .errors import InvalidRequest
from .gamma import MAX_GAMMA, draft_budget
from .kv_chunks import KVChunk
from .proposals import Proposal
from .proposers import NgramProposer, Proposer, StopCheck
from .sampling import SamplingParams
from .suffix import SuffixProposer
from .target import FINAL
from .tree import tree_shape

LOOKUPS = ("suffix", "ngram")
HEADS = ("medusa", "mtp", "eagle")  # drafting heads on the verifier: at most one per tree
MEMBERS = ("draft", *LOOKUPS, *HEADS)  # the drafters a tree may merge
DEFAULT_MEMBERS = "draft,suffix"
DEFAULT_BRANCHES = 2  # a draft chain's likeliest tokens tried at each depth: the drafted one and the runner-up
# A tree's lookups may match this many times deeper than its draft chain: they cost
# nothing to draft, and a long match (an edited file, a repeated answer) runs on past
# where the draft model stops. Measured on the bundled pair, held-out prompts, gamma 8:
# mean accepted length 7.06 at 1x, 9.45 at 2x (the draft chain alone: 6.28).
LOOKUP_REACH = 2


def lookup_budget(gamma: int, remaining: int) -> int:
    """How deep a tree's lookups may draft: LOOKUP_REACH x the chain's gamma, within
    the request's tokens (core/gamma.py draft_budget) and MAX_GAMMA."""
    return draft_budget(min(LOOKUP_REACH * gamma, MAX_GAMMA), remaining)


def tree_members(spec: str | None) -> list[str]:
    """A tree's drafters, in merge order, from "draft,suffix" (None or "": the default).
    The draft model, when there, goes first: it may be sampled (see above)."""
    members = [m.strip() for m in (spec or DEFAULT_MEMBERS).split(",") if m.strip()]
    if (not members or any(m not in MEMBERS for m in members) or len(set(members)) != len(members)
            or "draft" in members[1:] or sum(m in HEADS for m in members) > 1):
        raise InvalidRequest(f"a tree merges distinct drafters of {', '.join(MEMBERS)}, the draft model first and "
                             f"one kind of heads at most (e.g. {DEFAULT_MEMBERS!r}); got {spec!r}")
    return members


def merge_trees(tokens: list[int], parents: list[int], point: list[bool]) -> tuple[list[int], list[int]]:
    """The inputs concatenated, in order: node i has token ``tokens[i]``, parent
    ``parents[i]`` (an earlier index into the concatenation, -1 for the root), and is a
    point mass when ``point[i]``. Returns the merged tree as (each merged node's index in
    the concatenation, its parent in the merged tree). Plain lists: it runs per round."""
    kept: list[int] = []
    merged_parents: list[int] = []
    where: dict[int, int] = {}  # input node -> merged node; absent: dropped with its subtree
    child_of: dict[tuple[int, int], int] = {}  # (merged parent, token) -> the first merged node there
    for i, (token, parent) in enumerate(zip(tokens, parents)):
        if parent >= 0 and parent not in where:
            continue  # below a ghost: unreachable
        at = where[parent] if parent >= 0 else -1
        first = child_of.get((at, token))
        if first is not None and point[i]:
            where[i] = first
            continue
        kept.append(i)
        merged_parents.append(at)
        if first is None:
            child_of[at, token] = where[i] = len(kept) - 1
        # else: a sampled duplicate, kept as a ghost leaf; its descendants are not mapped.
    return kept, merged_parents


def point_masses(q: SparseQ | None, n: int) -> list[bool]:
    """Which of n drafts are point masses: all when q is None, else rows whose q' is one-hot."""
    if q is None:
        return [True] * n
    return (((q.levels > 0).sum(-1) == 1) & (q.tail_weight == 0)).tolist()


def one_hot(token: int, vocab: int) -> SparseQ:
    """The point mass on ``token`` as a q' row ([1, 1])."""
    return SparseQ.of(torch.tensor([[token]]), torch.tensor([[LEVELS]], dtype=torch.uint8), torch.tensor([0]), vocab)


def merge_proposals(proposals: list[Proposal], device: torch.device | str = "cpu") -> Proposal:
    """One token tree from ``proposals``, earlier ones first at every node (see above)."""
    proposals = [p for p in proposals if len(p)]
    if not proposals:
        return Proposal.empty(device)
    if len(proposals) == 1 and proposals[0].is_chain:
        return proposals[0]  # nothing to merge
    tokens, parents, point, rows = [], [], [], []
    for p in proposals:
        start = len(tokens)
        shape = p.tree.parents if p.tree is not None else tuple(range(-1, len(p) - 1))
        tokens += p.tokens.tolist()
        parents += [-1 if up < 0 else start + up for up in shape]
        point += point_masses(p.draft_q, len(p))
        rows += [(p.draft_q, i) for i in range(len(p))]
    kept, merged_parents = merge_trees(tokens, parents, point)
    draft_q = None
    if not all(point[i] for i in kept):
        vocab = next(q.vocab for q, _ in rows if q is not None)
        draft_q = SparseQ.stack([_row(*rows[i], tokens[i], vocab) for i in kept])
    shape = tree_shape(tuple(merged_parents))
    return Proposal(tokens=torch.tensor([tokens[i] for i in kept], dtype=torch.long, device=device), draft_q=draft_q,
                    tree=None if shape.is_chain else shape)


def with_branches(proposal: Proposal, branches: int) -> Proposal:
    """A draft chain with its ``branches`` likeliest tokens at each depth (its
    alternatives) as point-mass leaves beside the drafted one: the draft model's top-k
    branches, at no extra draft step. The leaf equal to the drafted token merges into it."""
    return merge_proposals([_with_leaves(proposal, branches)], proposal.tokens.device)


def _with_leaves(proposal: Proposal, branches: int) -> Proposal:
    """``with_branches`` before the merge: the leaves appended, duplicates and all (the
    tree's one merge dedups them with everything else)."""
    alts = proposal.alternatives
    if branches <= 1 or alts is None or not proposal.is_chain or not len(proposal):
        return proposal
    n = len(proposal)
    leaves = alts.ids[:n, :branches].reshape(-1)  # [n * branches]
    leaf_parents = torch.arange(-1, n - 1).repeat_interleave(min(branches, alts.ids.shape[1]))
    q = proposal.draft_q
    if q is not None:
        q = SparseQ.stack([_row(q, i, 0, q.vocab) for i in range(n)] + [one_hot(int(t), q.vocab) for t in leaves])
    return Proposal(tokens=torch.cat([proposal.tokens, leaves.to(proposal.tokens.device)]), draft_q=q,
                    tree=tree_shape(tuple(range(-1, n - 1)) + tuple(leaf_parents.tolist())))


def _row(q: SparseQ | None, i: int, token: int, vocab: int) -> SparseQ:
    if q is None:
        return one_hot(token, vocab)
    return SparseQ.of(q.ids[i : i + 1], q.levels[i : i + 1], q.tail_weight[i : i + 1], vocab)


class TreeProposer:
    """Drafts with every member and merges their proposals, the first member's first at
    every node. A chain with alternatives (the draft model's) adds its top ``branches``
    tokens at each depth. On a served verifier the draft model runs on a draft worker:
    its chain arrives with the round and goes first (``drafted_elsewhere``), ahead of
    the members here (the lookups).

    Per-sequence state is the tuple of the members' states. One member may read the
    target's hidden states (heads on the verifier): the tree then reads them as that
    member does, and passes them on (``observe``)."""

    def __init__(self, members: list[Proposer], branches: int = DEFAULT_BRANCHES, device: torch.device | str = "cpu",
                 drafted_elsewhere: bool = False):
        self.members, self.branches, self.device = list(members), branches, device
        self.drafted_elsewhere = drafted_elsewhere
        readers = [i for i, m in enumerate(self.members) if getattr(m, "uses_target_hidden", False)]
        if len(readers) > 1:
            raise ValueError("a tree takes one kind of heads at most: each reads its own hidden states")
        self.reader = readers[0] if readers else None
        self.uses_target_hidden = self.reader is not None
        if self.reader is not None:
            self.target_hidden = getattr(self.members[self.reader], "target_hidden", FINAL)
        # Pool room a round's tree may take: a chain, with its alternatives, at most 1 + branches nodes a depth.
        chain = MAX_GAMMA * (1 + max(branches, 0))
        self.max_nodes = sum(getattr(m, "max_nodes", chain) for m in self.members) + (chain if drafted_elsewhere else 0)

    def new_state(self) -> tuple:
        return tuple(m.new_state() for m in self.members)

    def observe(self, state: tuple, start: int, hidden) -> None:
        """The target's hidden states, for the member that drafts from them."""
        self.members[self.reader].observe(state[self.reader], start, hidden)

    def restore_state(self, chunks: list[KVChunk]) -> tuple:
        return tuple(m.restore_state(chunks) for m in self.members)

    def propose(self, state: tuple, committed: list[int], gamma: int, params: SamplingParams,
                stop: StopCheck | None = None, drafted: Proposal | None = None, lookup_gamma: int | None = None) -> Proposal:
        """``drafted``: the chain drafted elsewhere for this round, merged first.
        ``lookup_gamma``: how deep the lookups may go (None: ``gamma``; the engine passes
        LOOKUP_REACH x gamma within the request's token budget)."""
        deep = gamma if lookup_gamma is None else lookup_gamma
        proposals = [m.propose(s, committed, deep if isinstance(m, (SuffixProposer, NgramProposer)) else gamma, params, stop)
                     for m, s in zip(self.members, state)]
        if drafted is not None:
            proposals.insert(0, drafted)
        return merge_proposals([_with_leaves(p, self.branches) for p in proposals], self.device)
