"""Wire conversions are exact: q crosses the wire bit for bit, stats round-trip."""

import math

import numpy as np
import pytest
import torch

from services.core.draft_q import MAX_SUPPORT, SparseQ, compact
from services.core.errors import InvalidRequest
from services.core.pipeline import DraftBlock
from services.core.proposals import DraftAlternatives, Proposal
from services.core.sampling import SamplingParams
from services.core.stats import GenerationStats
from services.rpc import outrider_pb2
from services.rpc.channels import MAX_BLOCK_BYTES
from services.core.tree import tree_shape
from services.rpc.convert import (FEATURE_PIECE_BYTES, block_from_proto, block_to_proto, decode_varints, encode_varints,
                                   feature_pieces, features_from_proto, features_to_proto, method_name,
                                   sampling_from_proto, sampling_to_proto, stats_from_proto, stats_to_proto)


def test_draft_block_round_trip_is_bit_exact():
    # Supports of different sizes (a peaked, a flat and a capped q with a tail), as a block has.
    V = 300
    qs = [compact(torch.randn(V).mul(scale).softmax(-1), max_support=cap) for scale, cap in ((8, 3072), (0.1, 3072), (2, 40))]
    q = SparseQ.stack(qs)
    block = DraftBlock(4, Proposal(torch.tensor([1, 5, 9]), q), True, 7, 0.25)
    back = block_from_proto(block_to_proto(block), "cpu")
    assert back.round == 4 and back.speculative and back.guess == 7 and back.draft_s == 0.25
    assert torch.equal(back.proposal.tokens, block.proposal.tokens)
    assert torch.equal(back.proposal.draft_q.dense(), q.dense())  # exact, not close
    assert q.tail[2] > 0 and q.tail[0] >= 0


def test_varints_round_trip():
    values = np.array([0, 1, 127, 128, 300, 16_383, 16_384, 151_935, 2**40], dtype=np.int64)
    assert decode_varints(encode_varints(values)).tolist() == values.tolist()
    with pytest.raises(ValueError):
        decode_varints(encode_varints(values)[:-1])


def test_real_vocabulary_blocks_stay_small():
    """gamma 16 at V = 152k, flat q (the support cap binds): far under gRPC's 4 MiB,
    and within the internal limit."""
    V, gamma = 151_936, 16
    q = SparseQ.stack([compact(torch.randn(V).mul(0.01).softmax(-1)) for _ in range(gamma)])
    msg = block_to_proto(DraftBlock(0, Proposal(torch.zeros(gamma, dtype=torch.long), q), False, None, 0.0))
    assert q.ids.shape[-1] == MAX_SUPPORT and msg.ByteSize() <= MAX_BLOCK_BYTES < 4 * 2**20


def test_a_malformed_block_is_refused():
    q = compact(torch.rand(11).softmax(-1))
    msg = block_to_proto(DraftBlock(0, Proposal(torch.tensor([1]), q), False, None, 0.0))
    msg.q_sizes[0] += 1
    with pytest.raises(ValueError, match="malformed"):
        block_from_proto(msg, "cpu")


def test_a_chains_alternatives_go_only_when_asked_and_a_bad_set_is_refused():
    alts = DraftAlternatives(ids=torch.tensor([[4, 9, 1], [5, 2, 3]]), probs=torch.rand(2, 3))
    block = DraftBlock(1, Proposal(torch.tensor([4, 5]), alternatives=alts), False, None, 0.0)
    assert not block_to_proto(block).alternative_ids  # not asked for: not sent
    msg = block_to_proto(block, alternatives=2)
    back = block_from_proto(msg, "cpu").proposal.alternatives
    assert back.ids.tolist() == [[4, 9], [5, 2]]
    del msg.alternative_ids[-1]  # 3 ids for 2 tokens
    with pytest.raises(ValueError, match="malformed"):
        block_from_proto(msg, "cpu")


def test_a_one_hot_block_sends_no_probabilities():
    msg = block_to_proto(DraftBlock(0, Proposal(torch.tensor([2])), False, None, 0.0))
    assert not msg.q_sizes and msg.q_ids == b"" and msg.guess == -1
    assert block_from_proto(msg, "cpu").proposal.draft_q is None


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


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_features_round_trip_in_their_wire_type(dtype):
    rows = torch.randn(7, 48)
    start, back = features_from_proto(features_to_proto(12, rows, dtype), "cpu", torch.float32)
    assert start == 12 and back.shape == rows.shape
    assert torch.equal(back, rows.to(torch.bfloat16).float() if dtype == "bfloat16" else rows)  # exact, as sent


def test_features_go_in_pieces_under_the_limit_and_a_malformed_one_is_refused():
    rows = torch.randn(3000, 1024)  # 6 MB in bf16: two pieces
    pieces = feature_pieces(5, rows, "bfloat16")
    assert [p.start for p in pieces] == [5, 5 + pieces[0].rows] and sum(p.rows for p in pieces) == 3000
    assert all(p.ByteSize() <= FEATURE_PIECE_BYTES + 64 for p in pieces)
    assert torch.equal(torch.cat([features_from_proto(p, "cpu", torch.bfloat16)[1] for p in pieces]),
                       rows.to(torch.bfloat16))
    bad = features_to_proto(0, torch.randn(2, 4), "float32")
    bad.rows = 3
    with pytest.raises(ValueError, match="malformed features"):
        features_from_proto(bad, "cpu", torch.float32)
    bad.rows, bad.dtype = 2, "int8"
    with pytest.raises(ValueError, match="int8"):
        features_from_proto(bad, "cpu", torch.float32)


def test_a_tree_block_carries_its_parents_and_a_bad_tree_is_refused():
    block = DraftBlock(2, Proposal(torch.tensor([4, 5, 6, 7]), tree=tree_shape((-1, -1, 0, 2))), False, None, 0.0)
    msg = block_to_proto(block)
    assert list(msg.parents) == [-1, -1, 0, 2]
    assert block_from_proto(msg, "cpu").proposal.tree.parents == (-1, -1, 0, 2)
    assert not block_to_proto(DraftBlock(2, Proposal(torch.tensor([4, 5])), False, None, 0.0)).parents  # a chain
    msg.parents[1] = 3  # a child before its parent
    with pytest.raises(ValueError):
        block_from_proto(msg, "cpu")
    del msg.parents[-1]
    with pytest.raises(ValueError, match="tree does not match"):
        block_from_proto(msg, "cpu")
