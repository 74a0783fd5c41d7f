"""The speculation cache (speculative speculative decoding, SSD / "Saguaro", 2026): while
the target verifies round k, the draft worker pre-drafts round k+1 for the *several*
outcomes of round k it finds likeliest, not only for the one plain pipelining assumes.

An outcome is (a, t): round k accepts a of its N drafts, then the target emits t, the
bonus token when a = N, its correction of draft a otherwise. Its probability is
estimated from what the worker already has:

    alpha_j   = P(draft j accepted | drafts before it were), a blend of the draft's own
                probability of draft j and the session's measured acceptance at depth j
    P(a)      = alpha_0 ... alpha_{a-1} * (1 - alpha_a)          (a < N)
              = alpha_0 ... alpha_{N-1}                            (a = N)
    P(t | a)  = q_N(t)                          for the bonus (a = N)
              = q_a(t) / (1 - q_a(x_a)),  t != x_a,  for a correction: greedy verification
                emits the target's argmax, which is not the rejected draft, and the
                draft's next likeliest tokens are the best guesses of it we have.

Each branch is a block drafted after ``committed + drafts[:a] + [t]``.

Why the cache is lossless, and changes no token: a draft at absolute position p draws
from the stream keyed by (seed, p) (core/proposers.py), so a branch drafted for an
outcome is exactly the block a fresh draft would propose after that outcome's prefix,
whichever branch, round or worker drafts it. Which branch is used depends only on the
outcome the verifier reports; the others are dropped untested. A round's block, and so
the whole stream, is the same with the cache on or off: the cache changes when a block
is ready, never what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from .proposals import DraftAlternatives, Proposal

PRIOR_ROUNDS = 4.0  # pseudo-observations of the draft's own confidence per depth, before history outweighs it
MAX_FANOUT = 16  # branches a session may ask for a round
MIN_BRANCH_PROB = 0.002  # a branch this unlikely is not worth a row of the worker's batch


@dataclass(frozen=True)
class Outcome:
    accepted: int  # how many of the verified block's drafts it assumes accepted
    token: int  # the target's next token it assumes: the bonus, or the correction of draft ``accepted``
    prob: float  # its estimated probability


class AcceptanceHistory:
    """A session's measured acceptance per depth: how often draft j was accepted when
    every draft before it was."""

    def __init__(self):
        self.reached: list[int] = []
        self.accepted: list[int] = []

    def observe(self, drafted: int, accepted: int) -> None:
        grow = drafted - len(self.reached)
        if grow > 0:
            self.reached += [0] * grow
            self.accepted += [0] * grow
        for j in range(min(drafted, accepted + 1)):  # drafts after the first rejection were never tested
            self.reached[j] += 1
            self.accepted[j] += j < accepted

    def rate(self, depth: int, confidence: float) -> float:
        """alpha at ``depth``: the draft's confidence, as PRIOR_ROUNDS observations,
        pulled toward what this session measured there."""
        reached = self.reached[depth] if depth < len(self.reached) else 0
        accepted = self.accepted[depth] if depth < len(self.accepted) else 0
        return (accepted + PRIOR_ROUNDS * confidence) / (reached + PRIOR_ROUNDS)


def likely_outcomes(block: Proposal, bonus: DraftAlternatives | None, bonus_token: int | None,
                    history: AcceptanceHistory, limit: int) -> list[Outcome]:
    """The ``limit`` likeliest outcomes of verifying ``block`` (a chain), likeliest
    first. ``bonus``: the draft's alternatives after the whole block ([1, K]);
    ``bonus_token``: its own next token there, the guess when it has no alternatives
    (n-gram lookup). Full acceptance with the likeliest bonus always comes first: it
    is plain pipelining's one guess. Others need MIN_BRANCH_PROB. A coupled request's
    alternatives come ranked by the draft's perturbed scores (core/proposers.py), so
    its own token leads: the target's bonus is drawn under the same noise."""
    n = len(block)
    alts = block.alternatives
    if bonus is not None:
        bonus_guesses = list(zip(bonus.ids[0].tolist(), bonus.probs[0].tolist()))
    elif bonus_token is not None:
        bonus_guesses = [(bonus_token, 1.0)]
    else:
        return []
    if alts is None:  # a deterministic proposer: nothing to say which draft fails, or what comes instead
        return [Outcome(n, bonus_guesses[0][0], 1.0)][:limit]
    tokens = block.tokens.tolist()
    ids, probs = alts.ids.tolist(), alts.probs.tolist()
    outcomes = []
    reach = 1.0  # P(every draft before j accepted)
    for j in range(n):
        confidence = dict(zip(ids[j], probs[j])).get(tokens[j], 0.0)
        alpha = min(max(history.rate(j, confidence), 0.0), 1.0)
        rejected = reach * (1 - alpha)
        others = 1 - confidence
        if rejected > 0 and others > 0:
            outcomes += [Outcome(j, t, rejected * p / others) for t, p in zip(ids[j], probs[j]) if t != tokens[j]]
        reach *= alpha
    full = [Outcome(n, t, reach * p) for t, p in bonus_guesses]
    rest = sorted(full[1:] + outcomes, key=lambda o: -o.prob)
    return [full[0]] + [o for o in rest if o.prob >= MIN_BRANCH_PROB][: max(0, limit - 1)]


def fanout_for_load(requested: int, sessions: int, rows: int) -> int:
    """How many branches a session drafts when ``sessions`` share a worker whose
    batched step can take ``rows`` rows in time (``StepCosts``): the rows go round, so
    under load, or where rows cost what they compute, every session falls back to one
    guess (plain pipelining), never to fewer rows for someone else."""
    if requested <= 1:
        return requested
    return max(1, min(requested, rows // max(1, sessions)))


class StepCosts:
    """The draft model's step time by batch size, measured on the worker, and so how
    many rows a round's branches can take and still be done before the verifier is.

    A branch is worth drafting only if drafting it does not make the likeliest branch
    late: the round's whole batch must finish within the verification it hides under.
    Measured, because it depends on the hardware and the load: on this repo's 2-core CPU
    host (verifier and draft worker on one machine) a round of 9 steps takes 33 ms for
    one row and 45 ms for two, against a 41 ms verification, so one guess it is; on a GPU
    the bundled draft's step is host-bound (H200: 2.4 ms for one row, 3.9 ms for eight),
    so a slower target's verification hides eight branches.
    """

    def __init__(self, decay: float = 0.9, probe_every: int = 256):
        self.decay, self.probe_every = decay, probe_every
        self.seconds: dict[int, float] = {}  # batch size -> mean step seconds (exponentially weighted)
        self.warm: set[int] = set()  # sizes whose first step (kernel selection, allocation) was seen
        self.asked = 0

    def observe(self, rows: int, seconds: float) -> None:
        if rows not in self.warm:  # a size's first step pays one-time costs (35 ms for 1.4 on an H200)
            self.warm.add(rows)
            return
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def rows_within(self, limit: int, steps: int, window_s: float | None) -> int:
        """The most rows, up to ``limit``, whose ``steps`` steps fit in ``window_s``
        (the verification a round's branches hide under; None: not measured yet, so
        one row). A size not measured yet is tried once, to measure it; and now and
        then one row more than fits, since the load changes."""
        self.asked += 1
        if window_s is None or self.seconds.get(1) is None:
            return 1
        fits = 1
        for rows in range(2, limit + 1):
            seconds = self.seconds.get(rows)
            if seconds is None:
                return rows
            if seconds * steps > window_s:
                break
            fits = rows
        if self.asked % self.probe_every == 0:
            return min(limit, fits + 1)
        return fits
