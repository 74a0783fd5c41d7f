"""The public Outrider service: validate, tokenize, admit, stream. Knows nothing of Serve.

Every client input is checked here, before any other deployment sees the request, so
a bad request changes nothing anywhere: it ends as INVALID_ARGUMENT with a reason.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

from ..core.errors import InvalidRequest
from ..core.gamma import GammaSchedule
from ..models.detokenizer import IncrementalDetokenizer
from ..rpc import internal_pb2, outrider_pb2
from ..rpc.convert import METHOD_IDS, method_name, sampling_from_proto, sampling_to_proto


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

    def prepare(self, req: outrider_pb2.GenerateRequest, received_at: float) -> internal_pb2.VerifyRequest:
        """Validate a request and resolve every default; raises InvalidRequest."""
        limits = self.limits
        prompt_ids = self._prompt_ids(req)
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
        method = method_name(req.speculation.method, limits.default_method)  # every app serves all three
        gamma = req.speculation.gamma or limits.default_gamma
        GammaSchedule(initial=gamma)  # validates the range
        pipeline = req.speculation.pipeline if req.speculation.HasField("pipeline") else True
        return internal_pb2.VerifyRequest(
            request_id=req.request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampling=sampling_to_proto(params),
            speculation=outrider_pb2.Speculation(
                method=METHOD_IDS[method], gamma=0 if method == "none" else gamma,
                adaptive=req.speculation.adaptive, pipeline=pipeline,
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

    async def generate(self, req: outrider_pb2.GenerateRequest) -> AsyncIterator[outrider_pb2.GenerateChunk]:
        received = time.time()
        start = time.perf_counter()
        verify_request = self.prepare(req, received)
        if self.active_sessions >= self.limits.max_sessions:
            raise Overloaded(f"at the limit of {self.limits.max_sessions} concurrent sessions; retry later")
        self.active_sessions += 1
        request_id = verify_request.request_id
        detok = IncrementalDetokenizer(self.tokenizer)
        first_token_s = None
        committed: list[int] = []  # what the client has been sent: a resumed stream starts after it
        rounds = resumes = 0
        try:
            while True:
                try:
                    # aclosing: see Gateway.Generate; closing the verify stream cancels the session there.
                    if resumes and self._complete(verify_request, committed):
                        # The replica died between the last token and its stats.
                        stats = outrider_pb2.GenerationStats(
                            emitted=len(committed), resumes=resumes, total_s=time.perf_counter() - start,
                            time_to_first_token_s=first_token_s or 0.0,
                            finish_reason="stop" if committed[-1] == self.tokenizer.eos_token_id else "length",
                        )
                        yield outrider_pb2.GenerateChunk(request_id=request_id, text=detok.flush(), stats=stats,
                                                         prompt_token_ids=verify_request.prompt_ids)
                        return
                    attempt = _resumed(verify_request, committed, rounds) if resumes else verify_request
                    async with aclosing(self.open_verify(attempt)) as verify_chunks:
                        async for chunk in verify_chunks:
                            if chunk.HasField("stats"):
                                stats = chunk.stats
                                stats.total_s = time.perf_counter() - start
                                stats.time_to_first_token_s = first_token_s or stats.total_s
                                stats.resumes = resumes
                                yield outrider_pb2.GenerateChunk(
                                    request_id=request_id, text=detok.flush(), stats=stats,
                                    prompt_token_ids=verify_request.prompt_ids,
                                )
                                return
                            if first_token_s is None:
                                first_token_s = time.perf_counter() - start
                            ids = list(chunk.token_ids)
                            committed += ids
                            rounds += 1
                            yield outrider_pb2.GenerateChunk(request_id=request_id, token_ids=ids, text=detok.add(ids))
                    raise ConnectionError("the verifier ended the session without its stats")
                except ReplicaLost:
                    # Nothing the client saw is lost or repeated: the next replica starts
                    # from exactly the committed tokens (greedy output is unchanged).
                    resumes += 1
                    if resumes > self.max_resumes:
                        raise
                    await asyncio.sleep(min(0.1 * 2 ** (resumes - 1), 2.0))  # Serve replaces the replica meanwhile
        finally:
            self.active_sessions -= 1
            self.release_session(request_id)

    def _complete(self, req: internal_pb2.VerifyRequest, committed: list[int]) -> bool:
        eos = self.tokenizer.eos_token_id
        return len(committed) >= req.max_new_tokens or (bool(committed) and eos is not None and committed[-1] == eos)

    async def generate_unary(self, req: outrider_pb2.GenerateRequest) -> outrider_pb2.GenerateResponse:
        response = outrider_pb2.GenerateResponse()
        async with aclosing(self.generate(req)) as chunks:
            async for chunk in chunks:
                response.request_id = chunk.request_id
                response.token_ids.extend(chunk.token_ids)
                response.text += chunk.text
                if chunk.HasField("stats"):
                    response.stats.CopyFrom(chunk.stats)
                    response.prompt_token_ids.extend(chunk.prompt_token_ids)
        return response


def _resumed(req: internal_pb2.VerifyRequest, committed: list[int], rounds: int) -> internal_pb2.VerifyRequest:
    """The rest of ``req`` after ``committed`` tokens and ``rounds`` rounds: the same
    session (its id keys its saved draft state), continued from the committed tokens."""
    resumed = internal_pb2.VerifyRequest()
    resumed.CopyFrom(req)
    resumed.prompt_ids.extend(committed)
    resumed.max_new_tokens = req.max_new_tokens - len(committed)
    resumed.first_round = req.first_round + rounds
    return resumed
