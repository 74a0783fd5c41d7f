"""Draft workers on loopback gRPC for tests of the verifier's draft streams."""

from __future__ import annotations

import grpc

from services.rpc import internal_pb2_grpc


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
