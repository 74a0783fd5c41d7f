"""The public Outrider service: validate, tokenize, admit, stream. Knows nothing of Serve.

Every client input is checked here, before any other deployment sees the request, so
a bad request changes nothing anywhere: it ends as INVALID_ARGUMENT with a reason.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from ..core.errors import InvalidRequest
from ..core.gamma import GammaSchedule
from ..core.sampling import MAX_LOGPROBS
from ..core.speculation_cache import MAX_FANOUT
from ..models.detokenizer import MAX_STOP_CHARS, MAX_STOPS, StopScanner
from ..rpc import internal_pb2, outrider_pb2
from ..core.eagle_proposer import EagleTree
from ..core.multi_draft import tree_members
from ..core.tree_planner import AUTO_TREE
from ..core.tree import choice_tree, parse_choices
from ..rpc.convert import HEAD_METHODS, METHOD_IDS, METHODS, method_name, sampling_from_proto, sampling_to_proto
from ..telemetry import tracing
from .samples import merged, sample_request


class Overloaded(Exception):
    """No room for the request now (RESOURCE_EXHAUSTED): the gateway at its session
    limit, every verifier replica at its own, or the KV pool full. ``retry_after_s``:
    when a retry has a fair chance, said in the status details ("retry in about N s";
    Serve's proxy passes a failed call's code and details on, not trailing metadata)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(f"{message}; retry in about {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


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
    max_samples: int = 8  # n per request (each sample is a session)
    default_fanout: int = 8  # the speculation cache's branches a round (Speculation.fanout)
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
        self.session_s = 0.0  # EWMA of how long a request holds its sessions: the retry hint

    def retry_after_s(self) -> float:
        """When a session has likely ended: sessions end one every mean duration /
        sessions open, about (1 s before any has been timed)."""
        if not self.session_s:
            return 1.0
        return min(30.0, max(0.1, self.session_s / max(1, self.active_sessions)))

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
        for token in sampling.logit_bias:
            self._check_token(token, "logit_bias")
        params = sampling_from_proto(sampling)  # validates ranges
        stop = self._stop(req, max_new)
        if req.HasField("logprobs") and req.logprobs > MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be at most {MAX_LOGPROBS}, got {req.logprobs}")
        if req.n > limits.max_samples:
            raise InvalidRequest(f"n must be at most {limits.max_samples} here, got {req.n}")
        params = params.resolve_seed()  # here, so that draft worker and verifier share it
        method = method_name(req.speculation.method, limits.default_method)
        if limits.head_methods.get(method):  # draft, ngram, suffix and none are served by every app
            raise InvalidRequest(f"speculation method {method.upper()} is not served here: {limits.head_methods[method]}")
        tree = req.speculation.tree
        if tree:
            if method not in HEAD_METHODS + ("tree",):
                raise InvalidRequest(f"a tree is for MEDUSA, MTP, EAGLE or TREE, not {method.upper()}")
            try:
                if method == "tree":
                    tree_members(tree)
                elif tree != AUTO_TREE or method == "eagle":
                    EagleTree.parse(tree) if method == "eagle" else choice_tree(parse_choices(tree))
            except ValueError as err:
                raise InvalidRequest(str(err)) from None
        gamma = req.speculation.gamma or limits.default_gamma
        GammaSchedule(initial=gamma)  # validates the range
        pipeline = req.speculation.pipeline if req.speculation.HasField("pipeline") else True
        fanout = req.speculation.fanout if req.speculation.HasField("fanout") else limits.default_fanout
        if not 1 <= fanout <= MAX_FANOUT:
            raise InvalidRequest(f"fanout must be in [1, {MAX_FANOUT}], got {fanout}")
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
                adaptive=req.speculation.adaptive, pipeline=pipeline, tree=tree, fanout=fanout,
            ),
            received_at=received_at,
            stop=stop,
            logprobs=req.logprobs if req.HasField("logprobs") else None,
            prompt_len=len(prompt_ids),
            coupled=params.coupled,
        )

    def _check_token(self, token: int, where: str) -> None:
        if not 0 <= token < self.limits.vocab_size:
            raise InvalidRequest(f"{where}: token id {token} is outside the vocabulary [0, {self.limits.vocab_size})")

    def _stop(self, req: outrider_pb2.GenerateRequest, max_new: int) -> outrider_pb2.StopOptions:
        """The request's stops, resolved: EOS among the stop ids unless ignored."""
        stop = req.stop
        if len(stop.sequences) > MAX_STOPS:
            raise InvalidRequest(f"at most {MAX_STOPS} stop sequences, got {len(stop.sequences)}")
        for sequence in stop.sequences:
            if not 0 < len(sequence) <= MAX_STOP_CHARS:
                raise InvalidRequest(f"a stop sequence must have 1 to {MAX_STOP_CHARS} characters, got {len(sequence)}")
        for token in stop.token_ids:
            self._check_token(token, "stop token_ids")
        if stop.min_tokens > max_new:
            raise InvalidRequest(f"min_tokens {stop.min_tokens} exceeds max_new_tokens {max_new}")
        ids = list(stop.token_ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None and not stop.ignore_eos:
            ids.append(eos)
        return outrider_pb2.StopOptions(sequences=stop.sequences, token_ids=list(dict.fromkeys(ids)),
                                        min_tokens=stop.min_tokens)

    def _prompt_ids(self, req: outrider_pb2.GenerateRequest) -> list[int]:
        kind = req.WhichOneof("prompt")
        if kind == "text":
            ids = self.tokenizer(req.text, add_special_tokens=False)["input_ids"]
        elif kind == "token_ids":
            ids = list(req.token_ids.ids)
            for position, token in enumerate(ids):
                self._check_token(token, f"prompt position {position}")
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
        n = req.n or 1
        if span.is_recording():
            spec = verify_request.speculation
            span.set_attributes({
                "outrider.request_id": verify_request.request_id, "outrider.session_id": verify_request.session_id,
                "outrider.method": METHODS.get(spec.method, ""), "outrider.gamma": spec.gamma,
                "outrider.pipeline": spec.pipeline, "outrider.prompt_tokens": len(verify_request.prompt_ids),
                "outrider.max_new_tokens": verify_request.max_new_tokens, "outrider.samples": n,
                "outrider.stops": len(verify_request.stop.sequences), "outrider.logprobs": req.logprobs if req.HasField("logprobs") else -1,
                "outrider.penalized": sampling_from_proto(verify_request.sampling).penalties.active,
            })
        # A request's samples are admitted together or not at all.
        if self.active_sessions + n > self.limits.max_sessions:
            raise Overloaded(f"at the limit of {self.limits.max_sessions} concurrent sessions", self.retry_after_s())
        per_client = self.limits.max_sessions_per_client
        if per_client and self.client_sessions.get(client, 0) + n > per_client:
            raise Overloaded(f"this client already has {self.client_sessions.get(client, 0)} concurrent sessions here, "
                             f"and its limit is {per_client}", self.retry_after_s())
        self.active_sessions += n
        self.client_sessions[client] = self.client_sessions.get(client, 0) + n
        try:
            streams = [self._session(verify_request, span, start, 0)]
            streams += [self._session(sample_request(verify_request, i), span, start, i) for i in range(1, n)]
            async with aclosing(streams[0] if n == 1 else merged(streams)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            held = time.perf_counter() - start
            self.session_s = held if not self.session_s else 0.8 * self.session_s + 0.2 * held
            self.active_sessions -= n
            self.client_sessions[client] -= n
            if not self.client_sessions[client]:
                del self.client_sessions[client]

    async def _session(self, verify_request: internal_pb2.VerifyRequest, span, start: float,
                       index: int) -> AsyncIterator[outrider_pb2.GenerateChunk]:
        """One sample's stream, across verifier replicas."""
        stop = verify_request.stop
        text = StopScanner(self.tokenizer, tuple(stop.sequences), stop.min_tokens)
        progress = _Progress(verify_request, text, start, index=index)
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
            self.release_session(verify_request.session_id)

    async def _attempt(self, progress: "_Progress", span) -> AsyncIterator[outrider_pb2.GenerateChunk]:
        """One verifier replica's part of a stream: from the tokens already sent to the
        stats, or ReplicaLost."""
        req = progress.request
        request_id, index = req.request_id, progress.index
        if progress.resumes and self._complete(req, progress):
            # The replica died between the last token and its stats.
            stats = outrider_pb2.GenerationStats(
                emitted=len(progress.committed), resumes=progress.resumes, total_s=progress.elapsed(),
                time_to_first_token_s=progress.first_token_s or 0.0, finish_reason="length")
            if progress.text.matched is not None:
                stats.finish_reason, stats.stop_sequence = "stop", progress.text.matched
            elif progress.committed[-1] in req.stop.token_ids:
                stats.finish_reason, stats.stop_token_id = "stop", progress.committed[-1]
            yield outrider_pb2.GenerateChunk(request_id=request_id, text=progress.text.text_out(final=True), stats=stats,
                                             prompt_token_ids=req.prompt_ids, index=index)
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
                    yield outrider_pb2.GenerateChunk(request_id=request_id, text=progress.text.text_out(final=True),
                                                     stats=stats, prompt_token_ids=req.prompt_ids, index=index)
                    return
                if progress.first_token_s is None:
                    progress.first_token_s = progress.elapsed()
                ids = list(chunk.token_ids)
                progress.committed += ids
                progress.rounds += 1
                progress.gamma = chunk.next_gamma
                progress.text.feed(ids)  # the verifier ended the tokens at a stop string already
                yield outrider_pb2.GenerateChunk(request_id=request_id, token_ids=ids, text=progress.text.text_out(),
                                                 logprobs=chunk.logprobs, top_logprobs=chunk.top_logprobs, index=index)
        raise ConnectionError("the verifier ended the session without its stats")

    def _complete(self, req: internal_pb2.VerifyRequest, progress: "_Progress") -> bool:
        committed = progress.committed
        stopped = bool(committed) and committed[-1] in req.stop.token_ids and len(committed) > req.stop.min_tokens
        return len(committed) >= req.max_new_tokens or stopped or progress.text.matched is not None

    async def generate_unary(self, req: outrider_pb2.GenerateRequest, trace_parent=None, client: str = "") -> outrider_pb2.GenerateResponse:
        samples: dict[int, outrider_pb2.Sample] = {}
        response = outrider_pb2.GenerateResponse()
        async with aclosing(self.generate(req, trace_parent, client)) as chunks:
            async for chunk in chunks:
                response.request_id = chunk.request_id
                sample = samples.setdefault(chunk.index, outrider_pb2.Sample(index=chunk.index))
                sample.token_ids.extend(chunk.token_ids)
                sample.text += chunk.text
                sample.logprobs.extend(chunk.logprobs)
                sample.top_logprobs.extend(chunk.top_logprobs)
                if chunk.HasField("stats"):
                    sample.stats.CopyFrom(chunk.stats)
                    if not response.prompt_token_ids:
                        response.prompt_token_ids.extend(chunk.prompt_token_ids)
        first = samples.get(0, outrider_pb2.Sample())
        response.token_ids.extend(first.token_ids)
        response.text = first.text
        response.stats.CopyFrom(first.stats)
        response.logprobs.extend(first.logprobs)
        response.top_logprobs.extend(first.top_logprobs)
        if len(samples) > 1:
            response.samples.extend(samples[i] for i in sorted(samples))
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
    text: StopScanner  # the output's text as sent, held back where a stop string may begin
    start: float  # perf_counter at receipt
    index: int = 0  # the sample
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
