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
from array import array
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


class _Seq:
    __slots__ = ("tokens", "start", "active")

    def __init__(self):
        self.tokens = array("i")
        self.start = 0  # occurrences starting before this were evicted (the front trimmed)
        self.active: list[int] = []  # the nodes of its last suffixes, shortest first: node i has depth i+1


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
    cap loses its oldest tokens). Thread-safe.

    Nodes are rows of flat arrays and edges one dict of ints, not objects: a million
    nodes cost ~140 bytes each and nothing for the garbage collector to traverse."""

    def __init__(self, max_depth: int = 32, max_nodes: int = 1 << 20, max_tokens: int | None = None):
        max_tokens = max_nodes if max_tokens is None else max_tokens
        # A sequence's last max_depth suffixes are never evicted while it grows: room for them.
        if max_depth < 2 or max_nodes < max_depth * (max_depth + 3) // 2 or max_tokens <= max_depth:
            raise ValueError("need max_depth >= 2, max_nodes >= D(D+3)/2 and max_tokens > D")
        self.max_depth, self.max_nodes, self.max_tokens = max_depth, max_nodes, max_tokens
        self._edges: dict[int, int] = {}  # token << 32 | parent -> child (the node in the low bits: hashed apart)
        # Per node (0 the root): occurrences; out, the occurrences followed by a token (the
        # children's counts summed), the denominator of a continuation's probability: an
        # occurrence at a sequence's end (a session's own context, always) says nothing of
        # what follows; and the children as a doubly linked list, to walk and unlink.
        self._count, self._out, self._parent, self._token = (array("i", [0]) for _ in range(4))
        self._first, self._next, self._prev = (array("i", [-1]) for _ in range(3))
        self._free = array("i")
        self._seqs: OrderedDict[int, _Seq] = OrderedDict()  # least recently appended first
        self._next_seq = 0
        self.num_nodes = self.num_tokens = 0  # trie nodes (the root aside), tokens stored
        self._lock = threading.Lock()

    def sequences(self) -> list[int]:
        with self._lock:
            return list(self._seqs)

    def new_sequence(self) -> int:
        with self._lock:
            self._next_seq += 1
            return self._next_seq

    def append(self, seq: int, tokens) -> None:
        """Extend sequence ``seq`` (started afresh if unknown or evicted)."""
        if not len(tokens):
            return
        depth = self.max_depth
        with self._lock:
            s = self._seqs.pop(seq, None) or _Seq()
            self._seqs[seq] = s  # now the most recently used
            for t in tokens:
                t = int(t)
                self._make_room(seq, s, min(len(s.active) + 1, depth))
                s.active = self._extend([0] + s.active[: depth - 1], t)
                s.tokens.append(t)
                self.num_tokens += 1

    def _extend(self, nodes: list[int], t: int) -> list[int]:
        """Each node's child by ``t``, its count up by one (the hot loop: all locals)."""
        edges, count, out, first, nxt, prev = self._edges, self._count, self._out, self._first, self._next, self._prev
        children = []
        for node in nodes:
            key = t << 32 | node
            child = edges.get(key)
            if child is None:
                if not self._free:
                    self._grow()
                child = edges[key] = self._free.pop()
                count[child] = out[child] = 0
                self._parent[child], self._token[child], first[child] = node, t, -1
                head = first[node]
                nxt[child], prev[child], first[node] = head, -1, child
                if head >= 0:
                    prev[head] = child
                self.num_nodes += 1
            count[child] += 1
            out[node] += 1
            children.append(child)
        return children

    def pop(self, seq: int, n: int) -> None:
        """Drop the last ``n`` tokens of ``seq`` (refuted guesses)."""
        with self._lock:
            s = self._seqs.get(seq)
            for _ in range(n if s else 0):
                if len(s.tokens) <= s.start:
                    break
                parents = [self._parent[a] for a in s.active[1:]]
                for a in s.active:
                    self._dec(a)
                s.tokens.pop()
                self.num_tokens -= 1
                s.active = parents
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
            return s.tokens[max(s.start, len(s.tokens) - n):].tolist() if s and n > 0 else []

    def count(self, tokens) -> int:
        """Occurrences of ``tokens`` (0 if longer than max_depth)."""
        with self._lock:
            node = self._find(tokens)
            return self._count[node] if node is not None else 0

    def match(self, context, max_len: int | None = None) -> tuple[int | None, int]:
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
                tokens.append(self._token[child])
                parents.append(parent)
                probs.append(-negp)
                if depth < gamma and self._out[child]:
                    self._push(heap, order, child, -negp, len(tokens) - 1, depth + 1, min_prob)
        return Draft(tokens, parents, probs, length) if tokens else None

    def _push(self, heap: list, order, node: int, prob: float, parent: int, depth: int, min_prob: float) -> None:
        # Path probabilities only shrink downwards: a child under min_prob is never taken.
        scale = prob / self._out[node]
        child = self._first[node]
        while child >= 0:
            p = scale * self._count[child]
            if p >= min_prob:
                heapq.heappush(heap, (-p, next(order), child, parent, depth))
            child = self._next[child]

    def _match(self, context, max_len: int | None) -> tuple[int | None, int]:
        hi = min(self.max_depth - 1, len(context), self.max_depth if max_len is None else max_len)
        # Monotone in the length: if s is followed by x, so is every suffix of s.
        lo, best = 0, None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            node = self._find(context[len(context) - mid:])
            if node is not None and self._out[node]:
                lo, best = mid, node
            else:
                hi = mid - 1
        return best, lo

    def _find(self, tokens) -> int | None:
        if len(tokens) > self.max_depth:
            return None
        node, edges = 0, self._edges
        for t in tokens:
            node = edges.get(int(t) << 32 | node)
            if node is None:
                return None
        return node

    def _grow(self) -> None:
        grow = max(1024, len(self._count))
        for a in (self._count, self._out, self._parent, self._token, self._first, self._next, self._prev):
            a.frombytes(bytes(grow * a.itemsize))
        self._free = array("i", range(len(self._count) - 1, len(self._count) - grow - 1, -1))

    def _dec(self, node: int) -> None:
        self._count[node] -= 1
        parent = self._parent[node]
        self._out[parent] -= 1
        if self._count[node] == 0:  # no children left either: each counts within its parent's count
            del self._edges[self._token[node] << 32 | parent]
            before, after = self._prev[node], self._next[node]
            if before >= 0:
                self._next[before] = after
            else:
                self._first[parent] = after
            if after >= 0:
                self._prev[after] = before
            self._free.append(node)
            self.num_nodes -= 1

    def _trim_front(self, s: _Seq) -> None:
        """Forget the occurrences starting at the sequence's oldest position."""
        node = 0
        for t in s.tokens[s.start:s.start + self.max_depth]:
            # A freed node's child edges stay until this walk frees the children too.
            node = self._edges[t << 32 | node]
            self._dec(node)
        s.start += 1
        self.num_tokens -= 1
        if s.start > 1024 and 2 * s.start > len(s.tokens):  # amortised: keep only what is indexed
            del s.tokens[:s.start]
            s.start = 0

    def _evict(self, seq: int) -> None:
        s = self._seqs.pop(seq)
        while s.start < len(s.tokens):
            self._trim_front(s)

    def _make_room(self, seq: int, s: _Seq, new_nodes: int) -> None:
        while self.num_nodes + new_nodes > self.max_nodes or self.num_tokens >= self.max_tokens:
            oldest = next(iter(self._seqs))
            if oldest != seq:
                self._evict(oldest)
            elif s.start + self.max_depth < len(s.tokens):  # alone over the cap; active suffixes kept
                self._trim_front(s)
            else:  # unreachable: the caps' minimums leave room for a sequence's active suffixes
                raise RuntimeError("suffix index caps too small")


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
