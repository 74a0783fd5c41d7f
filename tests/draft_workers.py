"""Draft workers on loopback gRPC for tests of the verifier's draft streams."""

from __future__ import annotations

import grpc

from services.core.sampling import SamplingParams
from services.rpc import internal_pb2, internal_pb2_grpc, outrider_pb2
from services.rpc.convert import METHOD_IDS, sampling_to_proto

PROMPT = [5, 17, 33, 2, 9]


async def start_worker(service):
    """``service`` (a DrafterService) on a loopback gRPC server: (service, server, address)."""
    server = grpc.aio.server()
    internal_pb2_grpc.add_DrafterServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return service, server, f"127.0.0.1:{port}"


async def close(verifier, servers) -> None:
    """Close ``verifier``'s channels to the workers, then stop their servers."""
    for channel in verifier.channels.values():
        await channel.close()
    for server in servers:
        await server.stop(None)


def greedy_request(session_id: str, max_new: int, gamma: int) -> internal_pb2.VerifyRequest:
    """A greedy, pipelined draft-model request for ``PROMPT``."""
    return internal_pb2.VerifyRequest(
        request_id=session_id, session_id=session_id, prompt_ids=PROMPT, max_new_tokens=max_new,
        sampling=sampling_to_proto(SamplingParams(seed=0)),
        speculation=outrider_pb2.Speculation(method=METHOD_IDS["draft"], gamma=gamma, pipeline=True))
