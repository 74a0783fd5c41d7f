"""KV rollback is exact: after any accept/reject history the caches equal a fresh prefill
(a draft state's own rollback: test_paged_kv.py)."""

import random

import torch
from tiny_models import noisy_copy, plain_logits, tiny

from services.core.engine import SpeculativeEngine
from services.core.gamma import GammaSchedule
from services.core.kv import common_prefix_len
from services.core.kv_pool import BLOCK_TOKENS
from services.core.proposers import DraftModelProposer
from services.core.sampling import SamplingParams
from services.core.verifier import TargetVerifier
from services.core.target import Feed, TargetRunner


def test_engine_caches_track_committed_tokens_after_rejections():
    target = tiny("llama", seed=0)
    engine = SpeculativeEngine(
        TargetVerifier(TargetRunner(target)), DraftModelProposer(noisy_copy(target, 1, 0.6)), None, 256, GammaSchedule(4)
    )
    seq = engine.start([5, 6, 7, 8], 40, SamplingParams(temperature=1.0, seed=0))
    rejected_rounds = 0
    for _ in range(8):
        before = len(seq.committed)
        engine.step(seq)
        rejected_rounds += seq.stats.rounds and seq.stats.accepted < seq.stats.drafted
        # Target cache: every committed token but the newest (fed next round), then
        # the drafts the next feed drops when they were rejected.
        cached = engine.verifier.runner.sessions[seq.target_kv.session]
        assert cached.tokens == seq.target_kv.tokens
        assert len(cached.blocks) * BLOCK_TOKENS >= len(cached.tokens)
        assert cached.tokens[: len(seq.committed) - 1] == seq.committed[:-1]
        # Draft cache: a prefix of the committed tokens (rejected drafts are gone next round).
        seq.draft_state.rollback_to_prefix_of(seq.committed)
        assert seq.draft_state.tokens == seq.committed[: len(seq.draft_state.tokens)]
        assert len(seq.committed) > before
    assert rejected_rounds > 0
    # The cached target state gives the same next-token logits as recomputing everything.
    runner = engine.verifier.runner
    cached = runner.forward([Feed(seq.target_kv.session, len(seq.committed) - 1, seq.committed[-1:], 1)])[0][-1]
    fresh = plain_logits(target, seq.committed)[-1]
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


def test_common_prefix_len_finds_the_first_mismatch_wherever_it_is():
    # It probes from the end (mismatches are usually the last few drafts): every
    # position of the first mismatch, at every length, against a plain scan.
    rng = random.Random(0)

    def scan(a, b):
        i = 0
        while i < min(len(a), len(b)) and a[i] == b[i]:
            i += 1
        return i

    for _ in range(3000):
        a = [rng.randrange(3) for _ in range(rng.randrange(80))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(12))]
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        assert common_prefix_len(a, b) == scan(a, b)
    long = list(range(4096))
    for mismatch in (0, 1, 2047, 4088, 4095):
        assert common_prefix_len(long, long[:mismatch] + [-1] + long[mismatch + 1 :]) == mismatch
