"""Serve shim for the gateway: the ingress behind Serve's gRPC proxy and its HTTP proxy.
Its gRPC methods are named after the RPCs (Outrider.Generate, Outrider.GenerateUnary,
Health.Check); its HTTP routes are the OpenAI-compatible API (gateway/openai_api.py)."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations
# (``request: Request``) as objects, through Serve's class-based view.
import uuid
from contextlib import aclosing
from typing import AsyncIterator

import grpc
import ray
import torch
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..app.args import AppArgs
from ..core.errors import InvalidRequest, PoolExhausted
from ..models.loading import context_length, load_config, load_tokenizer, vocab_size
from ..rpc import internal_pb2, outrider_pb2
from ..state.client import StateClient, replica_state_client
from ..telemetry import tracing
from ..telemetry.metrics import RequestOutcome, SpecDecodeMetrics, method_label
from ..verifier.tensor_parallel import RankFailed
from .openai_api import OpenAIError, OpenAIFrontend, error_for, first_then
from .service import GatewayService, Limits, Overloaded, ReplicaLost

# Serve's gRPC proxy imports these to register the services it routes to this app.
GRPC_SERVICER_FUNCTIONS = [
    "services.gateway.grpc_proxy.add_outrider_to_proxy",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


# Helpers above the class: serve.ingress pickles the class's routes with the module
# globals defined by then.
def _client(grpc_context) -> str:
    """Who asks: the client's address as Serve's proxy saw it, without the port
    ("ipv4:10.0.0.7"); "" when unknown."""
    peer = grpc_context.peer() if grpc_context is not None and hasattr(grpc_context, "peer") else ""
    return peer.rsplit(":", 1)[0] if peer else ""


def _code(error: Exception) -> grpc.StatusCode:
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, ReplicaLost):  # every resume failed: the client may retry later
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT


def _set_status(grpc_context, error: Exception) -> str:
    code = _code(error)
    if isinstance(error, ReplicaLost):
        error = f"the stream lost its verifier replica and could not continue elsewhere: {error}"
    grpc_context.set_code(code)
    grpc_context.set_details(str(error))
    return code.name


api = FastAPI(title="Outrider", description="OpenAI-compatible API over Outrider's speculative decoding")


@serve.deployment(name="gateway")
@serve.ingress(api)
class Gateway:
    metrics: SpecDecodeMetrics | None = None  # a shim built without __init__ (tests) records none
    state: StateClient | None = None  # ... and has no session store

    def __init__(self, verifier: DeploymentHandle, args: dict):
        cfg = AppArgs.model_validate(args)
        tracing.setup_tracing("outrider-gateway", serve_replica=True)  # OTEL_* / OUTRIDER_TRACES_FILE
        torch.set_num_threads(cfg.gateway.torch_threads)
        config = load_config(cfg.paths.target, cfg.trust_remote_code)
        limits = Limits(
            vocab_size=vocab_size(config), max_context=context_length(config),
            max_new_tokens=cfg.max_new_tokens, default_max_new_tokens=cfg.default_max_new_tokens,
            max_sessions=cfg.max_sessions, default_method=cfg.default_method, default_gamma=cfg.default_gamma,
            max_prompt_tokens=cfg.max_prompt_tokens, max_sessions_per_client=cfg.max_sessions_per_client,
            head_methods=cfg.head_methods(), max_samples=cfg.max_samples, default_fanout=cfg.default_fanout,
        )
        self.verifier = verifier.options(stream=True)
        # The gateway holds every session's committed tokens, so it decides when a
        # session ends and frees its state in the store (or the store's idle expiry does).
        self.state = replica_state_client(cfg)
        self.service = GatewayService(
            load_tokenizer(cfg.paths.target, cfg.trust_remote_code), limits, self._verify,
            release_session=self.state.release if self.state is not None else (lambda session: None),
            max_resumes=cfg.max_resumes,
        )
        self.openai = OpenAIFrontend(self.service, cfg.served_model_name)
        self.metrics = SpecDecodeMetrics.for_replica()  # cluster/metrics.md
        self.metrics.watch_active_sessions(lambda: self.service.active_sessions)

    async def _verify(self, req: internal_pb2.VerifyRequest) -> AsyncIterator[internal_pb2.VerifyChunk]:
        # With Serve's own tracing on, its router parents its routing span on the current
        # context when the call is made: make that the request's span, so Serve's spans
        # for the verifier call sit in the request's trace too (no effect otherwise).
        req.attempt_id = uuid.uuid4().hex
        with tracing.activated(tracing.extract(req.traceparent, req.tracestate)):
            stream = self.verifier.Verify.remote(req.SerializeToString())
        try:
            async for chunk in stream:
                yield internal_pb2.VerifyChunk.FromString(chunk)
        except BackPressureError as error:  # every verifier replica at max_ongoing_requests, its queue full
            raise Overloaded("every verifier replica is at its session limit", self.service.retry_after_s()) from error
        except (RayActorError, ActorUnavailableError) as error:
            raise ReplicaLost(str(error)) from error
        except RayTaskError as error:
            if isinstance(error.cause, RankFailed):  # its replica is being replaced
                raise ReplicaLost(str(error.cause)) from error
            if isinstance(error.cause, InvalidRequest):  # a reason for the client, not a traceback
                raise error.cause from error
            if isinstance(error.cause, PoolExhausted):  # the verifier's KV pool is full: retry later
                raise Overloaded(str(error.cause), self.service.retry_after_s()) from error
            raise
        finally:
            # A client that went away frees the verifier's session too: Serve cancels the
            # stream, and the store relays the attempt's end for when that is lost.
            stream.cancel()
            if self.state is not None:
                self.state.end_attempt(req.attempt_id)

    async def Generate(self, request: outrider_pb2.GenerateRequest, grpc_context) -> AsyncIterator:
        with self._outcome(request) as outcome:  # metrics: OK at the stats chunk, else the failure
            try:
                # aclosing: a client that goes away cancels this generator while the inner
                # ones may sit at a `yield`; an exception does not close the generator an
                # `async for` is iterating, so close it explicitly (their `finally`s free
                # the session here and cancel it on the verifier).
                async with aclosing(self.service.generate(request, tracing.request_parent(grpc_context),
                                                          _client(grpc_context))) as chunks:
                    async for chunk in chunks:
                        outcome.see(chunk)
                        yield chunk
            except (InvalidRequest, Overloaded, ReplicaLost) as error:
                outcome.code = _set_status(grpc_context, error)
                raise

    async def GenerateUnary(self, request: outrider_pb2.GenerateRequest, grpc_context):
        with self._outcome(request) as outcome:
            try:
                response = await self.service.generate_unary(request, tracing.request_parent(grpc_context),
                                                              _client(grpc_context))
            except (InvalidRequest, Overloaded, ReplicaLost) as error:
                outcome.code = _set_status(grpc_context, error)
                raise
            outcome.finish_response(response)
            return response

    @api.get("/v1/models")
    async def models(self) -> dict:
        return self.openai.models()

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(request, chat=True)

    async def _openai(self, request: Request, chat: bool):
        """One OpenAI-format request: a JSON body, or server-sent events when it streams;
        every refusal as an OpenAI error with its HTTP status."""
        client = f"ipv4:{request.client.host}" if request.client else ""
        try:
            try:
                raw = await request.json()
            except ValueError:
                raise OpenAIError(400, "the body is not valid JSON") from None
            req, body = (self.openai.chat_request if chat else self.openai.completion_request)(raw)
            if body.stream:
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                _, events = await first_then(self._events(req, chat, include_usage, client))
                return StreamingResponse(events, media_type="text/event-stream")
            with self._outcome(req) as outcome:
                try:
                    return await self.openai.complete(req, chat, client, on_response=outcome.finish_response)
                except (InvalidRequest, Overloaded, ReplicaLost) as error:
                    outcome.code = _code(error).name
                    raise
        except Exception as error:
            failure = error_for(error)
            return JSONResponse(failure.body(), status_code=failure.status)

    async def _events(self, req: outrider_pb2.GenerateRequest, chat: bool, include_usage: bool, client: str):
        with self._outcome(req) as outcome:
            try:
                async with aclosing(self.openai.stream(req, chat, include_usage, client, on_chunk=outcome.see)) as events:
                    async for event in events:
                        yield event
            except (InvalidRequest, Overloaded, ReplicaLost) as error:
                outcome.code = _code(error).name
                raise

    def _outcome(self, request: outrider_pb2.GenerateRequest) -> RequestOutcome:
        return RequestOutcome(self.metrics, method_label(request, self.service.limits.default_method))

    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        # Serve only routes here once the app (and so every deployment) is running.
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def active_sessions(self) -> int:
        return self.service.active_sessions

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
