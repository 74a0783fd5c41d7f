"""The goodput plan against plain decoding, by measurement.

The controller's model (core/goodput.py) cannot see what drafting costs the target
where both share hardware (a CPU node's cores, a GPU's memory bandwidth), nor any other
cost it leaves out. Where its predicted gain over plain decoding is small, the replica
measures both arms now and then and keeps the faster: tokens committed per second over
the same number of passes.

Checks back off: each one that keeps the arm in use doubles the passes until the next
(CHECK_EVERY up to CHECK_MAX), since a check costs passes of the slower arm; one that
changes the arm starts again at CHECK_EVERY. Served at 4 sampled streams on a shared
CPU, the plan's own gain hovered between 1.0 (drafting nothing) and 1.3, and the check
counted passes only while the gain stayed above 1: it never ran, and the replica went on
trying drafting and stopping again at 0.8x plain decoding.
"""

from __future__ import annotations

from typing import Callable

# Measured, not modelled, where the model is least sure: while the plan's predicted gain
# over plain decoding is below CHECK_BELOW, every CHECK_EVERY passes (then backing off to
# CHECK_MAX) the replica runs CHECK_PASSES passes of the arm not in use (plain decoding,
# or the plan), the first SETTLE of them uncounted (drafters catching up), and keeps the
# faster arm.
CHECK_BELOW, CHECK_EVERY, CHECK_MAX, CHECK_PASSES, SETTLE = 1.5, 48, 768, 16, 3


class ArmCheck:
    def __init__(self):
        self.plain = False  # the arm in use: True = every session at gamma 0
        self.passes = 0  # since the last check
        self.every = CHECK_EVERY  # passes between checks
        self.window: list | None = None  # [arm, passes, tokens, first start, last end] while checking
        self.baseline = 0.0  # the arm in use's rate just before the check
        self.checks = 0

    @property
    def plain_now(self) -> bool:
        return self.window[0] if self.window is not None else self.plain

    def observe(self, start: float, end: float, committed: int, recent_rate: Callable[[], float],
                gain: float) -> bool:
        """One pass; ``recent_rate()``: committed tokens/s over the latest passes; ``gain``:
        the plan's modelled goodput over plain decoding's (1: it drafts nothing). Returns
        whether the arm changed (the plan is stale)."""
        if self.window is None:
            if gain >= CHECK_BELOW:  # the model is sure (or has no fit yet): the plan
                changed, self.plain, self.passes, self.every = self.plain, False, 0, CHECK_EVERY
                return changed
            self.passes += 1
            # A plan that drafts nothing (gain 1) is plain decoding: nothing to compare
            # yet, but its passes count towards the next check.
            if self.passes >= self.every and gain > 1.0:
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
            self.plain, self.every = window[0], CHECK_EVERY
        else:
            self.every = min(CHECK_MAX, 2 * self.every)
        self.window, self.passes = None, 0
        self.checks += 1
        return True
