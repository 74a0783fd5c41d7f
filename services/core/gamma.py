"""How many tokens to draft next round."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequest

MAX_GAMMA = 16  # drafts a round, at most: also bounds a draft block's size on the wire


@dataclass(frozen=True)
class GammaSchedule:
    """Fixed gamma, or transformers' "heuristic" schedule when ``adaptive``:
    +2 after a round where every draft was accepted, -1 otherwise."""

    initial: int = 4
    adaptive: bool = False
    minimum: int = 1
    maximum: int = MAX_GAMMA

    def __post_init__(self) -> None:
        if not 0 <= self.initial <= self.maximum:
            raise InvalidRequest(f"gamma must be in [0, {self.maximum}], got {self.initial}")

    def next(self, gamma: int, drafted: int, accepted: int) -> int:
        if not self.adaptive or drafted == 0:
            return gamma
        if accepted == drafted:
            return min(self.maximum, gamma + 2)
        return max(self.minimum, gamma - 1)


def draft_budget(gamma: int, remaining: int) -> int:
    """Drafts allowed in a round with ``remaining`` tokens left to generate: never past
    the token budget, because the round's last token is always the target's own. The
    verifier and the draft worker both bound rounds with this."""
    return max(0, min(gamma, remaining - 1))


class LoadAwareGamma:
    """The largest gamma worth drafting when ``batch`` sessions are verified together.

    Speculation pays while verification is memory-bound: scoring gamma+1 positions
    costs about as much as scoring one. Under load a batched forward turns
    compute-bound and every drafted position costs real time, so the gamma that
    maximises committed tokens per second falls, to 0 (plain decoding) when drafts are
    not worth verifying. The choice uses measurements only:
      T(n) = a + b*n      forward time of a pass over n positions, fitted online;
      E(g) = (1 - alpha^(g+1)) / (1 - alpha)   tokens a round commits (Leviathan);
      d    exposed draft time per drafted token (what pipelining did not hide).
    and picks argmax_g  batch * E(g) / (T(batch * (g+1)) + d * g).
    """

    def __init__(self, maximum: int = 16, window: int = 256):
        self.maximum = maximum
        self.window = window
        self.passes: list[tuple[int, float]] = []  # (positions, seconds)
        # cap() runs every round of every session, passes change once a pass: the
        # regression over the window is refitted only when a pass was added.
        self._fitted: tuple[float, float] | None = None
        self._stale = True
        self.drafted = self.accepted = 0
        self.exposed_draft_s = 0.0

    def observe_pass(self, positions: int, seconds: float) -> None:
        self.passes.append((positions, seconds))
        del self.passes[: -self.window]
        self._stale = True

    def observe_round(self, drafted: int, accepted: int, exposed_draft_s: float) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.exposed_draft_s += exposed_draft_s

    def fit(self) -> tuple[float, float] | None:
        """(a, b) of T(n) = a + b*n, or None until passes of two different sizes."""
        if self._stale:
            self._fitted, self._stale = self._regress(), False
        return self._fitted

    def _regress(self) -> tuple[float, float] | None:
        n = [p for p, _ in self.passes]
        if len(set(n)) < 2:
            return None
        t = [s for _, s in self.passes]
        mean_n, mean_t = sum(n) / len(n), sum(t) / len(t)
        b = sum((x - mean_n) * (y - mean_t) for x, y in zip(n, t)) / sum((x - mean_n) ** 2 for x in n)
        b = max(b, 0.0)
        return max(mean_t - b * mean_n, 0.0), b

    def cap(self, batch: int) -> int:
        fit = self.fit()
        if fit is None or self.drafted == 0 or batch < 1:
            return self.maximum  # nothing measured yet: do not limit
        a, b = fit
        alpha = min(self.accepted / self.drafted, 0.999)
        d = self.exposed_draft_s / self.drafted

        def goodput(g: int) -> float:
            expected = (1 - alpha ** (g + 1)) / (1 - alpha)
            return batch * expected / (a + b * batch * (g + 1) + d * g)

        return max(range(self.maximum + 1), key=goodput)
