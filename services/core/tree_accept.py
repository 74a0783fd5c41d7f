"""Acceptance of drafted token trees, for a whole batch at once, on the target's device.

Lossless recursive rejection sampling over siblings (SpecInfer's multi-step speculative
sampling, Miao et al. 2024; Jeon et al. 2024's recursive rejection sampling). With p_v
the target's adjusted distribution after node v (the root is the last committed token):

    r <- p_root; at the current node, try its children c_1, c_2, ... in sibling order:
        accept c_k (token x, drawn from q_k) with probability min(1, r(x) / q_k(x));
            then move to c_k, r <- p_{c_k}, and try c_k's children;
        on rejection, r <- norm(max(0, r - q_k)) and try the next sibling.
    When every child is rejected, emit a token from r; at a leaf, a bonus token from p_leaf.

Each child must be drawn from its q independently of its siblings. A child chosen
deterministically (a head's top-k candidate, an n-gram) has q = one-hot on x: it is
accepted with probability r(x), and on rejection r loses x and is renormalised. By
induction over the tried children the emitted token at every depth is distributed as
p there (the chain rule of core/rejection.py is the one-child case). Greedy rows accept
a child iff its token is the target's argmax at the current node, and emit the argmax.

The walk is a loop over depth levels and sibling ranks, vectorised over rows and
nodes: no per-node Python and one host sync, made by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rejection import DraftBatch, Randomness
from .sampling import SamplingRows, adjusted_probs_rows, sample_from
from .tree import TreeShape, chain


@dataclass(frozen=True)
class TreeBatch:
    """Every row's tree shape as one padded index buffer."""

    children: torch.Tensor  # [B, N+1, S] int64: row 0 the root, row i+1 node i; -1 pads
    max_depth: int  # the deepest tree in the batch

    @classmethod
    def of(cls, shapes: list[TreeShape | None], sizes: list[int], device: torch.device | str) -> "TreeBatch":
        """shapes[b]: row b's tree, None for a chain of sizes[b] nodes."""
        shapes = [chain(n) if shape is None else shape for shape, n in zip(shapes, sizes)]
        N = max(sizes, default=0)
        S = max(shape.children.shape[1] for shape in shapes) if shapes else 1
        children = torch.full((len(shapes), N + 1, S), -1, dtype=torch.long)
        for b, shape in enumerate(shapes):
            children[b, : len(shape) + 1, : shape.children.shape[1]] = shape.children
        return cls(children.to(device), max((shape.max_depth for shape in shapes), default=0))


def accept_tree_batch(logits: torch.Tensor, drafts: DraftBatch, trees: TreeBatch, rows: SamplingRows,
                      rand: Randomness, consume: bool = False) -> torch.Tensor:
    """logits [B, N+1, V]: row b's target logits at its root (slot 0) and after each of
    its nodes (slot i+1). ``rand.uniforms[b, i]`` tests node i. Returns [B, 2 + D] int64:
    (accepted depth n_b, the token emitted after the path, the path's nodes padded with -1).
    ``consume``: the logits are the caller's to overwrite (``adjusted_probs_rows``)."""
    B, N1, V = logits.shape
    device = logits.device
    ar = torch.arange(B, device=device)
    cur = torch.full((B,), -1, dtype=torch.long, device=device)  # the current node, -1 = root
    done = torch.zeros(B, dtype=torch.bool, device=device)
    path = torch.full((B, trees.max_depth), -1, dtype=torch.long, device=device)
    best = logits.argmax(-1) if rows.greedy_rows else None  # [B, N+1]
    p = adjusted_probs_rows(logits, rows, consume) if rows.any_sampled else None  # [B, N+1, V]
    r = p[:, 0].clone() if p is not None else None  # the residual at the current node, unnormalised
    mass = torch.ones(B, device=device)  # its total
    for level in range(trees.max_depth):
        moved = torch.zeros(B, dtype=torch.bool, device=device)
        for sibling in range(trees.children.shape[-1]):
            child = trees.children[ar, cur + 1, sibling]  # [B]
            live = (child >= 0) & ~done & ~moved
            if device.type == "cpu" and not bool(live.any()):
                break  # (free on CPU; on a GPU this check would be a sync per step)
            node = child.clamp(min=0)
            x = drafts.tokens[ar, node]  # [B]
            ok = torch.zeros(B, dtype=torch.bool, device=device)
            if best is not None:
                ok = x == best[ar, cur + 1]
            if p is not None:
                q_x = drafts.q_at(node, x)  # [B]
                # min(1, (r(x)/mass) / q(x)) > u  <=>  u * q(x) * mass < r(x)
                sampled_ok = rand.uniforms[ar, node] * q_x * mass < r[ar, x]
                ok = torch.where(rows.greedy, ok, sampled_ok)
                rejected = live & ~ok
                # r <- max(0, r - q) in normalised terms: r - mass * q unnormalised (r is
                # this walk's own tensor: updated in place, the rows not rejected unchanged).
                r = drafts.residual_(r, node, mass * rejected)
                mass = torch.where(rejected, r.sum(-1), mass)
            ok = ok & live
            cur = torch.where(ok, child, cur)
            path[:, level] = torch.where(ok, child, path[:, level])
            moved |= ok
            if p is not None:
                r = torch.where(ok[:, None], p[ar, cur + 1], r)
                mass = torch.where(ok, 1.0, mass)
        done |= ~moved
    n = (path >= 0).sum(-1)
    if p is None:
        token = best[ar, cur + 1]
    else:
        # r is nonzero whenever a rejection can happen; guard float round-off.
        r = torch.where((r.sum(-1) > 0)[:, None], r, p[ar, cur + 1])
        token = sample_from(r, rand.final)
        if best is not None:
            token = torch.where(rows.greedy, best[ar, cur + 1], token)
    return torch.cat([n[:, None], token[:, None], path], -1)

