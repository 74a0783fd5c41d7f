"""A drafting-head tree chosen from measurement, re-planned as the measurements move
(in the spirit of Sequoia's dynamic program, Chen et al. 2024).

A head tree (core/tree.py ``ChoiceTree``) puts the rank-r candidate of depth d's head
under a parent path. What a round gains from a node is the probability that the walk
accepts it: P(node) = P(parent) * c(node), with c(node) the chance that, once its
parent is accepted, this child is the one accepted. The planner counts c per path from
the rounds it sees (a child counts as tried when its parent was accepted and it was in
the tree), shrunk towards the pooled count of its (depth, rank) so that a path seen
rarely, or never, borrows from its position:

    c(path) = (hits + M * c_pos) / (tries + M),   c_pos = (hits_pos + 0.5) / (tries_pos + 5)

capped by c_pos of the rank before (candidates come likeliest first), so a rank never
tried is not credited above the ranks that were.

Expected accepted tokens of a tree, E = sum of P over its nodes, is monotone along
every path (a child never beats its parent), so growing the tree best node first gives
the best tree of each size. The plan is the size n that maximises (1 + E_n) / T(n),
with T(n) one verify pass over n nodes measured on this device; when no size beats
plain decoding, 1 / T(0), the plan is to draft nothing.

The per-path counts, not a product of per-rank rates, are what make the prediction
honest: heads' errors are correlated (a miss at depth 1 predicts misses below it).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .tree import ChoiceTree, choice_tree

AUTO_TREE = "auto"  # how a request or the CLI asks for a planned tree
SHRINK = 4.0  # M: pseudo-tries a path's own count is shrunk towards its position's with
# A position never tried counts as 0.1: worth a try where nodes are cheap, not where they
# are dear. (At 0.5, the first plan of the bundled Medusa heads tried every rank and
# accepted 0.76x what it predicted over 600 rounds.)
PRIOR_HITS, PRIOR_TRIES = 0.5, 5.0
REPLAN_EVERY = 32  # rounds between plans
PROBE_EVERY = 4  # plans' worth of rounds without drafting between probes


class TreePlanner:
    """One per replica and head kind: sessions share what it measures."""

    def __init__(self, initial: ChoiceTree, cost: np.ndarray, max_depth: int, max_rank: int = 8,
                 replan_every: int = REPLAN_EVERY):
        """``cost[n]``: a verify pass over n nodes relative to one over none (n up to
        the largest tree it may plan); ``initial``: the tree until it has measured."""
        self.cost = np.asarray(cost, dtype=np.float64)
        self.max_depth, self.max_rank, self.replan_every = max_depth, max_rank, replan_every
        self.initial = initial
        self.tree: ChoiceTree | None = initial  # None: drafting does not pay
        self.planned = False  # ``tree`` is still ``initial``, not a plan
        self.predicted = 0.0  # the plan's expected tokens a round (1 + E)
        self.tries: dict[tuple[int, ...], int] = defaultdict(int)
        self.hits: dict[tuple[int, ...], int] = defaultdict(int)
        self.rounds = 0
        # Rounds drafted with a plan: its prediction and the tokens they accepted + 1, summed.
        self.predicted_tokens = self.measured_tokens = 0.0

    def observe(self, tree: ChoiceTree, accepted: tuple[int, ...]) -> None:
        """A round drafted ``tree`` and accepted the path ``accepted`` (candidate ranks,
        root to leaf)."""
        on_path = {accepted[:k] for k in range(len(accepted) + 1)}
        for choice in tree.choices:
            if choice[:-1] in on_path:
                self.tries[choice] += 1
                self.hits[choice] += choice in on_path
        if self.planned and tree is self.tree:
            self.predicted_tokens += self.predicted
            self.measured_tokens += len(accepted) + 1
        self.rounds += 1
        if self.rounds % self.replan_every == 0:
            self.plan()

    def idle(self) -> None:
        """A round drafted nothing because the plan said so. Now and then the tuned tree
        comes back for a plan's worth of rounds, so that a text turned predictable again
        is measured again; the next plan decides anew."""
        self.rounds += 1
        if self.tree is None and self.rounds % (PROBE_EVERY * self.replan_every) == 0:
            self.tree, self.planned = self.initial, False

    def plan(self) -> ChoiceTree | None:
        """Re-plan from everything measured; sets and returns ``tree``."""
        chance = self._chances()
        frontier = {(r,): chance((r,)) for r in range(self.max_rank)}
        chosen: list[tuple[int, ...]] = []
        expected, best = 0.0, (1.0 / self.cost[0], None, 0.0)  # plain decoding: 1 token a pass
        while frontier and len(chosen) < len(self.cost) - 1:
            path = max(frontier, key=lambda p: (frontier[p], -len(p)))
            prob = frontier.pop(path)
            chosen.append(path)
            expected += prob
            if len(path) < self.max_depth:
                frontier.update({path + (r,): prob * chance(path + (r,)) for r in range(self.max_rank)})
            score = (1.0 + expected) / self.cost[len(chosen)]
            if score > best[0]:
                best = (score, tuple(chosen), expected)
        self.tree = choice_tree(best[1]) if best[1] else None
        self.predicted, self.planned = 1.0 + best[2], True
        return self.tree

    def _chances(self):
        """c() with the positions' pooled counts computed once."""
        pos_tries: dict[tuple[int, int], int] = defaultdict(int)
        pos_hits: dict[tuple[int, int], int] = defaultdict(int)
        for path, n in self.tries.items():
            pos_tries[len(path), path[-1]] += n
            pos_hits[len(path), path[-1]] += self.hits[path]

        # Candidates come likeliest first: a rank is never credited above the rank before it.
        pooled = {}
        for depth in range(1, self.max_depth + 1):
            cap = 1.0
            for rank in range(self.max_rank):
                key = (depth, rank)
                cap = pooled[key] = min(cap, (pos_hits[key] + PRIOR_HITS) / (pos_tries[key] + PRIOR_TRIES))

        def chance(choice: tuple[int, ...]) -> float:
            prior = pooled[len(choice), choice[-1]]
            return (self.hits.get(choice, 0) + SHRINK * prior) / (self.tries.get(choice, 0) + SHRINK)

        return chance

    @property
    def max_nodes(self) -> int:
        """The largest tree it may plan."""
        return len(self.cost) - 1

    @property
    def measured_over_predicted(self) -> float | None:
        """Committed tokens a round over the plan's prediction, across planned rounds."""
        return self.measured_tokens / self.predicted_tokens if self.predicted_tokens else None
