"""The public Outrider service: validate, tokenize, admit, stream. Knows nothing of Serve.

Every client input is checked here, before any other deployment sees the request, so
a bad request changes nothing anywhere: it ends as INVALID_ARGUMENT with a reason.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from ..core.errors import InvalidRequest
from ..core.gamma import GammaSchedule
from ..models.detokenizer import IncrementalDetokenizer
from ..rpc import internal_pb2, outrider_pb2
from ..core.eagle_proposer import EagleTree
from ..core.tree import choice_tree, parse_choices
from ..rpc.convert import METHOD_IDS, METHODS, ON_VERIFIER, method_name, sampling_from_proto, sampling_to_proto
from ..telemetry import tracing


class Overloaded(Exception):
    """The gateway is at its session limit (RESOURCE_EXHAUSTED)."""


class ReplicaLost(Exception):
    """The verifier replica serving a stream went away (or lost a tensor-parallel
    rank); the stream can continue on another one."""


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context: int
    max_new_tokens: int  # per request
    default_max_new_tokens: int
    max_sessions: int  # concurrent sessions per gateway replica
    default_method: str
    default_gamma: int
    max_prompt_tokens: int = 0  # 0: as many as the context leaves room for
    max_sessions_per_client: int = 0  # concurrent sessions of one client (peer address) per replica; 0: no limit
    # Methods whose heads the verifiers loaded, with why each other one is not served.
    head_methods: dict[str, str | None] = field(default_factory=lambda: {"medusa": "no Medusa heads", "mtp": "no MTP modules", "eagle": "no EAGLE-3 drafter"})


class GatewayService:
    def __init__(
        self,
        tokenizer,
        limits: Limits,
        open_verify: Callable[[internal_pb2.VerifyRequest], AsyncIterator[internal_pb2.VerifyChunk]],
        release_session: Callable[[str], None] = lambda session: None,
        max_resumes: int = 8,
    ):
        self.tokenizer = tokenizer
        self.limits = limits
        self.open_verify = open_verify
        self.release_session = release_session  # frees the session's state wherever it is kept
        self.max_resumes = max_resumes
        self.active_sessions = 0
        self.client_sessions: dict[str, int] = {}  # client -> its sessions open here

    def prepare(self, req: outrider_pb2.GenerateRequest, received_at: float) -> internal_pb2.VerifyRequest:
        """Validate a request and resolve every default; raises InvalidRequest."""
        limits = self.limits
        prompt_ids = self._prompt_ids(req)
        if limits.max_prompt_tokens and len(prompt_ids) > limits.max_prompt_tokens:
            raise InvalidRequest(f"prompt of {len(prompt_ids)} tokens exceeds this server's limit of {limits.max_prompt_tokens}")
        max_new = req.max_new_tokens or limits.default_max_new_tokens
        if max_new > limits.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens {max_new} exceeds this server's limit of {limits.max_new_tokens}")
        if len(prompt_ids) + max_new > limits.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) exceeds "
                f"the model context of {limits.max_context}"
            )
        sampling = req.sampling
        if not math.isfinite(sampling.temperature) or (sampling.HasField("top_p") and not math.isfinite(sampling.top_p)):
            raise InvalidRequest("sampling values must be finite numbers")
        params = sampling_from_proto(sampling)  # validates ranges
        pinned_gamma = params.seed is not None and not params.greedy
        if params.seed is None:  # resolved here so draft worker and verifier share it
            params = replace(params, seed=random.SystemRandom().randrange(2**63))
        method = method_name(req.speculation.method, limits.default_method)
        if limits.head_methods.get(method):  # draft, ngram and none are served by every app
            raise InvalidRequest(f"speculation method {method.upper()} is not served here: {limits.head_methods[method]}")
        tree = req.speculation.tree
        if tree:
            if method not in ON_VERIFIER:
                raise InvalidRequest(f"a tree is for MEDUSA, MTP or EAGLE, not {method.upper()}")
            try:
                EagleTree.parse(tree) if method == "eagle" else choice_tree(parse_choices(tree))
            except ValueError as err:
                raise InvalidRequest(str(err)) from None
        gamma = req.speculation.gamma or limits.default_gamma
        GammaSchedule(initial=gamma)  # validates the range
        pipeline = req.speculation.pipeline if req.speculation.HasField("pipeline") else True
        return internal_pb2.VerifyRequest(
            request_id=req.request_id or uuid.uuid4().hex,
            # Never the client's id: two clients choosing the same one, or one reusing
            # an id, must not share, end or restore each other's state.
            session_id=secrets.token_hex(16),
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampling=sampling_to_proto(params),
            speculation=outrider_pb2.Speculation(
                method=METHOD_IDS[method], gamma=0 if method == "none" else gamma,
                adaptive=req.speculation.adaptive, pipeline=pipeline, tree=tree,
            ),
            received_at=received_at,
            pinned_gamma=pinned_gamma,
        )

    def _prompt_ids(self, req: outrider_pb2.GenerateRequest) -> list[int]:
        kind = req.WhichOneof("prompt")
        if kind == "text":
            ids = self.tokenizer(req.text, add_special_tokens=False)["input_ids"]
        elif kind == "token_ids":
            ids = list(req.token_ids.ids)
            for position, token in enumerate(ids):
                if not 0 <= token < self.limits.vocab_size:
                    raise InvalidRequest(
                        f"token id {token} at position {position} is outside the vocabulary [0, {self.limits.vocab_size})"
                    )
        else:
            ids = []
        if not ids:
            raise InvalidRequest("prompt is empty: set `text` or `token_ids`")
        return ids

    def generate(self, req: outrider_pb2.GenerateRequest, trace_parent=None, client: str = "") -> AsyncIterator[outrider_pb2.GenerateChunk]:
        """The request's chunks. ``trace_parent``: the OpenTelemetry context its
        ``outrider.generate`` span starts under (``tracing.request_parent``);
        ``client``: who asks (their address), for the per-client session limit."""
        if not tracing.enabled():  # no span, no extra generator layer
            return self._generate(req, tracing.start_span("outrider.generate"), client)
        return self._traced(req, trace_parent, client)

    async def _traced(self, req: outrider_pb2.GenerateRequest, trace_parent, client: str) -> AsyncIterator[outrider_pb2.GenerateChunk]:
        span = tracing.start_span("outrider.generate", trace_parent, tracing.SpanKind.SERVER)
        try:
            async with aclosing(self._generate(req, span, client)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except (GeneratorExit, asyncio.CancelledError):
            if span.is_recording():
                span.set_attribute("outrider.cancelled", True)  # the client went away
            raise
        except BaseException as error:
            tracing.record_error(span, error)
            raise
        finally:
            span.end()

    async def _generate(self, req: outrider_pb2.GenerateRequest, span, client: str = "") -> AsyncIterator[outrider_pb2.GenerateChunk]:
        received = time.time()
        start = time.perf_counter()
        verify_request = self.prepare(req, received)
        # The verifier's spans join this request's trace (the context crosses the
        # Serve handle hop inside the serialized request).
        verify_request.traceparent, verify_request.tracestate = tracing.inject(span)
        if span.is_recording():
            spec = verify_request.speculation
            span.set_attributes({
                "outrider.request_id": verify_request.request_id, "outrider.session_id": verify_request.session_id,
                "outrider.method": METHODS.get(spec.method, ""), "outrider.gamma": spec.gamma,
                "outrider.pipeline": spec.pipeline, "outrider.prompt_tokens": len(verify_request.prompt_ids),
                "outrider.max_new_tokens": verify_request.max_new_tokens,
            })
        if self.active_sessions >= self.limits.max_sessions:
            raise Overloaded(f"at the limit of {self.limits.max_sessions} concurrent sessions; retry later")
        per_client = self.limits.max_sessions_per_client
        if per_client and self.client_sessions.get(client, 0) >= per_client:
            raise Overloaded(f"this client already has {per_client} concurrent sessions here, its limit; retry later")
        self.active_sessions += 1
        self.client_sessions[client] = self.client_sessions.get(client, 0) + 1
        progress = _Progress(verify_request, IncrementalDetokenizer(self.tokenizer), start)
        try:
            while True:
                try:
                    # aclosing: see Gateway.Generate; closing the verify stream cancels the session there.
                    async with aclosing(self._attempt(progress, span)) as chunks:
                        async for chunk in chunks:
                            yield chunk
                    return
                except ReplicaLost as error:
                    # Nothing the client saw is lost or repeated: the next replica starts
                    # from exactly the committed tokens (greedy output is unchanged).
                    progress.resumes += 1
                    if span.is_recording():
                        span.add_event("verifier.lost", {"outrider.resumes": progress.resumes,
                                                         "outrider.committed": len(progress.committed),
                                                         "exception.message": str(error)})
                    if progress.resumes > self.max_resumes:
                        raise
                    await asyncio.sleep(min(0.1 * 2 ** (progress.resumes - 1), 2.0))  # Serve replaces the replica meanwhile
        finally:
            self.active_sessions -= 1
            self.client_sessions[client] -= 1
            if not self.client_sessions[client]:
                del self.client_sessions[client]
            self.release_session(verify_request.session_id)

    async def _attempt(self, progress: "_Progress", span) -> AsyncIterator[outrider_pb2.GenerateChunk]:
        """One verifier replica's part of a stream: from the tokens already sent to the
        stats, or ReplicaLost."""
        req = progress.request
        request_id = req.request_id
        if progress.resumes and self._complete(req, progress.committed):
            # The replica died between the last token and its stats.
            stats = outrider_pb2.GenerationStats(
                emitted=len(progress.committed), resumes=progress.resumes, total_s=progress.elapsed(),
                time_to_first_token_s=progress.first_token_s or 0.0,
                finish_reason="stop" if progress.committed[-1] == self.tokenizer.eos_token_id else "length",
            )
            yield outrider_pb2.GenerateChunk(request_id=request_id, text=progress.detok.flush(), stats=stats,
                                             prompt_token_ids=req.prompt_ids)
            return
        attempt = _resumed(req, progress) if progress.resumes else req
        async with aclosing(self.open_verify(attempt)) as verify_chunks:
            async for chunk in verify_chunks:
                if chunk.HasField("stats"):
                    stats = chunk.stats
                    stats.total_s = progress.elapsed()
                    stats.time_to_first_token_s = progress.first_token_s or stats.total_s
                    stats.resumes = progress.resumes
                    if span.is_recording():
                        _record_stats(span, stats)
                    yield outrider_pb2.GenerateChunk(request_id=request_id, text=progress.detok.flush(), stats=stats,
                                                     prompt_token_ids=req.prompt_ids)
                    return
                if progress.first_token_s is None:
                    progress.first_token_s = progress.elapsed()
                ids = list(chunk.token_ids)
                progress.committed += ids
                progress.rounds += 1
                progress.gamma = chunk.next_gamma
                yield outrider_pb2.GenerateChunk(request_id=request_id, token_ids=ids, text=progress.detok.add(ids))
        raise ConnectionError("the verifier ended the session without its stats")

    def _complete(self, req: internal_pb2.VerifyRequest, committed: list[int]) -> bool:
        eos = self.tokenizer.eos_token_id
        return len(committed) >= req.max_new_tokens or (bool(committed) and eos is not None and committed[-1] == eos)

    async def generate_unary(self, req: outrider_pb2.GenerateRequest, trace_parent=None, client: str = "") -> outrider_pb2.GenerateResponse:
        response = outrider_pb2.GenerateResponse()
        async with aclosing(self.generate(req, trace_parent, client)) as chunks:
            async for chunk in chunks:
                response.request_id = chunk.request_id
                response.token_ids.extend(chunk.token_ids)
                response.text += chunk.text
                if chunk.HasField("stats"):
                    response.stats.CopyFrom(chunk.stats)
                    response.prompt_token_ids.extend(chunk.prompt_token_ids)
        return response


def _record_stats(span, stats: outrider_pb2.GenerationStats) -> None:
    span.set_attributes({
        "outrider.rounds": stats.rounds, "outrider.drafted": stats.drafted, "outrider.accepted": stats.accepted,
        "outrider.emitted": stats.emitted, "outrider.pipeline_hits": stats.pipeline_hits,
        "outrider.resumes": stats.resumes, "outrider.finish_reason": stats.finish_reason,
    })


@dataclass
class _Progress:
    """A stream's progress as the client has seen it, across verifier replicas."""

    request: internal_pb2.VerifyRequest
    detok: IncrementalDetokenizer
    start: float  # perf_counter at receipt
    committed: list[int] = field(default_factory=list)  # tokens sent: a resumed stream starts after them
    rounds: int = 0
    gamma: int = 0  # the gamma schedule's next value, as the verifier last reported it
    resumes: int = 0
    first_token_s: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _resumed(req: internal_pb2.VerifyRequest, progress: _Progress) -> internal_pb2.VerifyRequest:
    """The rest of ``req`` after the tokens and rounds the client has seen: the same
    session (its id keys its saved draft state), continued from the committed tokens,
    the next round's number and gamma. Every random stream is keyed by (seed, round)
    or (seed, position), so a seeded stream goes on exactly as if undisturbed."""
    resumed = internal_pb2.VerifyRequest()
    resumed.CopyFrom(req)
    resumed.prompt_ids.extend(progress.committed)
    resumed.max_new_tokens = req.max_new_tokens - len(progress.committed)
    resumed.first_round = req.first_round + progress.rounds
    if progress.gamma and resumed.speculation.gamma:
        resumed.speculation.gamma = progress.gamma
    resumed.received_at = time.time()  # queue time counts this attempt's wait only
    return resumed
