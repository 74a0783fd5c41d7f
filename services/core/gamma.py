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
