"""A small client for the public Outrider API, used by the CLI, the benchmark and the
tests; any gRPC client generated from protos/ works the same."""

from __future__ import annotations

from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..core.sampling import SamplingParams
from ..rpc import outrider_pb2, outrider_pb2_grpc
from ..rpc.convert import METHOD_IDS, sampling_to_proto


def make_request(
    prompt: str | list[int],
    max_new_tokens: int = 0,
    params: SamplingParams = SamplingParams(),
    method: str | None = None,
    gamma: int = 0,
    adaptive: bool = False,
    pipeline: bool | None = None,
    request_id: str = "",
    tree: str = "",
    stop: tuple[str, ...] = (),
    stop_token_ids: tuple[int, ...] = (),
    min_tokens: int = 0,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    n: int = 0,
    fanout: int | None = None,
) -> outrider_pb2.GenerateRequest:
    """A GenerateRequest; ``params`` carries sampling and penalties (its stop rule and
    prompt length are the server's to resolve: the stop arguments say what to stop at)."""
    speculation = outrider_pb2.Speculation(method=METHOD_IDS[method] if method else 0, gamma=gamma, adaptive=adaptive,
                                           tree=tree)
    if pipeline is not None:
        speculation.pipeline = pipeline
    if fanout is not None:
        speculation.fanout = fanout
    req = outrider_pb2.GenerateRequest(
        request_id=request_id, max_new_tokens=max_new_tokens, sampling=sampling_to_proto(params),
        speculation=speculation, n=n,
        stop=outrider_pb2.StopOptions(sequences=stop, token_ids=stop_token_ids, min_tokens=min_tokens, ignore_eos=ignore_eos),
    )
    if logprobs is not None:
        req.logprobs = logprobs
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class OutriderClient:
    def __init__(self, address: str, tls: bool = False, ca_cert: bytes | None = None):
        """``tls``: a TLS channel (to a TLS-terminating ingress in front of Serve's
        proxies, k8s/components/tls-ingress), checked against ``ca_cert`` (PEM) or else
        the system's roots."""
        self.address = address
        if tls:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_cert))
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = outrider_pb2_grpc.OutriderStub(self.channel)

    def generate(self, request: outrider_pb2.GenerateRequest, timeout: float | None = None) -> Iterator:
        """Streamed ``GenerateChunk``s; the last one carries the stats."""
        return self.stub.Generate(request, timeout=timeout)

    def generate_unary(self, request: outrider_pb2.GenerateRequest, timeout: float | None = None):
        return self.stub.GenerateUnary(request, timeout=timeout)

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "OutriderClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
