"""Exact sampling across a resume: every random stream is keyed by (seed, round) or
(seed, position), so a stream resumed elsewhere draws fresh numbers for its new rounds
(the joint distribution of tokens on both sides of the resume is the target's) and a
seeded stream resumed after any round reproduces the undisturbed one exactly."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.proposals import Proposal
from services.core.proposers import DraftModelProposer
from services.core.sampling import SamplingParams, adjusted_probs
from services.core.target import TargetRunner
from services.core.verifier import AcceptRow, TargetVerifier, VerifyRequest, accept
from tiny_models import noisy_copy, tiny

PROMPT = [5, 17, 33, 2, 9]


def _one_token_rounds(logits: list[torch.Tensor], params: list[SamplingParams], round: int) -> list[int]:
    """A plain decoding round (no drafts) for each row, with the given logits [1, V]."""
    batch = [VerifyRequest(None, [], Proposal.empty(), p, round) for p in params]
    return [outcome.tokens[0] for outcome in accept([AcceptRow.of(req) for req in batch], logits)]


def test_two_tokens_across_a_resume_follow_the_target_jointly():
    """Round 0 on one replica, round 1 resumed on another: (x1, x2) ~ p(x1) p(x2 | x1).
    Keyed by the seed alone, round 1 would replay round 0's numbers and x2 would
    follow x1 (the test below fails that way)."""
    target = tiny("llama", seed=4)
    cfg = SamplingParams(temperature=1.0, top_k=3)
    n = 20_000
    params = [SamplingParams(temperature=1.0, top_k=3, seed=s) for s in range(n)]
    with torch.no_grad():
        first_logits = target(torch.tensor([PROMPT])).logits[0, -1:]
    x1 = _one_token_rounds([first_logits] * n, params, round=0)
    with torch.no_grad():
        after = {x: target(torch.tensor([PROMPT + [x]])).logits[0, -1:] for x in set(x1)}
    x2 = _one_token_rounds([after[x] for x in x1], params, round=1)  # resumed: round 1
    p1 = adjusted_probs(first_logits[0], cfg)
    cells, expected = [], []
    for a in torch.nonzero(p1).flatten().tolist():
        p2 = adjusted_probs(after[a][0], cfg) if a in after else None
        for b in torch.nonzero(p2).flatten().tolist() if p2 is not None else []:
            cells.append((a, b))
            expected.append(float(p1[a] * p2[b]))
    counts = {cell: 0 for cell in cells}
    for pair in zip(x1, x2):
        assert pair in counts, f"{pair} is outside the joint support"
        counts[pair] += 1
    expected = np.asarray(expected) / sum(expected) * n
    assert chisquare([counts[c] for c in cells], expected).pvalue > 1e-4


@pytest.mark.parametrize("coupled", [None, False], ids=["coupled", "rejection"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_a_resumed_seeded_stream_reproduces_the_undisturbed_one(adaptive, coupled):
    """A seed the caller chose couples the stream (None: decided with the seed); with
    rejection sampling, the (seed, round) keys reproduce it under the same schedule."""
    target = tiny("llama", seed=1)
    draft = noisy_copy(target, 2, 0.3)
    engine = SpeculativeEngine(TargetVerifier(TargetRunner(target)), DraftModelProposer(draft), None, 256,
                               GammaSchedule(3, adaptive))
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=77, coupled=coupled)
    undisturbed = engine.generate(PROMPT, 40, params).token_ids
    for resume_after in (1, 2, 5):
        seq = engine.start(PROMPT, 40, params)
        for _ in range(resume_after):
            engine.step(seq)
        engine.release(seq)
        # What the gateway sends another replica: prompt + committed, the next round's
        # number, the gamma the schedule reached.
        resumed = engine.start(seq.committed, 40 - len(seq.generated), params, GammaSchedule(seq.gamma, adaptive),
                               first_round=seq.round)
        while not resumed.finished:
            engine.step(resumed)
        engine.release(resumed)
        assert seq.generated + resumed.generated == undisturbed, f"resumed after round {resume_after}"
