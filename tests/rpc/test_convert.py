"""Wire conversions are exact: q crosses the wire bit for bit, stats round-trip."""

import math

import pytest
import torch

from services.core.errors import InvalidRequest
from services.core.pipeline import DraftBlock
from services.core.proposals import Proposal
from services.core.sampling import SamplingParams
from services.core.stats import GenerationStats
from services.rpc import outrider_pb2
from services.rpc.convert import (block_from_proto, block_to_proto, method_name, sampling_from_proto,
                                  sampling_to_proto, stats_from_proto, stats_to_proto)


def test_draft_block_round_trip_is_bit_exact():
    probs = torch.rand(3, 11).softmax(-1)
    block = DraftBlock(4, Proposal(torch.tensor([1, 5, 9]), probs), True, 7, 0.25)
    back = block_from_proto(block_to_proto(block), "cpu")
    assert back.round == 4 and back.speculative and back.guess == 7 and back.draft_s == 0.25
    assert torch.equal(back.proposal.tokens, block.proposal.tokens)
    assert torch.equal(back.proposal.draft_probs, probs)  # exact, not close


def test_a_one_hot_block_sends_no_probabilities():
    msg = block_to_proto(DraftBlock(0, Proposal(torch.tensor([2])), False, None, 0.0))
    assert msg.draft_probs == b"" and msg.guess == -1
    assert block_from_proto(msg, "cpu").proposal.draft_probs is None


def test_sampling_defaults_and_validation():
    assert sampling_from_proto(outrider_pb2.SamplingParams()) == SamplingParams()
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=12)
    back = sampling_from_proto(sampling_to_proto(params))
    assert (back.top_k, back.seed) == (3, 12) and math.isclose(back.top_p, 0.9, rel_tol=1e-6)
    with pytest.raises(InvalidRequest, match="top_p"):
        sampling_from_proto(outrider_pb2.SamplingParams(top_p=0.0))


def test_unknown_method_is_invalid():
    assert method_name(0, "ngram") == "ngram"
    with pytest.raises(InvalidRequest, match="unknown speculation method"):
        method_name(42, "draft")


def test_stats_round_trip():
    stats = GenerationStats()
    stats.record_round(4, 2, 3)
    stats.record_round(4, 4, 5)
    stats.draft_time_s, stats.exposed_draft_time_s, stats.pipeline_rounds, stats.pipeline_hits = 0.4, 0.1, 2, 1
    back, want = stats_from_proto(stats_to_proto(stats)).to_dict(), stats.to_dict()
    assert back.keys() == want.keys()
    for key, value in want.items():
        assert back[key] == pytest.approx(value), key
