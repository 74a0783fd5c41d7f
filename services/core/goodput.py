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
  p_i                         how often i's block comes after the verifier asks for it
                              (late: a pipelining miss, a redraft), decayed
  L(g) = c + d*g + r          how long a late block of g drafts keeps its round waiting
                              (the hop and the exposed draft time): a line fitted online
                              over the replica's late rounds, r their residuals
  cap = linger*T(N)           the most a pass waits for rounds still out (verifier/batcher.py;
                              no cap for one session: no pass can run without it)
  o_i(g) = p_i * E[min(L(g), cap)]    what i's late blocks add to a pass's wait, on average
  m_i(g) = p_i * P(L(g) > cap)        the share of i's rounds whose block misses its pass
  W = min(cap, (1 - prod_i (1 - p_i)^share) * sum_i o_i / sum_i p_i)
                              what each pass waits for late blocks (over drafting sessions)
  goodput(g) = sum_i E_i(g_i) / ((k + m_i(g_i)) * (T(N) + W)),
                              N = share * sum_i (g_i + 1), all at g_i = 0 where i does not draft

where k passes serve a round of every session and ``share`` of them is in each pass
(more sessions than ``max_batch``). W makes one session's late block every session's
cost: the batcher lingers for rounds still out, so the pass waits for the latest block.
A block later than the cap misses the pass, and its round waits out the next one: a
whole pass, not the rest of its block's wait. Without W the model let a few sessions
draft at 16 served sampled streams (predicted 1.00-1.13x plain decoding) where the
replica ran at 0.70x, and at 1.05x with drafting off; without misses, at 4 sampled
streams it kept predicting 1.1-1.3x for drafting that ran at 0.6x. The plan
maximises goodput by coordinate ascent (each session's best gamma with the others
fixed), from the present plan and from plain decoding, every few passes
(REPLAN_SESSIONS); it lands within a fraction of a percent of the exhaustive optimum.
A client's gamma is the ceiling.

A session the plan stops (gamma 0) is re-probed with a short draft at exponentially
growing intervals, so that a request whose text turned predictable again comes back;
only if the plan would let it draft were its acceptance HOPEFUL_ALPHA (or the replica's
pooled, if higher): a session stopped by the load, or by what its blocks cost, is not
probed, as each probe is a late block the pass waits for. Without two pass sizes to fit
T, nothing is limited. Where the plan's gain is small, it is also checked against plain
decoding by measurement (``ArmCheck``, core/arm_check.py).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .arm_check import CHECK_PASSES, SETTLE, ArmCheck

PROBE_GAMMA = 2  # drafts of a probe round: enough to re-measure acceptance, cheap if rejected
PROBE_EVERY, PROBE_MAX = 16, 256  # rounds between probes of a stopped session, doubling up to the max
DECAY = 0.9  # per observed round: a session's acceptance follows its text within ~10 rounds
# Estimates start from PRIOR_ALPHA and shrink towards it by PRIOR_WEIGHT pseudo-drafts:
# the replica's pooled acceptance towards PRIOR_ALPHA, a session's towards the pooled.
# A first rejected round moves an estimate part of the way, not to 0.
PRIOR_ALPHA, PRIOR_WEIGHT = 0.7, 2.0
HOPEFUL_ALPHA = 0.9  # a stopped session is probed only if drafting would pay at this acceptance
LATE_S = 0.001  # a block that kept its round waiting longer than this was late (not an event-loop hop)
# A timed round's weight in p_i: a session's first rounds (its worker warming up) fade in a
# few. A stopped session is not timed: its p_i drifts to the replica's, which decays by DECAY
# every AGE_ROUNDS rounds of every session while they decode plain, so drafting is retried.
LATE_WEIGHT, AGE_ROUNDS = 0.25, 4
MIN_PASSES_PER_SIZE = 4  # T(n) is fitted once two pass sizes have this many passes each
# A pass waits up to this many of the last pass's durations for the rounds of sessions
# not yet in (verifier/batcher.py): a fuller pass costs little more than a thinner one.
LINGER = 0.5
# The plan is made again after ceil(sessions / REPLAN_SESSIONS) passes (and at once when a
# session joins, leaves or ends a probe). Each plan runs on the event loop between passes,
# where every session's next round waits for it: measured on this 2-core CPU, 0.17 ms at 1
# session, 1.9 ms at 16 against a 40 ms pass; re-planned every pass, the served gap between
# passes at 16 streams was 4.3 ms against 1.4 ms target-only.
REPLAN_SESSIONS = 4


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

    def spread(self, xs: np.ndarray) -> np.ndarray:
        """[len(xs), R]: the line at each x plus each kept sample's residual (R: the samples
        kept; none, no columns). Before two sizes are fitted, the line is the samples' mean."""
        samples = np.array(self.passes, dtype=float).reshape(-1, 2)  # [R, 2]: x, seconds
        if not len(samples):
            return np.zeros((len(xs), 0))
        a, b = self.fit() or (float(samples[:, 1].mean()), 0.0)
        residuals = samples[:, 1] - (a + b * samples[:, 0])  # [R]
        return a + b * xs[:, None] + residuals[None, :]

    def _regress(self) -> tuple[float, float] | None:
        sizes: dict[int, int] = {}
        for n, _ in self.passes:
            sizes[n] = sizes.get(n, 0) + 1
        if sum(count >= MIN_PASSES_PER_SIZE for count in sizes.values()) < 2:
            # One size (or too few): a slope would be noise. (Once the window holds a
            # single size, as at a steady load where every session decodes plain, the fit
            # is forgotten and nothing is limited till two sizes are measured again: a
            # few passes that re-measure drafting. Keeping the slope instead kept one
            # measured under 16 sampled streams at 1 stream, where it stopped drafting
            # that paid 1.7x: served, 0.89x target-only in one of two runs.)
            return None
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
    late: float | None = None  # p_i: the share of its timed drafting rounds whose block was late (EWMA)
    planned: int | None = None  # None: not planned yet (no limit)
    off_rounds: int = 0  # rounds at gamma 0 since the last probe
    probe_every: int = PROBE_EVERY
    probing: bool = False
    worth_probing: bool = True  # stopped, would the plan let it draft if it accepted well?
    reading: bool = False  # its draft worker still reads the context: it decodes without drafts meanwhile

    @property
    def steered(self) -> bool:
        """The plan and the measured arm choose its gamma (not target-only, not a fixed shape)."""
        return self.ceiling > 0 and not self.fixed

    def alpha(self, prior: float) -> float:
        drafted = self.successes + self.failures
        return min((self.successes + PRIOR_WEIGHT * prior) / (drafted + PRIOR_WEIGHT), 0.999)


def _moved(share: float | None, late: bool) -> float:  # a share of late rounds after one more (the first sets it)
    return float(late) if share is None else share + LATE_WEIGHT * (late - share)


def expected_tokens(alpha: np.ndarray | float, gamma: np.ndarray | int):
    """Tokens a round with ``gamma`` drafts commits at per-draft acceptance ``alpha``."""
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


class GoodputController:
    def __init__(self, max_batch: int, window: int = 256, linger: float = LINGER):
        self.max_batch = max(1, max_batch)
        self.linger = linger  # the batcher's: the most a pass waits for rounds still out, x its duration
        self.cost = PassCost(window)
        self.sessions: list[SessionControl] = []
        self.pooled = [0.0, 0.0]  # decayed successes, failures over every session
        self.typical_late: float | None = None  # p over all sessions' timed rounds: a new session's till it has its own
        self.waits = PassCost(window)  # L(g) = c + d*g (+ residuals), over the replica's late rounds (g drafts, seconds waited)
        self._stale = True
        self.predicted = 0.0  # tokens/s the current plan expects
        self.gain = math.inf  # ... over plain decoding (every session at gamma 0)
        self.cap = math.inf  # the most a pass waits for late blocks, as the last plan took it
        self.check = ArmCheck()
        self.unplanned_passes = 0  # passes since the plan was last made
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
        self.unplanned_passes += 1
        if self.unplanned_passes >= math.ceil(len(self.sessions) / REPLAN_SESSIONS):
            self._stale = True
        if not any(c.steered and not c.reading for c in self.sessions):
            # Target-only requests, sessions whose workers still read their prompts, or
            # none: nothing to say about the arms, nothing to reset.
            return
        if self.check.observe(end - seconds, end, committed, lambda: self.measured_goodput(CHECK_PASSES - SETTLE),
                              self.gain):
            for c in self.sessions:  # drafting resumes, or stops, for every session at once
                c.off_rounds = 0

    def observe_round(self, control: SessionControl, drafted: int, accepted: int, exposed_draft_s: float | None,
                      transport_s: float | None) -> None:
        """A round of ``control``'s session: ``accepted`` of ``drafted`` drafts, and the
        time its block kept it waiting (exposed draft compute and the hop). None where the
        block also read the context (a first round: the prompt; a probe's, a resume's: what
        was committed while stopped), a cost that would price every later draft too high."""
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
            waited = transport_s + exposed_draft_s
            late = waited > LATE_S
            control.late, self.typical_late = _moved(control.late, late), _moved(self.typical_late, late)
            if late:
                self.waits.observe(drafted, waited)
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
        if control.late is not None and self.typical_late is not None:  # unmeasured while stopped: see LATE_WEIGHT
            control.late += (1 - DECAY) * (self.typical_late - control.late)
            self.typical_late *= DECAY ** (1 / (AGE_ROUNDS * len(self.sessions)))
        if not control.worth_probing:
            return 0
        control.off_rounds += 1
        if control.off_rounds < control.probe_every:
            return 0
        # Stopped long enough: draft a little, to see whether acceptance came back.
        control.off_rounds, control.probing = 0, True
        control.probe_every = min(PROBE_MAX, control.probe_every * 2)
        return min(PROBE_GAMMA, control.ceiling)

    def alpha(self, control: SessionControl) -> float:
        """The session's per-draft acceptance, shrunk towards the replica's pooled one."""
        return control.alpha(self.pooled_alpha())

    def pooled_alpha(self) -> float:
        return (self.pooled[0] + PRIOR_WEIGHT * PRIOR_ALPHA) / (sum(self.pooled) + PRIOR_WEIGHT)

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

    def late_wait(self, gammas: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray]:
        """For a late block of each of ``gammas`` drafts: E[min(L, cap)], its wait as a pass
        lingering at most ``cap`` sees it, and P(L > cap), the chance it misses the pass.
        L: the fitted line (once late rounds of two block lengths are measured; till then
        their mean) plus the measured rounds' residuals, so a spread of waits is priced as
        measured, not as its mean."""
        waits = np.maximum(0.0, self.waits.spread(gammas))  # [G, R]
        if not waits.shape[1]:
            return np.zeros(len(gammas)), np.zeros(len(gammas))
        return np.minimum(waits, cap).mean(axis=1), (waits > cap).mean(axis=1)

    def _plan(self) -> None:
        self._stale, self.unplanned_passes = False, 0
        fit = self.cost.fit()
        live = [c for c in self.sessions if c.ceiling > 0]
        if fit is None or not live:
            for c in self.sessions:
                c.planned = None
            self.predicted, self.gain = 0.0, math.inf
            return
        a, b = fit
        alpha = np.array([self.alpha(c) for c in live])
        late = np.array([c.late if c.late is not None else self.typical_late or 0.0 for c in live])  # p_i
        passes = math.ceil(len(self.sessions) / self.max_batch)
        share = min(1.0, self.max_batch / len(self.sessions))
        idle = len(self.sessions) - len(live)  # sessions that never draft: one position, one token a round
        top = max(c.ceiling for c in live)
        candidates = np.arange(top + 1)  # [G]
        gammas = np.array([c.ceiling if c.planned is None else min(c.planned, c.ceiling) for c in live])
        gain = expected_tokens(alpha[:, None], candidates[None, :])  # [S, G]
        # The batcher's cap on a pass's wait, at the present plan's pass: none for one session.
        cap = self.linger * (a + b * share * (np.sum(gammas + 1) + idle)) if len(self.sessions) > 1 else math.inf
        self.cap = float(cap)
        capped, over = self.late_wait(candidates, cap)  # [G]
        # o_i(g), m_i(g), and p_i where i drafts: [S, G]
        drafting = candidates[None, :] > 0
        extra = np.where(drafting, late[:, None] * capped[None, :], 0.0)
        missed = np.where(drafting, late[:, None] * over[None, :], 0.0)
        chance = np.where(drafting, late[:, None], 0.0)
        on_time = np.log1p(-np.minimum(chance, 1 - 1e-9))  # log (1 - p_i)
        ceilings = np.array([c.ceiling for c in live])[:, None]
        fixed = np.array([c.fixed for c in live])[:, None]
        allowed = np.where(fixed, candidates[None, :] == ceilings, candidates[None, :] <= ceilings)  # [S, G]
        rows = np.arange(len(live))

        def goodput_if(i: int, gammas: np.ndarray) -> np.ndarray:
            """Goodput for each candidate gamma of session i, the others at ``gammas``: [G]."""
            positions = share * (np.sum(gammas + 1) - gammas[i] - 1 + candidates + 1 + idle)  # [G]
            one_pass = a + b * positions  # [G]
            others = extra[rows, gammas]  # [S]
            waits = others.sum() - others[i] + extra[i]  # [G]
            chances = chance[rows, gammas].sum() - chance[i, gammas[i]] + chance[i]  # [G]
            some_late = 1 - np.exp(share * (on_time[rows, gammas].sum() - on_time[i, gammas[i]] + on_time[i]))  # [G]
            mean_wait = np.divide(waits, chances, out=np.zeros_like(waits), where=chances > 0)
            wait = np.minimum(cap, some_late * mean_wait)  # W, [G]
            period = passes * (one_pass + wait)  # [G]
            mine = gain[i] / (period + missed[i] * (one_pass + wait))  # [G]
            rest = gain[rows, gammas][:, None] / (period + missed[rows, gammas][:, None] * (one_pass + wait))  # [S, G]
            return mine + rest.sum(axis=0) - rest[i] + idle / period

        def ascend(gammas: np.ndarray) -> np.ndarray:
            for _ in range(4):  # sweeps, until no session changes (two, nearly always)
                before = gammas.copy()
                for i in range(len(live)):
                    gammas[i] = int(np.argmax(np.where(allowed[i], goodput_if(i, gammas), -np.inf)))
                if np.array_equal(before, gammas):
                    break
            return gammas

        # W couples the sessions: while the others' drafts keep a pass waiting, one more
        # stopping saves nothing, so from the present plan the ascent can stay where each
        # drafts a little at a loss; it also climbs from plain decoding (the best is kept).
        lowest = np.where(fixed[:, 0], ceilings[:, 0], 0)
        starts = [gammas] if np.array_equal(gammas, lowest) else [gammas, lowest.copy()]  # (the same climb)
        plans = [ascend(start) for start in starts]
        scores = [float(goodput_if(0, plan)[plan[0]]) for plan in plans]
        gammas = plans[int(np.argmax(scores))]
        for c, g in zip(live, gammas):
            c.planned = int(g)
        self.predicted = max(scores)
        # Worth probing: would session i draft, the others as planned, if it accepted well? (A
        # probe measures acceptance only: its block also read what was committed while stopped.)
        hopeful = expected_tokens(max(self.pooled_alpha(), HOPEFUL_ALPHA), candidates)  # [G]
        for i, c in enumerate(live):
            if gammas[i] > 0 or c.fixed:
                continue
            kept, gain[i] = gain[i].copy(), hopeful
            c.worth_probing = bool(np.argmax(np.where(allowed[i], goodput_if(i, gammas), -np.inf)) > 0)
            gain[i] = kept
        plain = len(self.sessions) / (passes * (a + b * share * len(self.sessions)))  # every session at gamma 0
        self.gain = self.predicted / plain
