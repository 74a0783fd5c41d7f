"""The proxy hook: a call that ends, however it ends, cancels the request behind it."""

import asyncio
from unittest.mock import Mock

import pytest
from ray.serve._private.grpc_util import gRPCGenericServer

from services.gateway.grpc_proxy import _run_apart, add_outrider_to_proxy


class FakeContext:
    """The parts of grpc.aio's servicer context the hook and Serve's handler use. After
    the call ends, peer() fails, as a released call's would (it segfaults there)."""

    def __init__(self):
        self.callbacks = []
        self.ended = False
        self.code = None

    def peer(self):
        if self.ended:
            raise RuntimeError("peer() of a released call")
        return "ipv4:127.0.0.1:5000"

    def set_code(self, code):
        self.code = code

    def add_done_callback(self, callback):
        self.callbacks.append(callback)

    def end(self):
        for callback in self.callbacks:
            callback(self)
        self.ended = True  # gRPC releases the call after the callbacks


class ServeLikeHandler:
    """Like Serve's unary_stream: the replica's request is cancelled only when the
    cancellation arrives while it awaits the next chunk; a close at a `yield` is
    swallowed. At its end it reads the peer and sets the code, as Serve does."""

    def __init__(self, chunks: int, fail_at: int | None = None):
        self.chunks, self.fail_at = chunks, fail_at
        self.replica_cancelled = False
        self.peer = None

    async def __call__(self, request, context):
        try:
            for i in range(self.chunks):
                try:
                    await asyncio.sleep(0.01)  # the replica's next chunk
                except asyncio.CancelledError:
                    self.replica_cancelled = True
                    raise
                if i == self.fail_at:
                    raise ValueError("proxy failure")
                yield f"{request}:{i}"
        finally:
            self.peer = context.peer()
            context.set_code("DONE")


def run(coro):
    return asyncio.run(coro)


def test_every_chunk_passes_in_order_and_serve_finishes_inside_the_call():
    async def main():
        handler, context = ServeLikeHandler(5), FakeContext()
        got = [m async for m in _run_apart(handler)("r", context)]
        return got, handler, context

    got, handler, context = run(main())
    assert got == [f"r:{i}" for i in range(5)]
    assert context.code == "DONE" and handler.peer == "ipv4:127.0.0.1:5000" and not handler.replica_cancelled


def test_a_call_cancelled_while_it_awaits_cancels_the_replica():
    async def main():
        handler, context = ServeLikeHandler(1000), FakeContext()
        stream = _run_apart(handler)("r", context)

        async def consume():
            async for _ in stream:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()  # gRPC cancels the call's task while it awaits the next chunk
        with pytest.raises(asyncio.CancelledError):
            await task
        return handler, context

    handler, context = run(main())
    assert handler.replica_cancelled and context.code == "DONE"


def test_a_call_cancelled_while_grpc_writes_cancels_the_replica():
    # The case Serve misses: the generator sits at its `yield` (gRPC is writing the
    # chunk) when the call ends; gRPC never resumes or closes it.
    async def main():
        handler, context = ServeLikeHandler(1000), FakeContext()
        stream = _run_apart(handler)("r", context)
        assert await stream.__anext__() == "r:0"
        context.end()
        await asyncio.sleep(0.05)
        replica_cancelled = handler.replica_cancelled
        await stream.aclose()  # garbage collection, later
        return replica_cancelled, handler

    replica_cancelled, handler = run(main())
    assert replica_cancelled
    assert handler.peer == "ipv4:127.0.0.1:5000"  # read up front, not from the released call


def test_a_failure_in_the_proxy_reaches_the_call():
    async def main():
        handler = ServeLikeHandler(5, fail_at=2)
        return [m async for m in _run_apart(handler)("r", FakeContext())]

    with pytest.raises(ValueError, match="proxy failure"):
        run(main())


def test_the_hook_wraps_serves_streaming_handlers_once_and_registers_the_service():
    made = []

    def factory(service_method, streaming_type):
        async def handler(request, context):
            yield request
        made.append((service_method, streaming_type))
        return handler

    async def register_twice():  # a second app's registration does not wrap twice
        server = gRPCGenericServer(factory)  # grpc.aio: made on a running loop
        add_outrider_to_proxy(Mock(), server)
        wrapped = server.service_handler_factory
        add_outrider_to_proxy(Mock(), server)
        return server, wrapped

    server, wrapped = run(register_twice())
    assert server.service_handler_factory is wrapped and wrapped.cancels_on_close
    assert {"/outrider.v1.Outrider/Generate", "/outrider.v1.Outrider/GenerateUnary"} <= {m for m, _ in made}
    assert wrapped(service_method="/x/Y", streaming_type="unary_stream").__qualname__ == "_run_apart.<locals>.unary_stream"
    assert wrapped(service_method="/x/Y", streaming_type="unary_unary").__qualname__.endswith("factory.<locals>.handler")
