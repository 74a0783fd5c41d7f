"""The speculative decoding loop: propose, verify (score + accept), update.

The engine owns per-request state (``SequenceState``); proposer and verifier are
stateless with respect to requests, so one engine serves many sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from .errors import InvalidRequest
from .gamma import MAX_GAMMA, GammaSchedule, draft_budget
from .multi_draft import TreeProposer, lookup_budget
from .proposals import Proposal
from .proposers import Proposer
from .sampling import SamplingParams, StopRule
from .shaping import ContextCounts
from .stats import GenerationStats
from .target import FINAL
from .verifier import TargetKV, TargetVerifier, VerifyRequest


@dataclass
class SequenceState:
    committed: list[int]  # prompt + generated token ids
    prompt_len: int
    max_new_tokens: int
    params: SamplingParams  # seed resolved: every random stream is keyed by it
    gamma: int  # what the schedule asks for
    schedule: GammaSchedule
    target_kv: TargetKV
    # Who drafts for the sequence in this process (the engine's proposer, or heads on a
    # served verifier), and its per-sequence state; None when drafts come from elsewhere.
    proposer: Proposer | None
    draft_state: object
    round: int = 0  # the next round's number; a resumed stream numbers on
    finished: bool = False
    gamma_cap: int | None = None  # a server's plan for its goodput (core/goodput.py); None: no limit
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: int | None = None  # None: none; N: each token's and its top N alternatives' (core/shaping.py)
    stopped_by: int | None = None  # the stop token id the sequence ended on
    # Stop strings: ``feed(tokens)`` -> how many of a round's tokens to keep, ``matched``
    # the stop that ended the output (models/detokenizer.py StopScanner); None = none.
    text_stop: object | None = None
    # Its committed tokens counted for the penalties, kept across rounds (core/shaping.py).
    context_counts: ContextCounts = field(default_factory=ContextCounts)

    @property
    def generated(self) -> list[int]:
        return self.committed[self.prompt_len :]

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.committed) + self.prompt_len

    @property
    def draft_budget(self) -> int:
        return draft_budget(self.effective_gamma, self.remaining)

    @property
    def effective_gamma(self) -> int:
        return self.gamma if self.gamma_cap is None else min(self.gamma, self.gamma_cap)


@dataclass(frozen=True)
class RoundResult:
    tokens: list[int]  # what the round commits, after stop/length truncation
    num_accepted: int  # drafts that passed the acceptance test
    logprobs: list[float] | None = None  # per token, when the sequence asked (VerifyOutcome)
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    stats: GenerationStats
    finish_reason: str = "length"  # or "stop": EOS, a stop token or a stop string
    logprobs: list[float] | None = None  # per token, when asked (RoundResult)
    top_logprobs: list[list[tuple[int, float]]] | None = None


def draft_room(proposer: Proposer | None) -> int:
    """Pool positions a round's drafts may take beyond the committed tokens."""
    return max(MAX_GAMMA, getattr(proposer, "max_nodes", 0))


def reads_hidden(proposer: Proposer | None) -> str:
    """Which hidden states of the target the proposer drafts from (heads on the
    verifier; core/target.py HIDDEN_KINDS), "" for none."""
    if not getattr(proposer, "uses_target_hidden", False):
        return ""
    return getattr(proposer, "target_hidden", FINAL)


class SpeculativeEngine:
    def __init__(
        self,
        verifier: TargetVerifier,
        proposer: Proposer | None,
        eos_token_id: int | None,
        max_context: int,
        schedule: GammaSchedule = GammaSchedule(),
    ):
        self.verifier = verifier
        self.proposer = proposer
        self.eos_token_id = eos_token_id
        self.max_context = max_context
        self.schedule = schedule if proposer is not None else GammaSchedule(initial=0)

    def validate(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        if max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the model context of {self.max_context}"
            )

    def start(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams,
        schedule: GammaSchedule | None = None,
        first_round: int = 0,
        proposer: Proposer | None = None,
        logprobs: int | None = None,
    ) -> SequenceState:
        """``schedule`` overrides the engine's for this sequence (a served request
        chooses its own gamma). ``first_round``: a resumed sequence's round numbering.
        ``proposer`` overrides the engine's (a served verifier's heads for one request).
        ``logprobs``: see SequenceState."""
        self.validate(prompt_ids, max_new_tokens)
        schedule = schedule or self.schedule
        proposer = proposer or self.proposer
        tree = getattr(proposer, "tree", None)
        params = self.resolve(params, len(prompt_ids))
        return SequenceState(
            committed=list(prompt_ids),
            prompt_len=len(prompt_ids),
            max_new_tokens=max_new_tokens,
            params=params,
            round=first_round,
            gamma=schedule.initial,
            schedule=schedule,
            target_kv=self.verifier.new_state(),
            proposer=proposer,
            draft_state=proposer.new_state() if proposer is not None else None,
            stats=GenerationStats(draft_shape=tree.label if tree is not None else ""),
            logprobs=logprobs,
        )

    def resolve(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        """``params`` with every default made concrete: a fresh seed, the stop rule
        (EOS), the prompt's length."""
        params = params.resolve_seed()
        if params.stop is None:
            params = replace(params, stop=StopRule(() if self.eos_token_id is None else (self.eos_token_id,)))
        if params.prompt_len is None:
            params = replace(params, prompt_len=prompt_len)
        return params

    def step(self, seq: SequenceState) -> "RoundResult":
        """One speculative round: the tokens it commits (1 to gamma+1), and their logprobs."""
        t0 = time.perf_counter()
        proposal = self.propose(seq)
        seq.stats.draft_time_s += time.perf_counter() - t0
        return self.verify_and_commit(seq, proposal)

    def propose(self, seq: SequenceState) -> Proposal:
        gamma = seq.draft_budget
        if seq.proposer is None or gamma == 0:
            return Proposal.empty(self.verifier.device)
        if isinstance(seq.proposer, TreeProposer):  # its lookups look further than its chain
            return seq.proposer.propose(seq.draft_state, seq.committed, gamma, seq.params,
                                        lookup_gamma=lookup_budget(seq.effective_gamma, seq.remaining))
        return seq.proposer.propose(seq.draft_state, seq.committed, gamma, seq.params)

    def prefill(self, seq: SequenceState, cached: list = (), lazy: bool = False) -> None:
        """Cache the prompt's KV except its last token, which the first round feeds with
        the drafts. Lets a server prefill the target while the first draft is made.
        ``cached``: blocks of a shared prefix of the prompt, computed elsewhere (see
        TargetVerifier.prefill). ``lazy``: only hold the session's budget, and let the
        first round's pass feed the whole prompt with its drafts: one forward fewer a
        request, which a lone sequence wants (a server prefills eagerly, so that the
        prompt's pass overlaps the first draft and does not widen a batched pass)."""
        t0 = time.perf_counter()
        # Admission: the session holds its whole budget (prompt, new tokens, a block of
        # drafts) from the start, so it never runs out of KV pool mid-stream.
        reserve = len(seq.committed) + seq.remaining + draft_room(seq.proposer) + 1
        if lazy and not cached and not reads_hidden(seq.proposer):
            self.verifier.prefill(seq.target_kv, [], (), reserve)
        elif reads_hidden(seq.proposer):
            # Heads on the verifier read the prompt's hidden states: the first round drafts too.
            hidden = self.verifier.prefill(seq.target_kv, seq.committed[:-1], cached, reserve,
                                           hidden=reads_hidden(seq.proposer))
            if hidden is not None:
                seq.proposer.observe(seq.draft_state, len(seq.committed) - 1 - len(hidden), hidden)
        else:
            self.verifier.prefill(seq.target_kv, seq.committed[:-1], cached, reserve)
        seq.stats.verify_time_s += time.perf_counter() - t0

    def verify_and_commit(self, seq: SequenceState, proposal: Proposal) -> "RoundResult":
        """Verify ``proposal`` after ``seq``'s committed tokens and commit the result."""
        return self.verify_and_commit_batch([seq], [proposal])[0]

    def verify_and_commit_batch(self, seqs: list[SequenceState], proposals: list[Proposal]) -> list["RoundResult"]:
        """One round for several sequences, scored in one forward pass; each sequence's
        result is what it would be alone. Each is charged the whole pass as verify time."""
        t0 = time.perf_counter()
        outcomes = self.verifier.verify(
            [VerifyRequest(s.target_kv, s.committed, p, s.params, s.round, reads_hidden(s.proposer), s.logprobs,
                           s.context_counts) for s, p in zip(seqs, proposals)]
        )
        elapsed = time.perf_counter() - t0
        results = []
        for seq, proposal, outcome in zip(seqs, proposals, outcomes):
            seq.stats.verify_time_s += elapsed
            seq.round += 1
            start = len(seq.committed) - 1  # where the round's first hidden state sits
            new = self._truncate_at_stop(outcome.tokens, seq)
            seq.committed.extend(new)
            ranks = None if proposal.tree is None else proposal.tree.sibling_rank[list(outcome.path)].tolist()
            seq.stats.record_round(len(proposal), outcome.num_accepted, len(new), proposal.depth, ranks)
            seq.gamma = seq.schedule.next(seq.gamma, proposal.depth, outcome.num_accepted)
            if getattr(seq.proposer, "planner", None) is not None:  # a head tree planned from measurement
                seq.proposer.observe_path(seq.draft_state, outcome.path)
            if reads_hidden(seq.proposer) and not seq.finished:
                seq.proposer.observe(seq.draft_state, start, outcome.hidden)
            cut = slice(0, len(new))
            results.append(RoundResult(new, outcome.num_accepted,
                                       None if outcome.logprobs is None else outcome.logprobs[cut],
                                       None if outcome.top_logprobs is None else outcome.top_logprobs[cut]))
        return results

    def release(self, seq: SequenceState) -> None:
        """Free the sequence's target KV (the runner holds it until told)."""
        self.verifier.release([seq.target_kv])

    def _truncate_at_stop(self, tokens: list[int], seq: SequenceState) -> list[int]:
        """The round's tokens up to the first stop token (kept) or the length limit."""
        tokens = tokens[: seq.remaining]
        stop = seq.params.stop
        produced = len(seq.committed) - seq.params.prompt_len  # output before tokens[0]
        for i, token in enumerate(tokens):
            if token in stop.token_ids and produced + i >= stop.min_tokens:
                tokens = tokens[: i + 1]
                seq.finished, seq.stopped_by = True, token
                break
        if seq.text_stop is not None and tokens:
            keep = seq.text_stop.feed(tokens)
            if seq.text_stop.matched is not None:
                tokens = tokens[:keep]
                seq.finished, seq.stopped_by = True, None
        if len(tokens) == seq.remaining:
            seq.finished = True
        return tokens

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        on_tokens: Callable[[list[int]], None] | None = None,
        logprobs: int | None = None,
        text_stop: object | None = None,
    ) -> GenerationResult:
        """``logprobs``, ``text_stop``: see SequenceState."""
        seq = self.start(prompt_ids, max_new_tokens, params, logprobs=logprobs)
        seq.text_stop = text_stop
        start = time.perf_counter()
        lps, tops = ([], []) if logprobs is not None else (None, None)
        try:
            self.prefill(seq, lazy=True)
            while not seq.finished:
                result = self.step(seq)
                if lps is not None:
                    lps += result.logprobs
                    tops += result.top_logprobs
                if on_tokens is not None:
                    on_tokens(result.tokens)
        finally:
            self.release(seq)
        seq.stats.total_time_s = time.perf_counter() - start
        stopped = seq.stopped_by is not None or getattr(text_stop, "matched", None) is not None
        return GenerationResult(seq.generated, seq.stats, "stop" if stopped else "length", lps, tops)
