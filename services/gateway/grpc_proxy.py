"""Registers Outrider's services on Serve's gRPC proxy, so that a client that goes
away always cancels its request.

Serve's proxy turns each server-streaming call into an async generator that gRPC
drives, and cancels the replica's request only when the cancellation reaches that
generator while it awaits the replica's next chunk. A client that cancels while the
proxy is writing a chunk (right after the first one, typically) cancels gRPC's write
instead; the generator is then closed later, by garbage collection, and Serve's proxy
swallows that close without cancelling the replica: the request ran to its end about
1 time in 15 here (tests/app/test_serving.py). Here Serve's generator runs in a task of its
own, which between chunks is always awaiting the replica, and every way the call can
end cancels that task: the cancellation always lands where Serve handles it.

This module runs in Serve's proxy actor: it imports only the generated stubs.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from ..rpc import outrider_pb2_grpc

_END = object()


def add_outrider_to_proxy(servicer, server) -> None:
    """A ``grpc_servicer_functions`` entry: the Outrider service, with cancellation
    that reaches the replica (and every servicer added after it, e.g. Health)."""
    factory = getattr(server, "service_handler_factory", None)  # Serve's gRPCGenericServer
    if factory is not None and not getattr(factory, "cancels_on_close", False):
        server.service_handler_factory = _cancelling(factory)
    outrider_pb2_grpc.add_OutriderServicer_to_server(servicer, server)


def _cancelling(factory: Callable) -> Callable:
    def make(service_method: str, streaming_type) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        return _run_apart(handler) if streaming_type == "unary_stream" else handler

    make.cancels_on_close = True
    return make


def _run_apart(handler: Callable) -> Callable:
    async def unary_stream(request: Any, context) -> AsyncIterator[Any]:
        # Unbounded: the pump never waits on the client, so it is always awaiting the
        # replica (Ray buffers the replica's chunks either way).
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for message in handler(request, _Context(context)):
                    queue.put_nowait((message, None))
                queue.put_nowait((_END, None))
            except Exception as error:  # Serve's handler reports statuses itself; pass anything else on
                queue.put_nowait((_END, error))

        task = asyncio.ensure_future(pump())
        # A cancel that lands while gRPC writes a chunk ends the call without reaching
        # this generator: the call's end cancels the pump then.
        context.add_done_callback(lambda _: task.cancel())
        try:
            while True:
                message, error = await queue.get()
                if message is _END:
                    if error is not None:
                        raise error
                    return
                yield message
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # Serve unwinds while the call is still open

    return unary_stream


class _Context:
    """The call's context for Serve's handler, with the peer read up front: Serve reads
    it for its access log when the request ends, which after a cancel can be after gRPC
    released the call (its peer() then dereferences a released call)."""

    def __init__(self, context):
        self._context = context
        self._peer = context.peer()

    def peer(self) -> str:
        return self._peer

    def __getattr__(self, name: str):
        return getattr(self._context, name)
