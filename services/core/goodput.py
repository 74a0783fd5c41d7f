"""The goodput controller: how many tokens each session drafts next round, 0 to stop.

Speculation pays while verifying gamma+1 positions costs about what verifying one does.
Under load a batched pass turns compute-bound and every drafted position costs real
time; a session whose drafts are rejected pays for positions it never keeps; a remote
draft adds a hop to every round. The controller chooses, per replica and per session,
the gammas that maximise measured goodput, committed tokens per second across the
replica (SmartSpec's objective), from measurements only:

  T(n) = a + b*n              one verify pass over n positions, fitted online
  alpha_i                     session i's per-draft acceptance, decayed counts
  E_i(g) = (1 - alpha_i^(g+1)) / (1 - alpha_i)     tokens a round commits (Leviathan)
  o_i(g) = 0 if g == 0 else h_i + d_i*g            what drafting adds to i's round:
                              the hop (transport) and draft time pipelining left exposed
  goodput(g) = sum_i E_i(g_i) / (k*T(N) + o_i(g_i)),  N = share * sum_i (g_i + 1)

where k passes serve a round of every session and ``share`` of them is in each pass
(more sessions than ``max_batch``). The plan maximises goodput by coordinate ascent
(each session's best gamma with the others fixed, sweeps until none changes), recomputed
once per pass; it lands within a fraction of a percent of the exhaustive optimum. A
client's gamma is the ceiling of the search, never an order.

A session the plan stops (gamma 0) is re-probed now and then with a short draft, at
exponentially growing intervals, so that a request whose text turned predictable again
comes back. Without two pass sizes to fit T, nothing is limited. Where the plan's gain
is small, it is also checked against plain decoding by measurement (``ArmCheck``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

PROBE_GAMMA = 2  # drafts of a probe round: enough to re-measure acceptance, cheap if rejected
PROBE_EVERY, PROBE_MAX = 16, 256  # rounds between probes of a stopped session, doubling up to the max
DECAY = 0.9  # per observed round: a session's acceptance follows its text within ~10 rounds
# Estimates start from PRIOR_ALPHA and shrink towards it by PRIOR_WEIGHT pseudo-drafts:
# the replica's pooled acceptance towards PRIOR_ALPHA, a session's towards the pooled.
# A first rejected round moves an estimate part of the way, not to 0.
PRIOR_ALPHA, PRIOR_WEIGHT = 0.7, 2.0
MIN_PASSES_PER_SIZE = 4  # T(n) is fitted once two pass sizes have this many passes each
# Measured, not modelled, where the model is least sure: while the plan's predicted gain
# over plain decoding is below CHECK_BELOW, every CHECK_EVERY passes the replica runs
# CHECK_PASSES passes of the arm not in use (plain decoding, or the plan), the first
# SETTLE of them uncounted (drafters catching up), and keeps the faster arm.
CHECK_BELOW, CHECK_EVERY, CHECK_PASSES, SETTLE = 1.5, 48, 12, 3


class PassCost:
    """T(n) = a + b*n over the replica's recent verify passes, refitted when asked after
    a new pass (least squares over the window)."""

    def __init__(self, window: int = 256):
        self.passes: deque[tuple[int, float]] = deque(maxlen=window)  # (positions, seconds)
        self._fit: tuple[float, float] | None = None
        self._stale = True

    def observe(self, positions: int, seconds: float) -> None:
        self.passes.append((positions, seconds))
        self._stale = True

    def fit(self) -> tuple[float, float] | None:
        if self._stale:
            self._fit, self._stale = self._regress(), False
        return self._fit

    def _regress(self) -> tuple[float, float] | None:
        sizes: dict[int, int] = {}
        for n, _ in self.passes:
            sizes[n] = sizes.get(n, 0) + 1
        if sum(count >= MIN_PASSES_PER_SIZE for count in sizes.values()) < 2:
            return None  # one size (or too few): a slope would be noise
        return fit_line([n for n, _ in self.passes], [t for _, t in self.passes])


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept >= 0, slope >= 0) of the least-squares line; no slope for one x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return max(0.0, my - slope * mx), slope


@dataclass(eq=False)
class SessionControl:
    """One session's measurements and its gamma in the current plan."""

    ceiling: int  # the gamma its request asked for: the controller never drafts more
    fixed: bool = False  # drafts its ceiling whatever the plan (counted in the plan's passes)
    successes: float = 0.0  # decayed accepted drafts
    failures: float = 0.0  # decayed rounds that ended on a rejected draft
    hop_s: float = 0.0  # EWMA per drafting round: transport
    draft_s: float = 0.0  # EWMA per drafted token: exposed draft time
    measured: bool = False  # one drafting round observed
    planned: int | None = None  # None: not planned yet (no limit)
    off_rounds: int = 0  # rounds at gamma 0 since the last probe
    probe_every: int = PROBE_EVERY
    probing: bool = False
    reading: bool = False  # its draft worker still reads the context: it decodes without drafts meanwhile

    @property
    def steered(self) -> bool:
        """The plan and the measured arm choose its gamma (not target-only, not a fixed shape)."""
        return self.ceiling > 0 and not self.fixed

    def alpha(self, prior: float) -> float:
        drafted = self.successes + self.failures
        return min((self.successes + PRIOR_WEIGHT * prior) / (drafted + PRIOR_WEIGHT), 0.999)


def expected_tokens(alpha: np.ndarray | float, gamma: np.ndarray | int):
    """Tokens a round with ``gamma`` drafts commits at per-draft acceptance ``alpha``."""
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


class ArmCheck:
    """The plan against plain decoding, by measurement. The model sees the pass cost,
    acceptance and exposed draft time; it does not see what drafting costs the target
    where both share hardware (a CPU node's cores, a GPU's memory bandwidth), nor any
    other cost it leaves out. Where its predicted gain is small, the replica measures
    both arms now and then and keeps the faster: committed tokens per second over the
    same number of passes."""

    def __init__(self):
        self.plain = False  # the arm in use: True = every session at gamma 0
        self.passes = 0  # since the last check
        self.window: list | None = None  # [arm, passes, tokens, first start, last end] while checking
        self.baseline = 0.0  # the arm in use's rate just before the check
        self.checks = 0

    @property
    def plain_now(self) -> bool:
        return self.window[0] if self.window is not None else self.plain

    def observe(self, start: float, end: float, committed: int, recent_rate: Callable[[], float],
                needed: bool) -> bool:
        """One pass; ``recent_rate()``: committed tokens/s over the latest passes; ``needed``:
        the model is unsure. Returns whether the arm changed (the plan is stale)."""
        if self.window is None:
            self.passes += 1
            if not needed:
                changed, self.plain, self.passes = self.plain, False, 0  # the model is sure: the plan
                return changed
            if self.passes >= CHECK_EVERY:
                self.window, self.baseline = [not self.plain, 0, 0, None, None], recent_rate()
                return True
            return False
        window = self.window
        window[1] += 1
        if window[1] > SETTLE:
            window[2] += committed
            window[3] = start if window[3] is None else window[3]
            window[4] = end
        if window[1] < CHECK_PASSES:
            return False
        rate = window[2] / (window[4] - window[3]) if window[4] and window[4] > window[3] else 0.0
        if rate > self.baseline:
            self.plain = window[0]
        self.window, self.passes = None, 0
        self.checks += 1
        return True


class GoodputController:
    def __init__(self, max_batch: int, window: int = 256):
        self.max_batch = max(1, max_batch)
        self.cost = PassCost(window)
        self.sessions: list[SessionControl] = []
        self.pooled = [0.0, 0.0]  # decayed successes, failures over every session
        self._stale = True
        self.predicted = 0.0  # tokens/s the current plan expects
        self.gain = math.inf  # ... over plain decoding (every session at gamma 0)
        self.check = ArmCheck()
        self.committed: deque[tuple[float, float, int]] = deque(maxlen=window)  # (start, end, tokens) per pass

    # -- what the verifier tells it ------------------------------------------------

    def join(self, ceiling: int, fixed: bool = False) -> SessionControl:
        control = SessionControl(ceiling=ceiling, fixed=fixed)
        self.sessions.append(control)
        self._stale = True
        return control

    def leave(self, control: SessionControl) -> None:
        if control in self.sessions:
            self.sessions.remove(control)
            self._stale = True

    def observe_pass(self, positions: int, seconds: float, committed: int, end: float | None = None) -> None:
        end = time.perf_counter() if end is None else end
        self.cost.observe(positions, seconds)
        self.committed.append((end - seconds, end, committed))
        self._stale = True
        if not any(c.steered and not c.reading for c in self.sessions):
            # Target-only requests, sessions whose workers still read their prompts, or
            # none: nothing to say about the arms, nothing to reset.
            return
        # A plan that drafts nothing (gain 1) has nothing to check: its probes go on.
        if self.check.observe(end - seconds, end, committed, lambda: self.measured_goodput(CHECK_PASSES - SETTLE),
                              1.0 < self.gain < CHECK_BELOW):
            for c in self.sessions:  # drafting resumes, or stops, for every session at once
                c.off_rounds = 0

    def observe_round(self, control: SessionControl, drafted: int, accepted: int, exposed_draft_s: float | None,
                      transport_s: float | None) -> None:
        """A round of ``control``'s session: ``accepted`` of ``drafted`` drafts, and the
        time its draft added to the round (exposed draft compute and the hop). None for
        the times of a session's first round: its draft also read the whole prompt (the
        draft model's prefill, or EAGLE's pass over the prompt's features), a cost paid
        once that would price every later draft far too high."""
        if drafted == 0:
            return
        # Acceptance as a geometric run: a round accepting a of g drafts saw a
        # successes, then one failure unless a == g (the maximum-likelihood alpha is
        # successes / (successes + failures); accepted / drafted is biased low).
        failed = float(accepted < drafted)
        control.successes = DECAY * control.successes + accepted
        control.failures = DECAY * control.failures + failed
        self.pooled = [DECAY * self.pooled[0] + accepted, DECAY * self.pooled[1] + failed]
        if exposed_draft_s is not None:
            weight = 0.5 if control.measured else 1.0  # EWMA; the first round measured sets it
            control.hop_s += weight * (transport_s - control.hop_s)
            control.draft_s += weight * (exposed_draft_s / drafted - control.draft_s)
            control.measured = True
        if control.probing:
            control.probing = False
            self._stale = True  # re-plan with what the probe measured
            if accepted == drafted:  # acceptance may be back: the next probe soon
                control.probe_every = PROBE_EVERY

    # -- what it answers -----------------------------------------------------------

    def gamma(self, control: SessionControl) -> int:
        """The gamma ``control``'s session drafts next round."""
        if control.fixed:
            return control.ceiling
        if self._stale:
            self._plan()
        if self.check.plain_now:  # measured faster than the plan here (ArmCheck), or being measured
            return 0
        planned = control.ceiling if control.planned is None else min(control.planned, control.ceiling)
        if planned > 0 or control.ceiling == 0:
            control.off_rounds, control.probing = 0, False
            if planned > 0:
                control.probe_every = PROBE_EVERY
            return planned
        control.off_rounds += 1
        if control.off_rounds < control.probe_every:
            return 0
        # Stopped long enough: draft a little, to see whether acceptance came back.
        control.off_rounds, control.probing = 0, True
        control.probe_every = min(PROBE_MAX, control.probe_every * 2)
        return min(PROBE_GAMMA, control.ceiling)

    def alpha(self, control: SessionControl) -> float:
        """The session's per-draft acceptance, shrunk towards the replica's pooled one."""
        pooled = (self.pooled[0] + PRIOR_WEIGHT * PRIOR_ALPHA) / (sum(self.pooled) + PRIOR_WEIGHT)
        return control.alpha(pooled)

    @property
    def not_speculating(self) -> int:
        plain = self.check.plain_now
        return sum((plain or c.planned == 0) and c.steered for c in self.sessions)

    def mean_planned_gamma(self) -> float:
        planned = [c.ceiling if c.planned is None else min(c.planned, c.ceiling)
                   for c in self.sessions if c.steered]
        return sum(planned) / len(planned) if planned else 0.0

    def measured_goodput(self, passes: int | None = None) -> float:
        """Committed tokens per second over the latest ``passes`` passes' wall-clock span
        (all those kept: None)."""
        recent = list(self.committed)[-passes:] if passes else list(self.committed)
        if len(recent) < 2:
            return 0.0
        span = recent[-1][1] - recent[0][0]
        return sum(tokens for _, _, tokens in recent) / span if span > 0 else 0.0

    def _plan(self) -> None:
        self._stale = False
        fit = self.cost.fit()
        live = [c for c in self.sessions if c.ceiling > 0]
        if fit is None or not live:
            for c in self.sessions:
                c.planned = None
            self.predicted, self.gain = 0.0, math.inf
            return
        a, b = fit
        alpha = np.array([self.alpha(c) for c in live])
        hop = np.array([c.hop_s for c in live])
        draft = np.array([c.draft_s for c in live])
        passes = math.ceil(len(self.sessions) / self.max_batch)
        share = min(1.0, self.max_batch / len(self.sessions))
        idle = len(self.sessions) - len(live)  # sessions that never draft: one position, one token a round
        top = max(c.ceiling for c in live)
        candidates = np.arange(top + 1)  # [G]
        gammas = np.array([c.ceiling if c.planned is None else min(c.planned, c.ceiling) for c in live])
        gain = expected_tokens(alpha[:, None], candidates[None, :])  # [S, G]
        extra = np.where(candidates[None, :] > 0, hop[:, None] + draft[:, None] * candidates[None, :], 0.0)  # [S, G]
        ceilings = np.array([c.ceiling for c in live])[:, None]
        fixed = np.array([c.fixed for c in live])[:, None]
        allowed = np.where(fixed, candidates[None, :] == ceilings, candidates[None, :] <= ceilings)  # [S, G]
        rows = np.arange(len(live))

        def goodput_if(i: int) -> np.ndarray:
            """Goodput for each candidate gamma of session i, the others as planned: [G]."""
            positions = share * (np.sum(gammas + 1) - gammas[i] - 1 + candidates + 1 + idle)  # [G]
            pass_s = passes * (a + b * positions)  # [G]
            mine = gain[i] / (pass_s + extra[i])  # [G]
            rest = gain[rows, gammas][:, None] / (pass_s[None, :] + extra[rows, gammas][:, None])  # [S, G]
            return mine + rest.sum(axis=0) - rest[i] + idle / pass_s

        for _ in range(4):  # sweeps, until no session changes (two, nearly always)
            before = gammas.copy()
            for i in range(len(live)):
                scores = np.where(allowed[i], goodput_if(i), -np.inf)
                gammas[i] = int(np.argmax(scores))
            if np.array_equal(before, gammas):
                break
        for c, g in zip(live, gammas):
            c.planned = int(g)
        self.predicted = float(goodput_if(0)[gammas[0]])
        plain = len(self.sessions) / (passes * (a + b * share * len(self.sessions)))  # every session at gamma 0
        self.gain = self.predicted / plain
