"""The target side of a round: score every session's proposal in one batched forward
pass, then accept or reject each one on its own."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

import torch

from .kv import common_prefix_len
from .proposals import Proposal, VerifyOutcome
from .coupling import coupled_choice
from .rejection import DraftBatch, Randomness, accept_batch, accept_greedy_chains
from .sampling import SamplingParams, SamplingRows, adjusted_probs_rows
from .shaping import ContextCounts, ShapeRow, shape_logits, shapes, slot_logprobs
from .target import Feed, TargetRunner
from .tree_accept import TreeBatch, accept_tree_batch


@dataclass
class TargetKV:
    """The verifier's handle on one session's target KV, which lives in the runner."""

    session: str
    # Tokens the runner has cached for the session, or a prefix of them: the runner
    # keeps rejected drafts until the next feed says how much to keep, so a rollback
    # costs no extra call (which matters when the runner is a group of TP ranks).
    tokens: list[int] = field(default_factory=list)
    # Position moves the next feed makes first: last round's accepted tree path, copied
    # into place (tokens above already lists the path as compacted).
    moves: tuple[tuple[int, int], ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class VerifyRequest:
    """One sequence's share of a verification batch."""

    kv: TargetKV
    committed: list[int]  # prompt + tokens generated so far
    proposal: Proposal  # drafts to check after committed[-1]
    params: SamplingParams  # seed resolved
    round: int  # keys the round's random stream: (seed, round) draws the same on any replica
    # Return the target's hidden states of this kind (core/target.py HIDDEN_KINDS; "" = none)
    # where it chose the round's tokens.
    hidden: str = ""
    logprobs: int | None = None  # None: none; N: the emitted tokens' and the top N alternatives'
    counts: ContextCounts | None = None  # the sequence's counted tokens, kept across rounds (core/shaping.py)


class TargetVerifier:
    def __init__(self, runner: TargetRunner):
        self.runner = runner

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def new_state(self) -> TargetKV:
        return TargetKV(session=uuid.uuid4().hex)

    def release(self, kvs: list[TargetKV]) -> None:
        self.runner.release([kv.session for kv in kvs])

    def prefill(self, kv: TargetKV, tokens: list[int], cached: list = (), reserve: int = 0,
                hidden: str = "") -> torch.Tensor | None:
        """``cached``: blocks of a shared prefix of ``tokens`` (a new session only), in
        the form the runner takes: KVChunks, or a tensor-parallel runner's per-rank refs.
        ``reserve``: positions a new session holds in the pool from the start (raises
        PoolExhausted, changing nothing, when they are not free). With ``hidden`` (a new
        session only), the target's hidden states of that kind [n, H] at the last n
        positions of ``tokens``, the ones it computed (None if none)."""
        if not kv.tokens:
            if hidden:
                if not hasattr(self.runner, "forward_with_hidden"):
                    raise ValueError("drafting heads need the target's hidden states: a tensor-parallel target has none yet")
                states = self.runner.prefill(kv.session, tokens, list(cached), reserve, hidden=hidden)
            else:
                states = self.runner.prefill(kv.session, tokens, list(cached), reserve)
            kv.tokens = list(tokens)
            return states
        if len(tokens) > common_prefix_len(kv.tokens, tokens):
            self.runner.forward([self._feed(kv, tokens, 0)])
        kv.tokens = list(tokens)
        return None

    def _feed(self, kv: TargetKV, tokens: list[int], drafts: int, tree: tuple[int, ...] | None = None) -> Feed:
        """Feed what the cache lacks of ``tokens`` (whose last ``drafts`` are draft nodes):
        the last committed token, or more after a prefix miss, plus the drafts."""
        keep = common_prefix_len(kv.tokens, tokens[: len(tokens) - drafts])
        moves = tuple((src, dst) for src, dst in kv.moves if dst < keep)
        kv.moves = ()
        return Feed(kv.session, keep, tokens[keep:], drafts + 1, tree, moves)

    def verify(self, batch: list[VerifyRequest]) -> list[VerifyOutcome]:
        feeds = []
        for req in batch:
            tree = None if req.proposal.is_chain else req.proposal.tree.parents
            # The last g+1 logits are p at the root (the last committed token) and after each node.
            feeds.append(self._feed(req.kv, req.committed + req.proposal.tokens.tolist(), len(req.proposal), tree))
        rows = [AcceptRow.of(req) for req in batch]
        outcomes, hidden = None, None
        try:
            kinds = tuple(sorted({req.hidden for req in batch if req.hidden}))
            if kinds:
                if not hasattr(self.runner, "forward_with_hidden"):
                    raise ValueError("drafting heads need the target's hidden states: a tensor-parallel target has none yet")
                all_logits, hidden = self.runner.forward_with_hidden(feeds, kinds)
            elif hasattr(self.runner, "verify"):
                # A tensor-parallel target accepts on rank 0, where the logits are.
                outcomes = self.runner.verify(feeds, rows)
            else:
                all_logits = self.runner.forward(feeds)
        except BaseException:
            # The runner may have dropped positions before failing; forget what it
            # caches, so the next feed recomputes from scratch rather than trust it.
            for req in batch:
                req.kv.tokens, req.kv.moves = [], ()
            raise
        for req, feed in zip(batch, feeds):
            # The runner now caches committed + every draft; the next feed keeps the
            # accepted ones (the correction/bonus token is fed next round).
            req.kv.tokens = req.committed[: feed.keep] + feed.tokens
        if outcomes is None:
            outcomes = accept(rows, all_logits)
        for b, (req, outcome) in enumerate(zip(batch, outcomes)):
            if not req.proposal.is_chain:
                # Keep the accepted path's KV, compacted into place by the next feed.
                base = len(req.committed)
                req.kv.tokens = req.committed + outcome.tokens[:-1]
                req.kv.moves = tuple((base + node, base + depth) for depth, node in enumerate(outcome.path) if node != depth)
            if hidden is not None and req.hidden:
                # Rows where the target chose each token the round commits: at the last
                # committed token (slot ``root`` of the feed), then at each accepted node.
                root = len(feeds[b].tokens) - len(req.proposal) - 1
                slots = [root] + [root + 1 + node for node in outcome.path]
                outcomes[b] = replace(outcome, hidden=hidden[req.hidden][b][slots])
        return outcomes


@dataclass
class AcceptRow:
    """What acceptance reads of one request, and no more. A tensor-parallel target runs
    acceptance on rank 0, where the logits are: these rows travel there, and only the
    outcomes come back, instead of the logits (B x (G+1) x V floats: 37 MB a pass at
    batch 8, gamma 8, V = 128k)."""

    proposal: Proposal  # drafts, their q and tree (the alternatives are not read)
    params: SamplingParams  # seed resolved
    round: int
    position: int  # len(committed): the position slot 0 chooses (coupled noise is keyed by it)
    committed: list[int] | None  # prompt + output where the sampling map reads it (shapes()), else None
    counts: ContextCounts | None  # the sequence's counts, up to date
    logprobs: int | None

    @staticmethod
    def of(req: VerifyRequest) -> "AcceptRow":
        reads = shapes(req.params)
        if reads and req.counts is not None and req.params.penalties.counts_context:
            # Counted here, so a copy shipped to rank 0 is current and counts nothing again.
            req.counts.update(req.committed, req.params.prompt_len)
        proposal = replace(req.proposal, alternatives=None)
        return AcceptRow(proposal, req.params, req.round, len(req.committed),
                         req.committed if reads else None, req.counts, req.logprobs)


@torch.inference_mode()
def accept(rows: list[AcceptRow], all_logits: list[torch.Tensor]) -> list[VerifyOutcome]:
    """Every row's acceptance in one batched pass on the logits' device, and one host
    sync for the result. Chains take the chain rule's single pass; a batch with a tree
    walks the trees (core/tree_accept.py), chains included. Consumes ``all_logits``:
    the probabilities are computed over them, in place (core/sampling.py
    ``adjusted_probs_rows``)."""
    device = all_logits[0].device
    logits = shape_logits(as_batch(all_logits), [  # [B, N+1, V]
        ShapeRow(row.params, row.committed, row.proposal.tokens.tolist(),
                 None if row.proposal.is_chain else row.proposal.tree, row.counts)
        if row.committed is not None else None for row in rows])
    # The rows that asked for log-probabilities read their logits after acceptance.
    kept = {b: logits[b].clone() for b, row in enumerate(rows) if row.logprobs is not None}
    if all(row.params.greedy and row.proposal.is_chain for row in rows):
        outcomes = [VerifyOutcome(n, tokens, tuple(range(n)))
                    for n, tokens in accept_greedy_chains(logits, [row.proposal.tokens for row in rows])]
        return with_logprobs(rows, kept, outcomes)
    B, N1, V = logits.shape
    drafts = DraftBatch.of([(row.proposal.tokens, row.proposal.draft_q) for row in rows], V, device)
    # Coupled rows are accepted as greedy ones, over their Gumbel-max scores.
    scores, params = coupled_scores(logits, rows)
    sampling = SamplingRows.of(params, V, device)
    keys = [None if p.greedy else (p.seed, row.round) for p, row in zip(params, rows)]
    rand = Randomness.draw(keys, [len(row.proposal) for row in rows], N1 - 1, device)
    if all(row.proposal.is_chain for row in rows):
        # The one host sync: [n, token, drafts...] per row.
        result = torch.cat([accept_batch(scores, drafts, sampling, rand, consume=True), drafts.tokens], -1).tolist()
        outcomes = [VerifyOutcome(r[0], r[2 : 2 + r[0]] + [r[1]], tuple(range(r[0]))) for r in result]
        return with_logprobs(rows, kept, outcomes)
    trees = TreeBatch.of([row.proposal.tree for row in rows], [len(row.proposal) for row in rows], device)
    result = torch.cat([accept_tree_batch(scores, drafts, trees, sampling, rand, consume=True), drafts.tokens], -1).tolist()
    outcomes = []
    for r in result:
        n, token, path, tokens = r[0], r[1], r[2 : 2 + trees.max_depth], r[2 + trees.max_depth :]
        outcomes.append(VerifyOutcome(n, [tokens[node] for node in path[:n]] + [token], tuple(path[:n])))
    return with_logprobs(rows, kept, outcomes)


def with_logprobs(rows: list[AcceptRow], logits: dict[int, torch.Tensor], outcomes: list[VerifyOutcome]) -> list[VerifyOutcome]:
    """The committed tokens' log-probabilities, for the rows that asked, from the logits
    the round drew them from (``logits[b]``: row b's [N+1, V], shaped): slot 0 (the
    root), then after each accepted node."""
    for b, row in enumerate(rows):
        if row.logprobs is None:
            continue
        outcome = outcomes[b]
        slots = [0] + [1 + node for node in outcome.path]
        chosen, top = slot_logprobs(logits[b][slots], row.params, outcome.tokens, row.logprobs)
        outcomes[b] = replace(outcome, logprobs=chosen, top_logprobs=top)
    return outcomes


def coupled_scores(logits: torch.Tensor, rows: list[AcceptRow]) -> tuple[torch.Tensor, list[SamplingParams]]:
    """logits [B, N+1, V] (shaped) -> the scores acceptance reads, and the parameters it
    reads them with: a coupled row's scores are its adjusted log-probabilities plus the
    Gumbel noise of the position each slot chooses (core/coupling.py), read as a greedy
    row's; every other row is as it came. Written over float32 ``logits``."""
    coupled = [b for b, row in enumerate(rows) if row.params.coupled and not row.params.greedy]
    params = [row.params for row in rows]
    if not coupled:
        return logits, params
    scores = logits.float()  # (itself, when float32)
    B, N1, V = logits.shape
    adjusted = adjusted_probs_rows(logits[coupled], SamplingRows.of([params[b] for b in coupled], V, logits.device),
                                   consume=True)  # (a copy of those rows)
    for i, b in enumerate(coupled):
        row = rows[b]
        # Slot 0 chooses the token after the committed ones; a chain's slot s the one s
        # later; a tree's slot 1 + node the one after that node, at its depth.
        after = torch.arange(N1) if row.proposal.is_chain else torch.cat(
            [torch.zeros(1, dtype=torch.long), row.proposal.tree.depth.cpu(),
             torch.zeros(N1 - 1 - len(row.proposal), dtype=torch.long)])
        scores[b] = coupled_choice(adjusted[i].log(), row.params.seed, row.position + after, row.params.top_k)
        params[b] = GREEDY
    return scores, params


GREEDY = SamplingParams()


def as_batch(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-row logits [k_b, V] -> [B, G+1, V], left-aligned. When the rows are equally
    long, evenly spaced slices of one batched output (every session drafted the same
    gamma: the usual case), a strided view of it; otherwise a padded copy. The copy is
    B x (G+1) x V floats: 16 ms a pass at batch 8, gamma 8, V = 128k on this CPU."""
    first = rows[0]
    k, V = first.shape
    if len(rows) == 1:
        return first[None]
    if first.stride() == (V, 1) and all(r.shape == first.shape and r.stride() == (V, 1) for r in rows):
        step = rows[1].storage_offset() - first.storage_offset()
        same = first.untyped_storage().data_ptr()
        if step >= k * V and all(r.untyped_storage().data_ptr() == same and
                                 r.storage_offset() == first.storage_offset() + i * step for i, r in enumerate(rows)):
            return first.as_strided((len(rows), k, V), (step, V, 1))
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
