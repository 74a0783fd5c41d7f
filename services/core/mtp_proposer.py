"""MTP drafting on the verifier (DeepSeek-V3's multi-token prediction modules).

Depth k (k = 1..D) is one module: at position j it takes the previous depth's hidden
state there, h^{k-1}_j (h^0 = the target's final hidden state), and the embedding of
the token k positions on, x_{j+k}; RMSNorms both, concatenates, projects back to the
hidden size, runs one transformer block (causal attention over the depth's own KV
cache) and predicts x_{j+k+1} through the target's LM head:

    h^k_j = Block_k(W_k [norm(emb(x_{j+k})); norm(h^{k-1}_j)]),  p_k(x_{j+k+1}) = head(norm_k(h^k_j))

With committed tokens x_0..x_P the target has given h^0 up to F = P - 1 (h^0_F chose
x_P). Drafting runs every depth at position F: depth 1 reads x_P, depth k reads
d_{k-1}, the token depth k-1 just drafted, so the chain d_1..d_D comes out of one
pass per depth. A depth's cache keeps only entries whose token x_{j+k} is committed
(j <= P - k); the few "frontier" entries built on drafted tokens are computed with
the round's pass and cropped after it, and recomputed with the true tokens once they
are committed. So every round runs each depth once over the newly committed positions
plus at most D - 1 frontier positions, and nothing is ever recomputed from scratch.

Depths beyond the shipped modules reuse the last module (checkpoints usually ship
one), each depth with its own cache. A tree branches by top-k at each depth along
the top-1 path (``tree_of_candidates``), as Medusa's heads do; every node is a point
mass to the acceptor, so sampling stays lossless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .head_proposers import PlannedTree, tree_of_candidates
from .tree_planner import TreePlanner
from .kv_chunks import KVChunk
from .proposals import Proposal
from .sampling import SamplingParams
from .target import FINAL
from .tree import ChoiceTree


class MtpModules(Protocol):
    target_hidden: str  # which of the target's hidden states depth 1 reads (core/target.py HIDDEN_KINDS)

    def new_cache(self) -> object: ...  # one depth's KV, grown by run_depth

    def truncate(self, cache, length: int) -> None: ...  # keep the first ``length`` entries

    def run_depth(self, depth: int, hidden: torch.Tensor, tokens: torch.Tensor, first: int, cache) -> torch.Tensor:
        """Depth ``depth`` (0-based) at positions first.. : hidden [n, H] = h^{depth},
        tokens [n] = x_{j+depth+1}; appends n entries to ``cache``; returns h^{depth+1} [n, H]."""

    def logits(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V]: what depth ``depth`` predicts from its output."""


@dataclass
class MtpState:
    base: int = -1  # the first position the caches hold (-1: nothing seen yet)
    # Per depth k (0-based): positions [base, done[k]) are in its cache, built on committed tokens.
    done: list[int] = field(default_factory=list)
    # Per depth k: its committed inputs h^k for positions [done[k], ...) not yet consumed;
    # pending[0] is the target's hidden states up to F.
    pending: list[torch.Tensor | None] = field(default_factory=list)
    caches: list = field(default_factory=list)
    length: int = 0  # len(committed) the target's states reach: a stale state drafts nothing
    # The last drafting's per-depth logits [D, V] and the length they were drafted at: the
    # pass consumes the pending states, so proposing again before a verify reuses them.
    drafted_logits: tuple[int, torch.Tensor] | None = None
    drafted: ChoiceTree | None = None  # the tree the last round drafted (what its path indexes)


class MtpProposer(PlannedTree):
    uses_target_hidden = True

    def __init__(self, modules: MtpModules, tree: ChoiceTree, device: torch.device | str = "cpu",
                 planner: TreePlanner | None = None):
        """A ``planner`` plans trees no deeper than ``tree``: each depth is a module run."""
        self.modules, self.tree, self.device, self.planner = modules, tree, device, planner
        self.depths = tree.shape.max_depth
        self.target_hidden = getattr(modules, "target_hidden", FINAL)
        self.vocab = getattr(modules, "draft_vocab", None)  # [V'] token ids of the logits, or None

    def new_state(self) -> MtpState:
        return MtpState()

    def restore_state(self, chunks: list[KVChunk]) -> MtpState:
        return MtpState()  # rebuilt from the target's next hidden states (a shorter context at first)

    def observe(self, state: MtpState, start: int, hidden: torch.Tensor) -> None:
        """``hidden`` [n, H]: the target's hidden states (``target_hidden``'s kind) at
        positions start.. (row i chose token start+i+1). Contiguous rows extend the state; a gap (a failover, a
        prefix served from cache) starts it afresh at ``start``."""
        if state.base < 0 or start != state.done[0] + _rows(state.pending[0]):
            state.base = start
            state.done = [start] * self.depths
            state.pending = [None] * self.depths
            state.caches = [self.modules.new_cache() for _ in range(self.depths)]
        state.pending[0] = _cat(state.pending[0], hidden)
        state.drafted_logits = None
        state.length = start + len(hidden) + 1

    @torch.inference_mode()
    def propose(self, state: MtpState, committed: list[int], gamma: int, params: SamplingParams,
                stop=None) -> Proposal:
        """A tree no deeper than ``gamma`` after ``committed``: each depth runs once."""
        if state.base < 0 or state.length != len(committed) or gamma <= 0:
            state.drafted = None
            return Proposal.empty(self.device)
        tree = self.round_tree(state, gamma)
        if tree is None:
            return Proposal.empty(self.device)
        if state.drafted_logits is not None and state.drafted_logits[0] == len(committed):
            return tree_of_candidates(tree, state.drafted_logits[1], self.device, self.vocab)
        P = len(committed) - 1
        F = P - 1  # the drafting position: h^0_F chose x_P
        lo = min(state.done)  # no depth reads a token before lo + 1: convert only the tail
        ext = torch.tensor(committed[lo:], dtype=torch.long)
        carry = None  # this round's frontier outputs of the depth before (built on drafts)
        logits = []
        for k in range(self.depths):
            rows = _cat(state.pending[k], carry)  # h^k for positions [done[k], F]
            first = state.done[k]
            tokens = ext[first + k + 1 - lo : F + k + 2 - lo].to(rows.device)  # x_{j+k+1} (committed, then drafts)
            out = self.modules.run_depth(k, rows, tokens, first, state.caches[k])  # h^{k+1} [n, H]
            logits.append(self.modules.logits(k, out[-1]))
            # Keep the entries whose token is committed (j + k + 1 <= P); crop the frontier.
            commit = max(0, min(len(rows), P - k - first))
            self.modules.truncate(state.caches[k], first + commit - state.base)
            state.done[k] = first + commit
            kept = state.pending[k]  # committed inputs not yet consumed (never the frontier's)
            state.pending[k] = kept[commit:] if _rows(kept) > commit else None
            if k + 1 < self.depths:
                state.pending[k + 1] = _cat(state.pending[k + 1], out[:commit])
                carry = out[commit:]
            top = logits[-1].argmax(-1, keepdim=True)
            ext = torch.cat([ext, (top if self.vocab is None else self.vocab[top]).cpu()])  # d_{k+1}: the top-1 path
        state.drafted_logits = (len(committed), torch.stack(logits))
        return tree_of_candidates(tree, state.drafted_logits[1], self.device, self.vocab)


def _rows(x: torch.Tensor | None) -> int:
    return 0 if x is None else len(x)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or len(a) == 0:
        return b
    if b is None or len(b) == 0:
        return a
    return torch.cat([a, b])
