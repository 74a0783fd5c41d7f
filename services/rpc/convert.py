"""Conversions between the wire messages and the core's dataclasses, in one place.

Validation of client input happens here too: a bad value raises ``InvalidRequest``,
which the gateway turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.draft_q import SparseQ
from ..core.errors import InvalidRequest
from ..core.pipeline import DraftBlock
from ..core.proposals import Proposal
from ..core.sampling import SamplingParams
from ..core.stats import GenerationStats
from . import internal_pb2, outrider_pb2

METHODS = {
    outrider_pb2.SPECULATION_METHOD_DRAFT: "draft",
    outrider_pb2.SPECULATION_METHOD_NGRAM: "ngram",
    outrider_pb2.SPECULATION_METHOD_NONE: "none",
}
METHOD_IDS = {name: value for value, name in METHODS.items()}


def sampling_from_proto(msg: outrider_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
    )


def sampling_to_proto(params: SamplingParams) -> outrider_pb2.SamplingParams:
    msg = outrider_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def method_name(value: int, default: str) -> str:
    if value == outrider_pb2.SPECULATION_METHOD_UNSPECIFIED:
        return default
    if value not in METHODS:
        raise InvalidRequest(f"unknown speculation method {value}; use DRAFT, NGRAM or NONE")
    return METHODS[value]


def block_to_proto(block: DraftBlock) -> internal_pb2.DraftBlock:
    msg = internal_pb2.DraftBlock(
        round=block.round,
        speculative=block.speculative,
        guess=-1 if block.guess is None else block.guess,
        tokens=block.proposal.tokens.tolist(),
        draft_s=block.draft_s,
    )
    q = block.proposal.draft_q
    if q is not None:
        # The quantized weights, exactly: the verifier derives the very q that was sampled.
        real = (q.weights > 0).cpu()
        msg.q_sizes.extend(real.sum(-1).tolist())
        msg.q_ids = q.ids.cpu()[real].numpy().astype("<i4").tobytes()
        msg.q_weights = q.weights.cpu()[real].numpy().astype("<u2").tobytes()
    return msg


def block_from_proto(msg: internal_pb2.DraftBlock, device: torch.device | str) -> DraftBlock:
    tokens = torch.tensor(list(msg.tokens), dtype=torch.long)
    q = None
    if msg.q_sizes:
        sizes = list(msg.q_sizes)
        ids = np.frombuffer(msg.q_ids, dtype="<i4")
        weights = np.frombuffer(msg.q_weights, dtype="<u2")
        if len(sizes) != len(tokens) or not all(sizes) or len(ids) != sum(sizes) or len(weights) != sum(sizes):
            raise ValueError("malformed draft block: q sizes do not match its tokens and support")
        width = max(sizes)
        ids_out = np.zeros((len(sizes), width), dtype=np.int64)
        weights_out = np.zeros((len(sizes), width), dtype=np.int32)
        start = 0
        for i, size in enumerate(sizes):
            ids_out[i, :size] = ids[start : start + size]
            weights_out[i, :size] = weights[start : start + size]
            start += size
        q = SparseQ.from_weights(torch.from_numpy(ids_out).to(device), torch.from_numpy(weights_out).to(device))
    return DraftBlock(
        round=msg.round,
        proposal=Proposal(tokens=tokens.to(device), draft_q=q),
        speculative=msg.speculative,
        guess=None if msg.guess < 0 else msg.guess,
        draft_s=msg.draft_s,
    )


def stats_to_proto(stats: GenerationStats, finish_reason: str = "") -> outrider_pb2.GenerationStats:
    return outrider_pb2.GenerationStats(
        rounds=stats.rounds,
        drafted=stats.drafted,
        accepted=stats.accepted,
        emitted=stats.emitted,
        rejections=stats.rejections,
        acceptance_per_position=stats.acceptance_per_position,
        mean_acceptance_length=stats.mean_acceptance_length,
        draft_s=stats.draft_time_s,
        verify_s=stats.verify_time_s,
        transport_s=stats.transport_time_s,
        queue_s=stats.queue_time_s,
        total_s=stats.total_time_s,
        pipeline_rounds=stats.pipeline_rounds,
        pipeline_hits=stats.pipeline_hits,
        pipeline_hit_rate=stats.pipeline_hit_rate,
        overlap=stats.overlap,
        finish_reason=finish_reason,
        drafted_per_position=stats.drafted_per_position,
        accepted_per_position=stats.accepted_per_position,
        exposed_draft_s=stats.exposed_draft_time_s,
        cached_prefix_tokens=stats.cached_prefix_tokens,
        draft_reconnects=stats.draft_reconnects,
    )


def stats_from_proto(msg: outrider_pb2.GenerationStats) -> GenerationStats:
    return GenerationStats(
        rounds=msg.rounds,
        drafted=msg.drafted,
        accepted=msg.accepted,
        rejections=msg.rejections,
        emitted=msg.emitted,
        drafted_per_position=list(msg.drafted_per_position),
        accepted_per_position=list(msg.accepted_per_position),
        draft_time_s=msg.draft_s,
        verify_time_s=msg.verify_s,
        total_time_s=msg.total_s,
        transport_time_s=msg.transport_s,
        queue_time_s=msg.queue_s,
        exposed_draft_time_s=msg.exposed_draft_s,
        pipeline_rounds=msg.pipeline_rounds,
        pipeline_hits=msg.pipeline_hits,
        cached_prefix_tokens=msg.cached_prefix_tokens,
        draft_reconnects=msg.draft_reconnects,
    )
