"""SuffixDecoding (Oliaro et al., 2024, arXiv 2411.04975): a model-free proposer that
drafts from suffix tries over earlier token sequences.

Two indices serve each session: one shared by every session of a verifier replica over
their outputs (agentic and repetitive workloads repeat earlier outputs), and a private
one over the session's own prompt and output. The longest suffix of the context seen
followed by something is matched in each; from the match a candidate tree grows
greedily by estimated path probability (counts of continuations), its size bounded by
alpha * match length (the paper's MAX_SPEC), and the index whose tree has the higher
expected accepted length (the sum of path probabilities) wins. Candidates are chosen
deterministically, so each is a point mass to the tree acceptor: lossless when sampling.

Hand-written because no maintained Python library offers an incremental, depth-limited
token trie with occurrence counts, exact eviction under a memory cap and rollback.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .kv_chunks import KVChunk
from .proposals import Proposal
from .sampling import SamplingParams
from .tree import tree_shape

# How far back a session's indexed tokens are checked against the committed ones: a
# pipelined draft worker proposes after guessed tokens (core/pipeline.py) and the
# verifier may refute up to a round's drafts and the guess.
_RECHECK = 64


class _Node:
    # out: occurrences followed by a token (the sum of the children's counts), the
    # denominator of a continuation's probability: an occurrence at a sequence's end
    # (the session's own context, always) says nothing about what follows.
    __slots__ = ("children", "count", "out", "parent", "token", "depth")

    def __init__(self, parent: "_Node | None", token: int, depth: int):
        self.children: dict[int, _Node] | None = None
        self.count = self.out = 0
        self.parent, self.token, self.depth = parent, token, depth


class _Seq:
    __slots__ = ("tokens", "start", "active")

    def __init__(self):
        self.tokens: list[int] = []
        self.start = 0  # occurrences starting before this were evicted (the front trimmed)
        self.active: list[_Node] = []  # the nodes of its suffixes, shortest first


@dataclass(frozen=True)
class Draft:
    tokens: list[int]
    parents: list[int]  # a parent precedes its children; siblings by descending prob
    probs: list[float]  # each node's estimated path probability
    match_len: int

    @property
    def score(self) -> float:
        return sum(self.probs)  # the expected number of accepted tokens


class SuffixIndex:
    """Counts of every substring of up to ``max_depth`` tokens of the sequences it holds.

    At most ``max_nodes`` trie nodes and ``max_tokens`` stored tokens: appending past
    either evicts the least recently appended sequences whole (a sequence alone over the
    cap loses its oldest tokens). Thread-safe."""

    def __init__(self, max_depth: int = 32, max_nodes: int = 1 << 20, max_tokens: int | None = None):
        max_tokens = max_nodes if max_tokens is None else max_tokens
        # A sequence's last max_depth suffixes are never evicted while it grows: room for them.
        if max_depth < 2 or max_nodes < max_depth * (max_depth + 3) // 2 or max_tokens <= max_depth:
            raise ValueError("need max_depth >= 2, max_nodes >= D(D+3)/2 and max_tokens > D")
        self.max_depth, self.max_nodes, self.max_tokens = max_depth, max_nodes, max_tokens
        self._root = _Node(None, -1, 0)
        self._seqs: OrderedDict[int, _Seq] = OrderedDict()  # least recently appended first
        self._next = 0
        self._nodes = self._tokens = 0
        self._lock = threading.Lock()

    @property
    def num_nodes(self) -> int:
        return self._nodes

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def sequences(self) -> list[int]:
        with self._lock:
            return list(self._seqs)

    def new_sequence(self) -> int:
        with self._lock:
            self._next += 1
            return self._next

    def append(self, seq: int, tokens) -> None:
        """Extend sequence ``seq`` (started afresh if unknown or evicted)."""
        if not len(tokens):
            return
        with self._lock:
            s = self._seqs.pop(seq, None) or _Seq()
            self._seqs[seq] = s  # now the most recently used
            for t in tokens:
                self._make_room(seq, s, 1 + sum(a.depth < self.max_depth for a in s.active))
                nodes = [self._root] + s.active
                s.active = [self._inc(a, int(t)) for a in nodes if a.depth < self.max_depth]
                s.tokens.append(int(t))
                self._tokens += 1

    def pop(self, seq: int, n: int) -> None:
        """Drop the last ``n`` tokens of ``seq`` (refuted guesses)."""
        with self._lock:
            s = self._seqs.get(seq)
            for _ in range(n if s else 0):
                if len(s.tokens) <= s.start:
                    break
                for a in s.active:
                    self._dec(a)
                s.tokens.pop()
                self._tokens -= 1
                s.active = [a.parent for a in s.active if a.depth > 1]
                j = len(s.tokens) - self.max_depth  # the suffix that fits again
                if j >= s.start:
                    s.active.append(self._find(s.tokens[j:]))

    def remove(self, seq: int) -> None:
        with self._lock:
            if seq in self._seqs:
                self._evict(seq)

    def tail(self, seq: int, n: int) -> list[int]:
        with self._lock:
            s = self._seqs.get(seq)
            return s.tokens[max(s.start, len(s.tokens) - n):] if s and n > 0 else []

    def count(self, tokens) -> int:
        """Occurrences of ``tokens`` (0 if longer than max_depth)."""
        with self._lock:
            node = self._find(tokens)
            return node.count if node is not None else 0

    def match(self, context, max_len: int | None = None) -> tuple[_Node | None, int]:
        """The node of the longest suffix of ``context`` (at most ``max_len`` tokens)
        seen followed by a token, and its length; (None, 0) if none."""
        with self._lock:
            return self._match(context, max_len)

    def speculate(self, context, gamma: int, budget: int, alpha: float = 1.0,
                  min_prob: float = 0.1) -> Draft | None:
        """A candidate tree after ``context``: at most min(budget, ceil(alpha * match
        length)) nodes, no deeper than ``gamma``, every path probability >= min_prob."""
        if gamma <= 0 or budget <= 0:
            return None
        with self._lock:
            # Leave the tree room to grow gamma deep below the match (the trie ends at max_depth).
            node, length = self._match(context, max(1, self.max_depth - min(gamma, budget)))
            if node is None:
                return None
            size = min(budget, math.ceil(alpha * length))
            tokens: list[int] = []
            parents: list[int] = []
            probs: list[float] = []
            heap: list = []
            order = itertools.count()  # ties go to the earlier pushed: siblings keep their order
            self._push(heap, order, node, 1.0, -1, 1, min_prob)
            while heap and len(tokens) < size:
                negp, _, child, parent, depth = heapq.heappop(heap)
                tokens.append(child.token)
                parents.append(parent)
                probs.append(-negp)
                if depth < gamma and child.out:
                    self._push(heap, order, child, -negp, len(tokens) - 1, depth + 1, min_prob)
        return Draft(tokens, parents, probs, length) if tokens else None

    def _push(self, heap: list, order, node: _Node, prob: float, parent: int, depth: int, min_prob: float) -> None:
        # Path probabilities only shrink downwards: a child under min_prob is never taken.
        for child in node.children.values():
            p = prob * child.count / node.out
            if p >= min_prob:
                heapq.heappush(heap, (-p, next(order), child, parent, depth))

    def _match(self, context, max_len: int | None) -> tuple[_Node | None, int]:
        hi = min(self.max_depth - 1, len(context), self.max_depth if max_len is None else max_len)
        # Monotone in the length: if s is followed by x, so is every suffix of s.
        lo, best = 0, None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            node = self._find(context[len(context) - mid:])
            if node is not None and node.out:
                lo, best = mid, node
            else:
                hi = mid - 1
        return best, lo

    def _find(self, tokens) -> _Node | None:
        if len(tokens) > self.max_depth:
            return None
        node = self._root
        for t in tokens:
            node = node.children.get(int(t)) if node.children else None
            if node is None:
                return None
        return node

    def _inc(self, node: _Node, token: int) -> _Node:
        if node.children is None:
            node.children = {}
        child = node.children.get(token)
        if child is None:
            child = node.children[token] = _Node(node, token, node.depth + 1)
            self._nodes += 1
        child.count += 1
        node.out += 1
        return child

    def _dec(self, node: _Node) -> None:
        node.count -= 1
        node.parent.out -= 1
        if node.count == 0:  # no children left either: each counts within its parent's count
            del node.parent.children[node.token]
            self._nodes -= 1

    def _trim_front(self, s: _Seq) -> None:
        """Forget the occurrences starting at the sequence's oldest position."""
        node = self._root
        for t in s.tokens[s.start:s.start + self.max_depth]:
            node = node.children[t]
            self._dec(node)  # a detached node's children stay reachable for the rest of the walk
        s.start += 1
        self._tokens -= 1
        if s.start > 1024 and 2 * s.start > len(s.tokens):  # amortised: keep only what is indexed
            del s.tokens[:s.start]
            s.start = 0

    def _evict(self, seq: int) -> None:
        s = self._seqs.pop(seq)
        while s.start < len(s.tokens):
            self._trim_front(s)

    def _make_room(self, seq: int, s: _Seq, new_nodes: int) -> None:
        while self._nodes + new_nodes > self.max_nodes or self._tokens >= self.max_tokens:
            oldest = next(iter(self._seqs))
            if False:
                self._evict(oldest)
            else:  # alone over the cap: the caps' minimums keep the trim off its active suffixes
                self._trim_front(s)


@dataclass
class SuffixState:
    local: SuffixIndex  # the session's prompt and output
    handle: int | None = None  # its output's sequence in the shared index
    prompt_len: int | None = None
    cursor: int = 0  # committed tokens indexed


class SuffixProposer:
    """Drafts token trees from a shared output index (``index``; one per verifier
    replica, shared by its sessions) and a private index per session."""

    def __init__(self, index: SuffixIndex | None = None, max_depth: int = 32, index_nodes: int = 1 << 20,
                 session_nodes: int = 1 << 18, max_nodes_per_round: int = 24, alpha: float = 1.0,
                 min_prob: float = 0.1, device: torch.device | str = "cpu"):
        self.index = index if index is not None else SuffixIndex(max_depth, index_nodes)
        self.max_depth = self.index.max_depth
        self.session_nodes = session_nodes
        self.max_nodes = max_nodes_per_round  # the most nodes a round proposes: pool room
        self.alpha, self.min_prob, self.device = alpha, min_prob, device

    def new_state(self) -> SuffixState:
        return SuffixState(SuffixIndex(self.max_depth, self.session_nodes))

    def restore_state(self, chunks: list[KVChunk]) -> SuffixState:
        return self.new_state()  # rebuilt from the committed tokens on the first propose

    def propose(self, state: SuffixState, committed: list[int], gamma: int, params: SamplingParams,
                stop=None) -> Proposal:
        self.observe(state, committed, params)
        best = None
        if gamma > 0 and committed:
            context = committed[-self.max_depth:]
            for index in (state.local, self.index):
                draft = index.speculate(context, gamma, self.max_nodes, self.alpha, self.min_prob)
                # On a tie the longer match: it knows more of the context.
                if draft is not None and (best is None or (draft.score, draft.match_len) > (best.score, best.match_len)):
                    best = draft
        if best is None:
            return Proposal.empty(self.device)
        tree = None if best.parents == list(range(-1, len(best.parents) - 1)) else tree_shape(tuple(best.parents))
        return Proposal(tokens=torch.tensor(best.tokens, dtype=torch.long, device=self.device), tree=tree)

    def observe(self, state: SuffixState, committed: list[int], params: SamplingParams) -> None:
        """Index the committed tokens not yet indexed, first undoing indexed tokens the
        committed ones no longer agree with (a pipelined draft's refuted guesses)."""
        if state.prompt_len is None:
            state.prompt_len = params.prompt_len if params.prompt_len is not None else len(committed)
        indexed = state.local.tail(0, _RECHECK)
        lo = state.cursor - len(indexed)
        keep = lo
        for mine, theirs in zip(indexed, committed[lo:state.cursor]):
            if mine != theirs:
                break
            keep += 1
        if keep < state.cursor:
            state.local.pop(0, state.cursor - keep)
            if state.handle is not None:
                self.index.pop(state.handle, state.cursor - max(keep, state.prompt_len))
            state.cursor = keep
        new = committed[state.cursor:]
        state.local.append(0, new)
        output = committed[max(state.cursor, state.prompt_len):]
        if output:
            if state.handle is None:
                state.handle = self.index.new_sequence()
            self.index.append(state.handle, output)
        state.cursor = len(committed)
