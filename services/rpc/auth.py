"""A shared token on the internal gRPC streams (verifier -> draft worker).

The draft worker's port is reachable from inside the cluster, and a Draft stream names
a session and can restore its saved KV; a stream without the cluster's token gets
UNAUTHENTICATED before any handler runs. The token comes from ``OUTRIDER_INTERNAL_TOKEN``
in every Ray process's environment: a Kubernetes Secret on k8s/, a fresh random one per
local cluster under ``outrider serve``. Unset, the streams are open (tests, a cluster
whose network is private), and the draft worker says so in its log.
"""

from __future__ import annotations

import hmac
import os

import grpc

TOKEN_ENV = "OUTRIDER_INTERNAL_TOKEN"
HEADER = "authorization"


def internal_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def auth_metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token (none when there is no token)."""
    token = internal_token() if token is None else token
    return ((HEADER, f"Bearer {token}"),) if token else ()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose metadata lacks ``authorization: Bearer <token>``."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        presented = dict(details.invocation_metadata or ()).get(HEADER, "")
        if handler is None or hmac.compare_digest(presented.encode(), self.expected):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call UNAUTHENTICATED."""

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this stream needs the cluster's internal token")

    codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
