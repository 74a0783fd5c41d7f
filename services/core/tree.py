"""A draft tree's shape, as data, turned once into index buffers (as Medusa does).

Nodes are numbered so that a parent precedes its children; ``parents[i]`` is node i's
parent, -1 for a child of the root (the last committed token). A chain is the tree
``parents = (-1, 0, 1, ..., N-2)``. Everything the hot path needs from a shape (depths,
the ancestor mask for tree attention, each node's children in sibling order) is built
here once per distinct shape and cached, so that verification and acceptance index
tensors and never walk nodes in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True, eq=False)
class TreeShape:
    parents: tuple[int, ...]
    depth: torch.Tensor  # [N] int64, 1 for the root's children
    ancestors: torch.Tensor  # [N, N] bool: [i, j] = node j is node i or one of its ancestors
    children: torch.Tensor  # [N+1, S] int64: row 0 the root, row i+1 node i; children in sibling order, -1 pads
    sibling_rank: torch.Tensor  # [N] int64, node i's place among its parent's children

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max()) if len(self) else 0

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, len(self) - 1))

    def prune(self, max_depth: int) -> tuple["TreeShape", tuple[int, ...]]:
        """The subtree of nodes at depth <= max_depth, and the kept nodes' old indices."""
        return _prune(self.parents, max_depth)


@lru_cache(maxsize=512)
def tree_shape(parents: tuple[int, ...]) -> TreeShape:
    n = len(parents)
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i}'s parent {parent} must precede it (or be -1, the root)")
    depth = [0] * n
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    kids: list[list[int]] = [[] for _ in range(n + 1)]
    rank = [0] * n
    for i, parent in enumerate(parents):
        depth[i] = 1 if parent < 0 else depth[parent] + 1
        if parent >= 0:
            ancestors[i] = ancestors[parent]
        ancestors[i, i] = True
        rank[i] = len(kids[parent + 1])
        kids[parent + 1].append(i)
    width = max(1, max(len(k) for k in kids))
    children = torch.full((n + 1, width), -1, dtype=torch.long)
    for row, k in enumerate(kids):
        children[row, : len(k)] = torch.tensor(k, dtype=torch.long)
    return TreeShape(tuple(parents), torch.tensor(depth, dtype=torch.long), ancestors, children,
                     torch.tensor(rank, dtype=torch.long))


def chain(n: int) -> TreeShape:
    return tree_shape(tuple(range(-1, n - 1)))


@lru_cache(maxsize=512)
def _prune(parents: tuple[int, ...], max_depth: int) -> tuple[TreeShape, tuple[int, ...]]:
    shape = tree_shape(parents)
    kept = tuple(i for i in range(len(parents)) if int(shape.depth[i]) <= max_depth)
    new_index = {old: new for new, old in enumerate(kept)}
    return tree_shape(tuple(-1 if parents[i] < 0 else new_index[parents[i]] for i in kept)), kept


@dataclass(frozen=True, eq=False)
class ChoiceTree:
    """A tree given as Medusa's "choices": one path of candidate ranks per node, e.g.
    ``(0,)`` the top candidate at depth 1, ``(0, 1)`` the second candidate at depth 2
    under it. A head drafter fills node i with the ``rank[i]``-th candidate of the head
    for depth ``shape.depth[i]``: one gather for the whole tree."""

    choices: tuple[tuple[int, ...], ...]  # in node order
    shape: TreeShape
    rank: torch.Tensor  # [N] int64 candidate rank of each node

    @property
    def label(self) -> str:
        widths = [int((self.shape.depth == d).sum()) for d in range(1, self.shape.max_depth + 1)]
        return f"tree{len(self.shape)}:" + "-".join(map(str, widths))

    def prune(self, max_depth: int) -> "ChoiceTree":
        return choice_tree(tuple(c for c in self.choices if len(c) <= max_depth))


@lru_cache(maxsize=64)
def choice_tree(choices: tuple[tuple[int, ...], ...]) -> ChoiceTree:
    ordered = sorted({tuple(c) for c in choices}, key=lambda c: (len(c), c))
    if any(not c or min(c) < 0 for c in ordered):
        raise ValueError("every tree choice is a non-empty path of candidate ranks >= 0")
    index = {c: i for i, c in enumerate(ordered)}
    missing = [c for c in ordered if len(c) > 1 and c[:-1] not in index]
    if missing:
        raise ValueError(f"tree choices {missing} lack their parent paths")
    parents = tuple(-1 if len(c) == 1 else index[c[:-1]] for c in ordered)
    rank = torch.tensor([c[-1] for c in ordered], dtype=torch.long)
    return ChoiceTree(tuple(ordered), tree_shape(parents), rank)


def parse_choices(text: str) -> tuple[tuple[int, ...], ...]:
    """'0;1;0.0;0.1' -> ((0,), (1,), (0, 0), (0, 1)): paths separated by ';', ranks by '.'."""
    try:
        return tuple(tuple(int(r) for r in path.split(".")) for path in text.replace(" ", "").split(";") if path)
    except ValueError:
        raise ValueError(f"tree choices {text!r}: write paths of ranks like '0;1;0.0;0.1'") from None


def format_choices(choices: tuple[tuple[int, ...], ...]) -> str:
    return ";".join(".".join(map(str, c)) for c in choices)
