"""EAGLE-3 drafting next to the target, with EAGLE-2's dynamic tree.

The drafter (models/eagle.py) is one decoder layer over [embedding of the next token;
feature]. At committed position j the feature is the target's fused layer states
f_j; past the committed text it is the drafter's own output g, fed back:

    g_j = Layer(emb(x_{j+1}), f_j)    -> p(x_{j+2}) = softmax(head(norm(g_j)))

With committed x_0..x_P the target has given f up to F = P - 1. A round first runs the
layer over the positions committed since the last round (true features, true tokens:
cached for good), which drafts depth 1 from g_F. Depth d >= 2 runs the layer on the
nodes chosen for expansion at depth d - 1, one row each at position F + d - 1, fed
the output of the row that drafted them and their own token; each row sees the
committed cache, the rows of its ancestors and itself (a 4-D mask), as the drafter
was trained (training-time test, models/eagle.py ``forward_train``). The rows are
cropped from the cache after the round.

Drafting past the features: on a draft worker (placement "drafter") the early block
for round k+1 is drafted while round k verifies, after tokens the target has not
given features for yet (round k's drafts and the guessed bonus). Those positions take
the drafter's own output as their feature, one row each, exactly as a chain's deeper
rows do: drafting after them equals continuing the chain. A chain's rows stay cached
as a tail that the next draft along the same tokens reuses; a tree's are cropped. The
target's features replace them all when the round's outcome comes.

EAGLE-2's tree: every row proposes its top_k children, scored by cumulative draft
log-probability; the top_k children of the whole depth are expanded next. After the
last depth all scored nodes are reranked and the best ``nodes`` kept. A node's score
never exceeds its parent's, so the kept set is closed under ancestors (ties: a stable
sort keeps the shallower first). Nodes are top-k picks, so each is a point mass to
the tree acceptor: sampling stays lossless.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from .kv_chunks import KVChunk
from .proposals import DraftAlternatives, Proposal
from .proposers import ALTERNATIVES
from .sampling import SamplingParams
from .tree import tree_shape


@dataclass(frozen=True)
class EagleTree:
    depth: int = 5  # drafting depths (the longest path)
    top_k: int = 2  # children per expanded node, and nodes expanded per depth
    nodes: int = 8  # kept after reranking: the verify pass's size

    def __post_init__(self) -> None:
        if not (1 <= self.depth <= 16 and 1 <= self.top_k <= 16 and 1 <= self.nodes <= 128):
            raise ValueError(f"EAGLE tree {self}: depth 1-16, top_k 1-16, nodes 1-128")

    @property
    def label(self) -> str:
        return f"eagle{self.nodes}:d{self.depth}k{self.top_k}"

    @property
    def spec(self) -> str:
        """What ``parse`` reads."""
        return f"{self.depth},{self.top_k},{self.nodes}"

    @property
    def is_chain(self) -> bool:
        """One child a node: a chain as deep as the round's gamma allows (up to depth)."""
        return self.top_k == 1

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def parse(text: str) -> "EagleTree":
        """'depth,top_k,nodes', e.g. '5,2,8'."""
        try:
            depth, top_k, nodes = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"EAGLE tree {text!r}: write depth,top_k,nodes (e.g. 5,2,8)") from None
        return EagleTree(depth, top_k, nodes)


class EagleModel(Protocol):
    target_hidden: str  # the target's states it reads (core/target.py: "layers:...")
    draft_vocab: torch.Tensor | None  # [K] token id of each draft logit

    def new_cache(self) -> object: ...

    def truncate(self, cache, length: int) -> None: ...

    def fuse(self, features: torch.Tensor) -> torch.Tensor: ...  # [..., 3H] -> [..., H]

    def step(self, feature: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, mask=None,
             cache=None) -> torch.Tensor: ...  # [B, n, H], [B, n], [B, n] -> [B, n, H]

    def logits(self, g: torch.Tensor) -> torch.Tensor: ...  # [..., H] -> [..., K]


@dataclass
class EagleState:
    base: int = -1  # the first position the cache holds (-1: nothing seen yet)
    done: int = 0  # positions [base, done) are cached, built on committed tokens
    pending: torch.Tensor | None = None  # [n, H] the target's fused features at done.. not yet run
    cache: object = None
    last: torch.Tensor | None = None  # [H] the layer's output at done - 1: where drafting starts
    # Rows cached past the features, a path from done on: (token fed, output [H]). A
    # chain's rows stay for the next draft along the same tokens (the early block after
    # a chain reuses all but one of them); a tree's are cropped.
    tail: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    length: int = 0  # len(committed) the features reach: a stale state drafts nothing
    # (committed tokens past the features, tokens, parents, a chain's alternatives): reused until new features come
    drafted: tuple | None = None


class EagleProposer:
    uses_target_hidden = True
    reads_every_position = True  # its layer attends over every committed position's features

    def __init__(self, model: EagleModel, tree: EagleTree, device: torch.device | str = "cpu"):
        self.model, self.tree, self.device = model, tree, device
        self.target_hidden = model.target_hidden

    @property
    def max_nodes(self) -> int:
        return self.tree.nodes

    def new_state(self) -> EagleState:
        return EagleState()

    def restore_state(self, chunks: list[KVChunk]) -> EagleState:
        return EagleState()  # rebuilt from the target's next features (a shorter context at first)

    @torch.inference_mode()
    def observe(self, state: EagleState, start: int, hidden: torch.Tensor) -> None:
        """``hidden`` [n, 3H]: the target's layer states at positions start.. (row i
        chose token start+i+1), fused here."""
        self.observe_fused(state, start, self.model.fuse(hidden))

    def with_tree(self, tree: EagleTree) -> "EagleProposer":
        return EagleProposer(self.model, tree, self.device)

    @staticmethod
    def observe_fused(state: EagleState, start: int, features: torch.Tensor) -> None:
        """``features`` [n, H]: fused features at positions start.. (what a verifier
        sends a draft worker). Contiguous rows extend the state; a gap (a failover, a
        prefix served from cache, a window) starts it afresh at ``start``."""
        if state.base < 0 or start != state.done + _rows(state.pending):
            state.base, state.done, state.pending, state.cache, state.last = start, start, None, None, None
            state.tail = []
        state.pending = features if state.pending is None else torch.cat([state.pending, features])
        state.drafted = None
        state.length = start + len(features) + 1

    @torch.inference_mode()
    def propose(self, state: EagleState, committed: list[int], gamma: int, params: SamplingParams,
                stop=None) -> Proposal:
        """A tree no deeper than ``gamma`` (the round's budget) after ``committed``,
        which may run past the features (the tokens after them drafted from the
        drafter's own features)."""
        if state.base < 0 or state.length > len(committed) or gamma <= 0:
            return Proposal.empty(self.device)
        ahead = tuple(committed[state.length :])
        if state.drafted is None or state.drafted[0] != ahead:
            state.drafted = (ahead, *self._draft(state, committed))
        _, tokens, parents, alternatives = state.drafted
        shape, kept = tree_shape(parents).prune(gamma)
        if alternatives is not None:  # a chain: pruning keeps its first nodes
            alternatives = DraftAlternatives(alternatives.ids[: len(kept)], alternatives.probs[: len(kept)])
        return Proposal(tokens=tokens[list(kept)].to(self.device), tree=shape, alternatives=alternatives)

    def _catch_up(self, state: EagleState, committed: list[int]) -> None:
        """Run the layer over the positions with new features (true features, true
        tokens: cached for good); ``state.last`` is the output at the last of them."""
        model = self.model
        if state.cache is None:
            state.cache = model.new_cache()
        if state.pending is None:
            return
        self._crop(state, 0)  # rows drafted past the old features go: these positions now have true ones
        rows = state.pending  # [n, H] at positions done..done+n-1
        n, past = len(rows), state.done - state.base
        tokens = torch.tensor(committed[state.done + 1 : state.done + n + 1], device=rows.device)  # x_{j+1}
        g = model.step(rows[None], tokens[None], torch.arange(state.done, state.done + n, device=rows.device)[None],
                       _mask(torch.ones(n, past, dtype=torch.bool, device=rows.device),
                             torch.ones(n, n, dtype=torch.bool, device=rows.device).tril(), model), state.cache)[0]
        state.done, state.pending, state.last = state.done + n, None, g[-1]

    def _crop(self, state: EagleState, keep: int) -> None:
        """Keep the first ``keep`` tail rows, in the cache too."""
        if len(state.tail) > keep:
            state.tail = state.tail[:keep]
            self.model.truncate(state.cache, state.done - state.base + keep)

    def _row(self, state: EagleState, i: int, token: int, feature: torch.Tensor) -> torch.Tensor:
        """Tail row ``i`` (position done + i) fed ``token`` and ``feature`` [H]: reused
        when the tail has it for that token (the same inputs), else computed, and
        every row after it dropped."""
        if i < len(state.tail) and state.tail[i][0] == token:
            return state.tail[i][1]
        self._crop(state, i)
        position = torch.tensor([[state.done + i]], device=feature.device)
        token_ids = torch.tensor([[token]], device=feature.device)
        g = self.model.step(feature[None, None], token_ids, position, None, state.cache)[0, 0]
        state.tail.append((token, g))
        return g

    def _top(self, g: torch.Tensor, k: int):
        """The draft's top ``k`` (log-probabilities, token ids) after output(s) ``g``."""
        top = torch.log_softmax(self.model.logits(g).float(), -1).topk(k)
        vocab = self.model.draft_vocab
        return top.values, top.indices if vocab is None else vocab[top.indices]

    def _draft(self, state: EagleState, committed: list[int]) -> tuple:
        """(tokens, parents, a chain's alternatives or None) after ``committed``."""
        self._catch_up(state, committed)
        # Past the features: one row a position, fed the row before's output.
        last = state.last
        ahead = committed[state.done + 1 :]
        for i, token in enumerate(ahead):
            last = self._row(state, i, token, last)
        if self.tree.is_chain:
            return self._chain(state, last, len(ahead))
        self._crop(state, len(ahead))
        tokens, parents = self._tree(state, last, len(committed) - 2)
        self.model.truncate(state.cache, state.done - state.base + len(ahead))  # the tree's rows go
        return tokens, parents, None

    def _chain(self, state: EagleState, last: torch.Tensor, base: int):
        """The top-1 chain, its rows kept in the tail after the ``base`` rows ahead, and
        the draft's likeliest tokens at each position (the speculation cache's guesses)."""
        tokens, top_ids, top_probs = [], [], []
        length = min(self.tree.depth, self.tree.nodes)
        for d in range(length):
            log_probs, ids = self._top(last, ALTERNATIVES)
            tokens.append(int(ids[0]))
            top_ids.append(ids)
            top_probs.append(log_probs.exp())
            if d < length - 1:
                last = self._row(state, base + d, tokens[-1], last)
        alternatives = DraftAlternatives(torch.stack(top_ids).cpu(), torch.stack(top_probs).cpu())
        return torch.tensor(tokens), tuple(range(-1, len(tokens) - 1)), alternatives

    def _tree(self, state: EagleState, last: torch.Tensor, F: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """EAGLE-2's tree after the output ``last`` at position F (rows appended to the cache)."""
        model, k = self.model, self.tree.top_k
        committed_keys = F + 1 - state.base
        device = last.device
        top_scores, top_ids = self._top(last, k)
        pool_tokens, pool_scores = [top_ids], [top_scores]
        pool_parents = [torch.full((k,), -1, dtype=torch.long, device=device)]
        beam = torch.arange(k, device=device)  # pool indices expanded next
        beam_scores, beam_features = top_scores, last.expand(k, -1)
        beam_rows = torch.full((k,), -1, dtype=torch.long, device=device)  # the row that drafted each
        ancestors = torch.zeros(0, 0, dtype=torch.bool, device=device)  # [R, R] row -> its ancestor rows and itself
        for d in range(1, self.tree.depth):
            R = len(ancestors)
            # Each new row sees its drafting row's ancestors (and that row), and itself.
            parent_anc = torch.zeros(k, R, dtype=torch.bool, device=device)
            has = beam_rows >= 0
            if R:
                parent_anc[has] = ancestors[beam_rows[has]]
            ancestors = torch.cat([torch.cat([ancestors, torch.zeros(R, k, dtype=torch.bool, device=device)], 1),
                                   torch.cat([parent_anc, torch.eye(k, dtype=torch.bool, device=device)], 1)])
            visible = ancestors[R:]  # [k, R + k]
            positions = torch.full((1, k), F + d, device=device)
            out = model.step(beam_features[None], torch.cat(pool_tokens)[beam][None], positions,
                             _mask(torch.ones(k, committed_keys, dtype=torch.bool, device=device), visible, model),
                             state.cache)[0]  # [k, H]
            child_scores, child_ids = self._top(out, k)  # [k, k]
            scores = (beam_scores[:, None] + child_scores).flatten()
            first = sum(len(t) for t in pool_tokens)
            pool_tokens.append(child_ids.flatten())
            pool_scores.append(scores)
            pool_parents.append(beam.repeat_interleave(k))
            best = scores.topk(k).indices
            beam, beam_scores = first + best, scores[best]
            beam_features, beam_rows = out[best // k], R + best // k
        scores = torch.cat(pool_scores)
        order = torch.sort(scores, descending=True, stable=True).indices[: self.tree.nodes]
        chosen = torch.sort(order).values.tolist()  # pool order: parents before children
        index = {p: i for i, p in enumerate(chosen)}
        parents_all = torch.cat(pool_parents).tolist()
        parents = tuple(-1 if parents_all[p] < 0 else index[parents_all[p]] for p in chosen)
        return torch.cat(pool_tokens)[chosen].cpu(), parents


def _mask(cached: torch.Tensor, new: torch.Tensor, model) -> torch.Tensor | None:
    """Additive [1, 1, rows, keys] from which cached keys [rows, C] and new rows
    [rows, R] each row sees; None for one row that sees everything (no mask needed)."""
    allowed = torch.cat([cached, new], -1)
    if len(allowed) == 1 and bool(allowed.all()):
        return None
    dtype = getattr(model, "dtype", torch.float32)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[None, None]


def _rows(x: torch.Tensor | None) -> int:
    return 0 if x is None else len(x)
