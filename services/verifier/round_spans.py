"""A verification round's span: opened as the round before ends, and what the round
did recorded on it (the early block drafted for the next round included)."""

from __future__ import annotations

from ..core.pipeline import DraftBlock
from ..telemetry import tracing


def round_span(req, round: int, trace_ctx):
    if not tracing.enabled():
        return tracing.INVALID_SPAN
    return tracing.start_span("outrider.round", trace_ctx, attributes={
        "outrider.session_id": req.session_id, "outrider.request_id": req.request_id, "outrider.round": round})


def record_round(span, block: DraftBlock, result, early: DraftBlock | None, hit: bool, pipelined: bool,
                 reading: bool = False) -> None:
    """A round's outcome on its span; with pipelining, what became of the early block
    drafted for the next round while this one verified. ``reading``: decoded without
    drafts while the draft worker read the context (DraftLink.still_reading)."""
    drafted = len(block.proposal)
    if reading:
        span.set_attribute("outrider.reading", True)
    if block.rest_of is not None:  # the rest of the first block, drafted for that round
        span.set_attribute("outrider.rest_of", block.rest_of)
    span.set_attributes({
        "outrider.gamma": drafted, "outrider.accepted": result.num_accepted,
        "outrider.bonus_kept": drafted > 0 and result.num_accepted == drafted,  # every draft accepted
        "outrider.pipeline_hit": hit,  # the next round runs on the early block (RoundOutcome.pipeline_hit)
        # This round's block was drafted early, as a branch for the outcome of the round before.
        "outrider.early_block": block.speculative or block.from_cache,
        "outrider.committed": len(result.tokens),
    })
    if not pipelined:
        return
    if hit:
        span.add_event("draft.early_kept", {"outrider.round": block.round + 1, "outrider.assumed_accepted": early.accepted})
    else:  # no branch for this outcome had arrived (the worker may still send one drafted for it)
        span.add_event("draft.early_discarded", {"outrider.round": block.round + 1, "outrider.reason": "no_branch"})
