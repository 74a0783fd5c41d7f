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
from ..core.proposals import DraftAlternatives, Proposal
from ..core.sampling import Penalties, SamplingParams, StopRule
from ..core.stats import GenerationStats
from ..core.tree import tree_shape
from . import internal_pb2, outrider_pb2
from .channels import MAX_BLOCK_BYTES

METHODS = {
    outrider_pb2.SPECULATION_METHOD_DRAFT: "draft",
    outrider_pb2.SPECULATION_METHOD_NGRAM: "ngram",
    outrider_pb2.SPECULATION_METHOD_NONE: "none",
    outrider_pb2.SPECULATION_METHOD_MEDUSA: "medusa",
    outrider_pb2.SPECULATION_METHOD_MTP: "mtp",
    outrider_pb2.SPECULATION_METHOD_EAGLE: "eagle",
    outrider_pb2.SPECULATION_METHOD_SUFFIX: "suffix",
    outrider_pb2.SPECULATION_METHOD_TREE: "tree",
}
HEAD_METHODS = ("medusa", "mtp", "eagle")  # drafting heads on the verifier, from the target's hidden states
MODEL_FREE = ("ngram", "suffix")  # lookups: on the verifier too, where they cost microseconds and no hop
ON_VERIFIER = MODEL_FREE + HEAD_METHODS
METHOD_IDS = {name: value for value, name in METHODS.items()}


def sampling_from_proto(msg: outrider_pb2.SamplingParams, stop: outrider_pb2.StopOptions | None = None,
                        prompt_len: int | None = None, coupled: bool | None = None) -> SamplingParams:
    """The core's sampling parameters. ``stop``: a resolved stop (internal messages:
    its token ids include EOS where it stops the output); None leaves the engine's.
    ``coupled``: the internal messages' flag (the gateway decides it with the seed);
    None for a client's request, decided where its seed is resolved."""
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        penalties=Penalties(
            repetition=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
            presence=msg.presence_penalty,
            frequency=msg.frequency_penalty,
            logit_bias=tuple(sorted(msg.logit_bias.items())),
        ),
        stop=None if stop is None else StopRule(tuple(stop.token_ids), stop.min_tokens),
        prompt_len=prompt_len or None,
        coupled=coupled,
    )


def sampling_to_proto(params: SamplingParams) -> outrider_pb2.SamplingParams:
    """The wire form of ``params``' sampling map (the stop rule and prompt length travel
    beside it: stop_to_proto)."""
    pen = params.penalties
    msg = outrider_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                      presence_penalty=pen.presence, frequency_penalty=pen.frequency,
                                      logit_bias=dict(pen.logit_bias))
    if pen.repetition != 1.0:
        msg.repetition_penalty = pen.repetition
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def stop_to_proto(stop: StopRule) -> outrider_pb2.StopOptions:
    """A resolved stop rule (EOS among its ids when it stops the output)."""
    return outrider_pb2.StopOptions(token_ids=stop.token_ids, min_tokens=stop.min_tokens)


def top_logprobs_to_proto(top: list[list[tuple[int, float]]]) -> list[outrider_pb2.TopLogprobs]:
    return [outrider_pb2.TopLogprobs(token_ids=[i for i, _ in alts], logprobs=[v for _, v in alts]) for alts in top]


def method_name(value: int, default: str) -> str:
    if value == outrider_pb2.SPECULATION_METHOD_UNSPECIFIED:
        return default
    if value not in METHODS:
        raise InvalidRequest(f"unknown speculation method {value}; use DRAFT, NGRAM, SUFFIX, MEDUSA, MTP, EAGLE, TREE or NONE")
    return METHODS[value]


def block_to_proto(block: DraftBlock, branches: int = 0, alternatives: int = 0) -> internal_pb2.DraftBlock:
    """``branches``: a speculative block's, how many were drafted for its round.
    ``alternatives``: the draft's likeliest tokens to send per position (a TREE's)."""
    msg = internal_pb2.DraftBlock(
        round=block.round,
        speculative=block.speculative,
        guess=-1 if block.guess is None else block.guess,
        tokens=block.proposal.tokens.tolist(),
        draft_s=block.draft_s,
        accepted=block.accepted,
        from_cache=block.from_cache,
        branches=branches,
    )
    if not block.proposal.is_chain:
        msg.parents.extend(block.proposal.tree.parents)
    alts = block.proposal.alternatives
    if alternatives and alts is not None and block.proposal.is_chain:
        msg.alternative_ids.extend(alts.ids[: len(block.proposal), :alternatives].reshape(-1).tolist())
    q = block.proposal.draft_q
    if q is not None:
        # Exactly what the drafter sampled from: the verifier derives the same q'.
        support = (q.levels > 0).cpu().numpy()
        ids = q.ids.cpu().numpy()
        # Ascending ids per draft -> deltas (the first from 0); padding sorts nowhere: masked out.
        deltas = np.diff(ids, axis=-1, prepend=0)
        msg.q_sizes.extend(support.sum(-1).tolist())
        msg.q_ids = encode_varints(deltas[support])
        msg.q_levels = q.levels.cpu().numpy()[support].tobytes()
        msg.q_tail.extend(q.tail_weight.tolist())
        msg.vocab_size = q.vocab
    if msg.ByteSize() > MAX_BLOCK_BYTES:
        raise BlockTooLarge(f"a draft block of {msg.ByteSize()} bytes is over the {MAX_BLOCK_BYTES}-byte limit")
    return msg


def block_from_proto(msg: internal_pb2.DraftBlock, device: torch.device | str) -> DraftBlock:
    tokens = torch.tensor(list(msg.tokens), dtype=torch.long)
    q = None
    if msg.q_sizes:
        sizes = list(msg.q_sizes)
        try:
            deltas = decode_varints(msg.q_ids)
        except ValueError:
            deltas = None
        levels = np.frombuffer(msg.q_levels, dtype=np.uint8)
        total = sum(sizes)
        if (len(sizes) != len(tokens) or len(msg.q_tail) != len(sizes) or not all(sizes) or deltas is None
                or len(deltas) != total or len(levels) != total or not levels.all()):
            raise ValueError("malformed draft block: q' does not match its tokens")
        width = max(sizes)
        ids_out = np.zeros((len(sizes), width), dtype=np.int64)
        levels_out = np.zeros((len(sizes), width), dtype=np.uint8)
        start = 0
        for i, size in enumerate(sizes):
            ids_out[i, :size] = np.cumsum(deltas[start : start + size])
            levels_out[i, :size] = levels[start : start + size]
            start += size
        if ids_out.max() >= msg.vocab_size:
            raise ValueError("malformed draft block: a q' id is outside the vocabulary")
        q = SparseQ.of(torch.from_numpy(ids_out).to(device), torch.from_numpy(levels_out).to(device),
                       torch.tensor(list(msg.q_tail), dtype=torch.int64, device=device), msg.vocab_size)
    tree = None
    if msg.parents:
        if q is not None or len(msg.parents) != len(tokens):
            raise ValueError("malformed draft block: its tree does not match its tokens")
        tree = tree_shape(tuple(msg.parents))  # checks that parents come before children
    alternatives = None
    if msg.alternative_ids:
        ids = torch.tensor(list(msg.alternative_ids), dtype=torch.long)
        if tree is not None or not len(tokens) or len(ids) % len(tokens) or (ids < 0).any():
            raise ValueError("malformed draft block: its alternatives do not match its tokens")
        if msg.vocab_size and (ids >= msg.vocab_size).any():
            raise ValueError("malformed draft block: an alternative is outside the vocabulary")
        ids = ids.view(len(tokens), -1)
        alternatives = DraftAlternatives(ids=ids, probs=torch.zeros(ids.shape))  # probabilities stay on the worker
    return DraftBlock(
        round=msg.round,
        proposal=Proposal(tokens=tokens.to(device), draft_q=q, tree=tree, alternatives=alternatives),
        speculative=msg.speculative,
        guess=None if msg.guess < 0 else msg.guess,
        draft_s=msg.draft_s,
        accepted=msg.accepted,
        from_cache=msg.from_cache,
    )


class BlockTooLarge(ValueError):
    """A draft block over the internal message limit (cannot happen within MAX_GAMMA)."""


def encode_varints(values: np.ndarray) -> bytes:
    """Non-negative integers -> LEB128 bytes (7 bits a byte, high bit = more follow)."""
    values = np.asarray(values, dtype=np.uint64)
    if not len(values):
        return b""
    lengths = np.ones(len(values), dtype=np.int64)
    rest = values >> np.uint64(7)
    while rest.any():
        lengths += rest > 0
        rest >>= np.uint64(7)
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for k in range(int(lengths.max())):
        sel = lengths > k
        byte = (values[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        out[starts[sel] + k] = byte.astype(np.uint8) | ((lengths[sel] > k + 1).astype(np.uint8) << 7)
    return out.tobytes()


def decode_varints(data: bytes) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if not len(raw):
        return np.zeros(0, dtype=np.int64)
    if raw[-1] & 0x80:
        raise ValueError("truncated varint")
    ends = np.flatnonzero(raw < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 9:
        raise ValueError("varint too long")
    values = np.zeros(len(ends), dtype=np.uint64)
    for k in range(int(lengths.max())):
        sel = lengths > k
        values[sel] |= (raw[starts[sel] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values.astype(np.int64)


def stats_to_proto(stats: GenerationStats, finish_reason: str = "") -> outrider_pb2.GenerationStats:
    return outrider_pb2.GenerationStats(  # (stop_sequence, stop_token_id: set by who ended the sequence)
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
        undrafted_rounds=stats.undrafted_rounds,
        reading_rounds=stats.reading_rounds,
        draft_bytes=stats.draft_bytes,
        feature_bytes=stats.feature_bytes,
        cache_hits=stats.cache_hits,
        cache_hit_rate=stats.cache_hit_rate,
        cache_hits_full=stats.cache_hits_full,
        cache_hits_partial=stats.cache_hits_partial,
        branches_drafted=stats.branches_drafted,
        accepted_per_rank=stats.accepted_per_rank,
        draft_shape=stats.draft_shape,
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
        undrafted_rounds=msg.undrafted_rounds,
        reading_rounds=msg.reading_rounds,
        draft_bytes=msg.draft_bytes,
        feature_bytes=msg.feature_bytes,
        cache_hits_full=msg.cache_hits_full,
        cache_hits_partial=msg.cache_hits_partial,
        branches_drafted=msg.branches_drafted,
        accepted_per_rank=list(msg.accepted_per_rank),
        draft_shape=msg.draft_shape,
    )


FEATURE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
FEATURE_PIECE_BYTES = 4 << 20  # a committed text's features go in pieces this size, under the message limit


def features_to_proto(start: int, features: torch.Tensor, dtype: str) -> internal_pb2.Features:
    """Rows [n, H] of fused features at positions start.., as ``dtype`` ("bfloat16" or
    "float32"). bf16 goes as its raw 2 bytes (numpy has no bf16)."""
    rows = features.detach().to("cpu", FEATURE_DTYPES[dtype]).contiguous()
    raw = rows.view(torch.int16) if dtype == "bfloat16" else rows
    return internal_pb2.Features(start=start, rows=rows.shape[0], width=rows.shape[1], dtype=dtype,
                                 data=raw.numpy().tobytes())


def feature_pieces(start: int, features: torch.Tensor, dtype: str) -> list[internal_pb2.Features]:
    """``features_to_proto`` split into messages of at most FEATURE_PIECE_BYTES."""
    if not len(features):
        return []
    per_row = features.shape[1] * FEATURE_DTYPES[dtype].itemsize
    step = max(1, FEATURE_PIECE_BYTES // per_row)
    return [features_to_proto(start + i, features[i : i + step], dtype) for i in range(0, len(features), step)]


def features_from_proto(msg: internal_pb2.Features, device, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """(start, rows [n, H] on ``device`` in ``dtype``); a malformed message raises ValueError."""
    if msg.dtype not in FEATURE_DTYPES:
        raise ValueError(f"features in {msg.dtype!r}; expected one of {', '.join(FEATURE_DTYPES)}")
    wire = FEATURE_DTYPES[msg.dtype]
    if msg.rows == 0 or msg.width == 0 or len(msg.data) != msg.rows * msg.width * wire.itemsize:
        raise ValueError(f"malformed features: {len(msg.data)} bytes for {msg.rows} x {msg.width} {msg.dtype}")
    raw = np.frombuffer(msg.data, dtype=np.int16 if msg.dtype == "bfloat16" else np.float32)
    rows = torch.from_numpy(raw.copy()).view(wire).reshape(msg.rows, msg.width)
    return msg.start, rows.to(device=device, dtype=dtype)
