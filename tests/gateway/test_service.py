"""A cancelled request frees its session at once, wherever the cancellation lands.

Serve cancels a streaming call by throwing CancelledError into the deployment's
generator; when that generator is suspended at a `yield` inside an `async for`, the
generator being iterated is *not* closed by the exception. These tests fail if any
level leaves its inner stream open (the verify session would then run on). A refusal
raised in the verifier replica reaches the client as a gRPC status with its reason."""

import asyncio
import dataclasses

import grpc
from ray.serve.exceptions import BackPressureError
import pytest
from ray.exceptions import RayTaskError

from services.core.errors import InvalidRequest, PoolExhausted

from services.gateway.deployment import Gateway
from services.gateway.service import GatewayService, Limits, Overloaded
from services.gateway.client import make_request
from services.models.loading import bundled_paths, load_tokenizer
from services.rpc import internal_pb2

LIMITS = Limits(vocab_size=8192, max_context=512, max_new_tokens=256, default_max_new_tokens=16, max_sessions=4,
                default_method="draft", default_gamma=4)


class FakeVerifier:
    """Streams one token per chunk forever; records whether its stream was closed."""

    def __init__(self):
        self.closed = False

    async def __call__(self, request):
        try:
            while True:
                yield internal_pb2.VerifyChunk(token_ids=[65])
                await asyncio.sleep(0)
        finally:
            self.closed = True


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(bundled_paths().target)


def test_closing_the_service_stream_closes_the_verify_stream_at_once(tokenizer):
    verifier = FakeVerifier()
    service = GatewayService(tokenizer, LIMITS, verifier)

    async def go():
        chunks = service.generate(make_request("def f():", 100))
        await chunks.__anext__()
        assert service.active_sessions == 1
        await chunks.aclose()  # suspended at its yield, as when the client goes away
        return verifier.closed, service.active_sessions

    assert asyncio.run(go()) == (True, 0)


def test_serve_style_cancellation_of_the_deployment_generator_frees_the_session(tokenizer):
    verifier = FakeVerifier()
    gateway = object.__new__(Gateway.func_or_class)  # the shim, without loading models
    gateway.service = GatewayService(tokenizer, LIMITS, verifier)

    async def go():
        stream = gateway.Generate(make_request("def f():", 100), grpc_context=None)
        await stream.__anext__()
        with pytest.raises(asyncio.CancelledError):
            await stream.athrow(asyncio.CancelledError())  # what Serve does on disconnect
        return verifier.closed, gateway.service.active_sessions

    assert asyncio.run(go()) == (True, 0)


class FailingVerifyHandle:
    """A Serve handle whose Verify stream fails in the verifier replica with ``cause``."""

    def __init__(self, cause: Exception):
        self.Verify = self
        self.cause = cause

    def remote(self, payload):
        handle = self

        class Stream:
            def __aiter__(self):
                return self

            async def __anext__(self):
                if isinstance(handle.cause, BackPressureError):  # raised by the gateway's own router
                    raise handle.cause
                raise RayTaskError("Verify", "traceback", handle.cause)

            def cancel(self):
                """Nothing to cancel."""

        return Stream()


class Context:
    code = details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


@pytest.mark.parametrize("cause,code", [
    (PoolExhausted("the KV pool has 0 free positions of 1024"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidRequest("the draft worker refused the session: too large"), grpc.StatusCode.INVALID_ARGUMENT),
    # Every verifier replica at max_ongoing_requests, and the queue for them full.
    (BackPressureError(num_queued_requests=16, max_queued_requests=16), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_verifier_refusals_reach_the_client_as_a_status_with_the_reason(tokenizer, cause, code):
    gateway = object.__new__(Gateway.func_or_class)  # the shim, without loading models
    gateway.verifier = FailingVerifyHandle(cause)
    gateway.service = GatewayService(tokenizer, LIMITS, gateway._verify)
    gateway.metrics = None
    context = Context()

    reason = "every verifier replica is at its session limit" if isinstance(cause, BackPressureError) else str(cause)

    async def go():
        with pytest.raises((Overloaded, InvalidRequest), match=reason):
            [chunk async for chunk in gateway.Generate(make_request("def f():", 8), context)]
        return gateway.service.active_sessions

    assert asyncio.run(go()) == 0
    assert context.code == code and reason in context.details
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert "retry in about 1.0 s" in context.details  # no request timed yet: the default hint


@pytest.mark.parametrize("request_args,reason", [
    (dict(method="medusa"), "MEDUSA is not served here: no Medusa heads"),
    (dict(method="mtp"), "MTP is not served here"),
    (dict(method="eagle"), "EAGLE is not served here: no EAGLE-3 drafter"),
    (dict(method="draft", tree="0;1"), "a tree is for MEDUSA, MTP, EAGLE or TREE, not DRAFT"),
    (dict(method="tree", tree="draft,medusa,mtp"), "one kind of heads at most"),
])
def test_methods_without_heads_and_misplaced_trees_are_refused(tokenizer, request_args, reason):
    service = GatewayService(tokenizer, LIMITS, FakeVerifier())
    with pytest.raises(InvalidRequest, match=reason):
        service.prepare(make_request("def f():", 8, **request_args), 0.0)


def test_a_served_tree_method_gets_its_tree_checked_and_passed_on(tokenizer):
    limits = dataclasses.replace(LIMITS, head_methods={"medusa": None, "mtp": "no MTP modules", "eagle": None})
    service = GatewayService(tokenizer, limits, FakeVerifier())
    with pytest.raises(InvalidRequest, match="lack their parent paths"):
        service.prepare(make_request("def f():", 8, method="medusa", tree="0;0.1.2"), 0.0)
    with pytest.raises(InvalidRequest, match="paths of ranks"):
        service.prepare(make_request("def f():", 8, method="medusa", tree="0;x"), 0.0)
    prepared = service.prepare(make_request("def f():", 8, method="medusa", tree="0;1;0.0"), 0.0)
    assert prepared.speculation.tree == "0;1;0.0" and prepared.speculation.method == 4
    with pytest.raises(InvalidRequest, match="depth,top_k,nodes"):  # EAGLE's tree is its budget
        service.prepare(make_request("def f():", 8, method="eagle", tree="0;1;0.0"), 0.0)
    prepared = service.prepare(make_request("def f():", 8, method="eagle", tree="4,2,6"), 0.0)
    assert prepared.speculation.tree == "4,2,6" and prepared.speculation.method == 6


def test_session_keys_are_the_servers_and_request_ids_only_labels(tokenizer):
    service = GatewayService(tokenizer, LIMITS, FakeVerifier())
    request = make_request("def f():", 8, request_id="mine")
    first, again = service.prepare(request, 0.0), service.prepare(request, 0.0)
    assert first.request_id == again.request_id == "mine"  # echoed and traced
    assert first.session_id != again.session_id  # a reused or shared id shares no state
    assert len(first.session_id) == 32 and "mine" not in first.session_id
    assert service.prepare(make_request("def f():", 8), 0.0).request_id  # assigned when empty


def test_prompt_and_per_client_limits_are_enforced_before_any_work(tokenizer):
    limits = dataclasses.replace(LIMITS, max_prompt_tokens=4, max_sessions_per_client=1)
    verifier = FakeVerifier()
    service = GatewayService(tokenizer, limits, verifier)
    with pytest.raises(InvalidRequest, match="prompt of 5 tokens exceeds this server's limit of 4"):
        service.prepare(make_request([1, 2, 3, 4, 5], 8), 0.0)

    async def go():
        first = service.generate(make_request([1, 2, 3], 100), client="ipv4:10.0.0.7")
        await first.__anext__()  # one session open for this client
        with pytest.raises(Overloaded, match="this client already has 1 concurrent sessions"):
            await service.generate(make_request([1, 2, 3], 8), client="ipv4:10.0.0.7").__anext__()
        other = service.generate(make_request([1, 2, 3], 100), client="ipv4:10.0.0.8")
        await other.__anext__()  # another client is not held back
        open_now = dict(service.client_sessions)
        await first.aclose()
        await other.aclose()
        return open_now, service.client_sessions

    open_now, after = asyncio.run(go())
    assert open_now == {"ipv4:10.0.0.7": 1, "ipv4:10.0.0.8": 1} and after == {}
