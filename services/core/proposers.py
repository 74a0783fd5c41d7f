"""Proposers guess tokens ahead of the last committed token.

Per-sequence proposer state (the draft model's KV) lives in the sequence's own state
object, never on the proposer or the model, so one proposer serves many sequences.
"""

from __future__ import annotations

from typing import Callable, Collection, Protocol

import numpy as np
import torch

from .coupling import coupled_choice
from .draft_q import SparseQ, compact
from .errors import PoolExhausted
from .kv_chunks import KVChunk
from .kv_pool import KVPool
from .paged_kv import DEFAULT_DRAFT_KV_CACHE_BYTES, PagedKV, extend_paged
from .proposals import DraftAlternatives, Proposal
from .sampling import SamplingParams, adjusted_probs
from .shaping import CountedContext, StepShaper, shapes


# Polled between drafted tokens; True abandons the rest of the draft (a pipelined
# draft whose assumption the verifier has just refuted).
StopCheck = Callable[[], bool]
# Polled between the steps of several branches drafted together: the indices of the
# branches still wanted (the speculation cache drops the others once the verifier
# reports which outcome happened); None: all of them.
Wanted = Callable[[], Collection[int] | None]
# One forward step of a draft model for several sequences at once: feed each KV state
# its tokens, get each one's logits [V] at its last token.
Step = Callable[[list[PagedKV], list[list[int]]], list[torch.Tensor]]
ALTERNATIVES = 4  # the draft's likeliest tokens kept per position, for the speculation cache


class Proposer(Protocol):
    def new_state(self) -> object: ...

    def restore_state(self, chunks: list[KVChunk]) -> object:
        """A state that already caches the chunks' positions (a session continued on
        another draft worker)."""
        ...

    def propose(
        self,
        state: object,
        committed: list[int],
        gamma: int,
        params: SamplingParams,
        stop: StopCheck | None = None,
    ) -> Proposal:
        """Up to ``gamma`` tokens after ``committed``. A sampled draft at absolute
        position t draws from the stream keyed by (params.seed, t) (``SparseQ.sample``):
        whichever block drafts a position, early or fresh, on whichever worker, it draws
        the same numbers. Lossless because a position's draws decide at most one tested
        draft: once a draft at t is tested, t is committed and never drafted again."""
        ...


def propose_branches(proposer: Proposer, states: list, bases: list[list[int]], budgets: list[int],
                     params: SamplingParams, wanted: Wanted | None = None) -> list[Proposal]:
    """One proposal per branch (``states[i]`` after ``bases[i]``, up to ``budgets[i]``
    tokens), each exactly what ``propose`` would return alone. A proposer that can
    draft branches together (one batched forward a step) does; others draft them in turn."""
    if hasattr(proposer, "propose_branches"):
        return proposer.propose_branches(states, bases, budgets, params, wanted)
    out = []
    for i, (state, base, budget) in enumerate(zip(states, bases, budgets)):
        keep = wanted() if wanted is not None else None
        if keep is not None and i not in keep:
            out.append(Proposal.empty(getattr(proposer, "device", "cpu")))
            continue
        out.append(proposer.propose(state, base, budget, params))
    return out


class DraftModelProposer:
    """A small causal LM with the target's tokenizer drafts autoregressively.

    ``confidence_stop``: stop drafting early once the draft's own probability of the
    token it just drafted falls below this (transformers' default is 0.4); 0 disables.
    ``step``: runs one draft forward step for several sequences; a draft worker passes
    one that batches the steps of concurrent sessions (drafter/steps.py).
    ``kv_cache_bytes``: the pool every sequence's draft KV lives in (core/paged_kv.py).
    """

    def __init__(self, model, confidence_stop: float = 0.0, step: Step | None = None,
                 kv_cache_bytes: int = DEFAULT_DRAFT_KV_CACHE_BYTES):
        self.model = model
        self.device = model.device
        self.confidence_stop = confidence_stop
        self.pool = KVPool.for_model(model, kv_cache_bytes)
        self.step = step or (lambda kvs, feeds: [out[-1] for out in extend_paged(model, kvs, feeds, [1] * len(kvs))])

    def new_state(self) -> PagedKV:
        return PagedKV(self.pool)

    def restore_state(self, chunks: list[KVChunk]) -> PagedKV:
        return PagedKV.restored(self.pool, chunks)

    def propose(
        self,
        state: PagedKV,
        committed: list[int],
        gamma: int,
        params: SamplingParams,
        stop: StopCheck | None = None,
    ) -> Proposal:
        wanted = None if stop is None else (lambda: () if stop() else None)
        return self.propose_branches([state], [committed], [gamma], params, wanted)[0]

    def propose_branches(self, states: list[PagedKV], bases: list[list[int]], budgets: list[int],
                         params: SamplingParams, wanted: Wanted | None = None) -> list[Proposal]:
        """Every live branch's next token in one forward step (batched by ``step``).
        Raises PoolExhausted when the pool cannot hold a lone draft; of several
        branches, those it cannot hold are not drafted."""
        n, budgets = len(states), list(budgets)
        pending = []
        for i, (state, base) in enumerate(zip(states, bases)):
            # Positions drafted last round but rejected are dropped; accepted ones are kept.
            state.rollback_to_prefix_of(base)
            if len(state) == len(base):
                # Everything is cached (drafts from an early block the verifier passed up
                # were all committed), but the next token needs the last one's logits.
                state.truncate(len(base) - 1)
            pending.append(base[len(state) :])
            if budgets[i] > 0:
                try:  # the blocks for every position it feeds, now: no step then fails for want of one
                    state.reserve(len(base) + budgets[i] - 1)
                except PoolExhausted:
                    if n == 1:
                        raise
                    budgets[i] = 0
        tokens: list[list[int]] = [[] for _ in range(n)]
        qs: list[list[SparseQ]] = [[] for _ in range(n)]
        tops: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
        # The same penalties the verifier applies to the target, each branch's context
        # counted from the state's last count (only what a round adds), then a token a step.
        shapers = [self._shaper(params, state, base) if shapes(params) else None for state, base in zip(states, bases)]
        live = [i for i in range(n) if budgets[i] > 0]
        while live:
            keep = wanted() if wanted is not None else None
            if keep is not None:
                live = [i for i in live if i in keep]
                if not live:
                    break
            logits = self.step([states[i] for i in live], [pending[i] for i in live])
            still = []
            for i, row in zip(live, logits):  # row: [V]
                if shapers[i] is not None:
                    row = shapers[i].apply(row)
                if params.greedy:
                    probs = ranked = row.float().softmax(-1)
                    token = int(row.argmax())
                elif params.coupled:  # the argmax under the position's shared noise: no q to send
                    probs = adjusted_probs(row, params)
                    at = torch.tensor([len(bases[i]) + len(tokens[i])], device=probs.device)
                    scores = coupled_choice(probs.log()[None], params.seed, at, params.top_k)[0]
                    token = int(scores.argmax())
                    # The alternatives rank by the same perturbed scores: the target's token
                    # here is the argmax of its log p plus this noise, so the draft's
                    # runners-up under it are the best guesses of it (the speculation
                    # cache's corrections, a TREE's leaves); softmax(scores) is how likely
                    # each is if log p - log q were Gumbel noise.
                    ranked = scores.softmax(-1)
                else:
                    probs = ranked = adjusted_probs(row, params)
                    # Sample from the compact q that is sent, never from the full one.
                    q = compact(probs)
                    token = q.sample(params.seed, len(bases[i]) + len(tokens[i]))
                    qs[i].append(q)
                top = ranked.topk(min(ALTERNATIVES, ranked.shape[-1]))
                tops[i].append((top.indices, top.values))
                tokens[i].append(token)
                if shapers[i] is not None:
                    shapers[i].append(token)
                pending[i] = [token]
                confident = self.confidence_stop <= 0 or self._confidence(row, probs, token, params) >= self.confidence_stop
                if confident and len(tokens[i]) < budgets[i]:
                    still.append(i)
            live = still
        # The last drafted token is not fed to the draft here; if it is accepted it is
        # fed next round as part of ``pending``, so no work is wasted on a rejection.
        return [self._proposal(t, q, top) for t, q, top in zip(tokens, qs, tops)]

    def _shaper(self, params: SamplingParams, state: PagedKV, base: list[int]) -> StepShaper:
        if not params.penalties.counts_context:
            return StepShaper(params, base, self.device)  # nothing to count
        state.counted = counted = CountedContext.of(state.counted, base, params.prompt_len)
        return StepShaper(params, base, self.device, counted.counts)

    @staticmethod
    def _confidence(row: torch.Tensor, probs: torch.Tensor, token: int, params: SamplingParams) -> float:
        """The draft's own probability of ``token`` at temperature 1 (a greedy draft's
        ``probs`` already are that; a sampled one's are adjusted)."""
        return float((probs if params.greedy else row.float().softmax(-1))[token])

    def _proposal(self, tokens: list[int], qs: list[SparseQ], tops: list) -> Proposal:
        alternatives = None
        if tops:
            alternatives = DraftAlternatives(ids=torch.stack([t[0] for t in tops]).cpu(),
                                             probs=torch.stack([t[1] for t in tops]).float().cpu())
        return Proposal(
            tokens=torch.tensor(tokens, dtype=torch.long, device=self.device),
            draft_q=SparseQ.stack(qs) if qs else None,
            alternatives=alternatives,
        )


class NgramProposer:
    """Prompt lookup: find the most recent earlier occurrence of the longest suffix
    (``max_n`` down to ``min_n`` tokens) of the committed text, and propose what
    followed it. No model; the proposal is deterministic, so q is one-hot."""

    def __init__(self, min_n: int = 1, max_n: int = 4, device: torch.device | str = "cpu"):
        if not 1 <= min_n <= max_n:
            raise ValueError("n-gram sizes need 1 <= min_n <= max_n")
        self.min_n, self.max_n, self.device = min_n, max_n, device

    def new_state(self) -> None:
        return None

    def restore_state(self, chunks: list[KVChunk]) -> None:
        return None  # lookup reads the committed tokens alone

    def propose(
        self,
        state: None,
        committed: list[int],
        gamma: int,
        params: SamplingParams,
        stop: StopCheck | None = None,
    ) -> Proposal:
        return Proposal(tokens=torch.tensor(self.lookup(committed, gamma), dtype=torch.long, device=self.device))

    def lookup(self, committed: list[int], gamma: int) -> list[int]:
        if gamma <= 0:
            return []
        seq = np.asarray(committed, dtype=np.int64)
        for n in range(min(self.max_n, len(seq) - 1), self.min_n - 1, -1):
            # windows[i] == seq[i:i+n]; the suffix itself (i = len-n) is excluded.
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return seq[start : start + gamma].tolist()
        return []
