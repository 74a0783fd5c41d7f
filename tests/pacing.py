"""The timing a test of drafting assumes, set explicitly: tiny models run far faster
than the real targets whose costs the verifier plans for."""

from __future__ import annotations

import time

from services.core.goodput import PassCost


class FixedCost(PassCost):
    """Passes priced as a fixed line, ``a`` seconds + ``b`` a position, whatever they took."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.line = (a, b)

    def observe(self, positions: int, seconds: float) -> None:
        pass  # kept out of the priced samples (late blocks are priced from their measured spread)

    def fit(self):
        return self.line


def drafting_pays(verifier) -> None:
    """Price ``verifier``'s passes as a large target's on a GPU, bound by reading its
    weights (20 ms, and 0.5 ms a position), not as a tiny one's, which cost less than a
    draft's hop: at that price no draft pays, and the goodput controller stops drafting
    once it has fitted the passes. Late blocks cost nothing, as a fast draft's hidden
    under such passes would (a tiny or real-vocabulary draft on this CPU can take longer
    than a pass, and the controller then prices drafting out). At this price every draft
    pays."""
    verifier.controller.cost = FixedCost(0.020, 0.0005)
    verifier.controller.waits = FixedCost(0.0, 0.0)


def slow_prefill(verifier, seconds: float = 0.3) -> None:
    """``verifier``'s target takes ``seconds`` more over each prompt. A tiny target reads
    a prompt in a millisecond, sooner than any draft worker sends its first block (tens
    of ms; more in a fresh process), and a session does not wait for that block: it
    decodes without drafts until it comes (DraftLink.still_reading). Tests of drafting
    from the first round give the target a real target's prefill time."""
    prefill = verifier.engine.prefill

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return prefill(*args, **kwargs)
    verifier.engine.prefill = slowed
