"""The internal streams' token: a Draft stream without it is refused UNAUTHENTICATED
before any handler runs, on a bare server and on a served cluster whose nodes have it."""

import asyncio

import grpc
import pytest

from services.rpc import internal_pb2, internal_pb2_grpc
from services.rpc.auth import TOKEN_ENV, TokenInterceptor, auth_metadata


class EchoDrafter(internal_pb2_grpc.DrafterServicer):
    """Answers each command with an empty block; counts the streams it served."""

    def __init__(self):
        self.streams = 0

    async def Draft(self, request_iterator, context):
        self.streams += 1
        async for _ in request_iterator:
            yield internal_pb2.DraftBlock(round=7)
            return


async def one_stream(address: str, metadata, write: bool = True) -> internal_pb2.DraftBlock:
    """Opens a Draft stream and reads its first block. A refused stream is read without
    writing: the refusal races a client's write, which then fails INTERNAL ("Failed
    execute_batch") in grpc's core instead of carrying the server's status."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = internal_pb2_grpc.DrafterStub(channel).Draft(metadata=metadata)
        if write:
            await call.write(internal_pb2.DraftCommand(open=internal_pb2.DraftOpen(session_id="someone-elses")))
        return await call.read()


def test_only_streams_with_the_token_reach_the_service():
    async def go():
        servicer = EchoDrafter()
        server = grpc.aio.server(interceptors=[TokenInterceptor("s3cret")])
        internal_pb2_grpc.add_DrafterServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            codes = []
            for metadata in ((), auth_metadata("wrong"), (("authorization", "s3cret"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await one_stream(f"127.0.0.1:{port}", metadata, write=False)
                codes.append(err.value.code())
            refused_streams = servicer.streams
            block = await one_stream(f"127.0.0.1:{port}", auth_metadata("s3cret"))
            return codes, refused_streams, block.round
        finally:
            await server.stop(None)

    codes, refused_streams, round_ = asyncio.run(go())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert refused_streams == 0 and round_ == 7  # refused before the handler; the right token passes


def test_a_served_cluster_with_a_token_serves_and_refuses_strangers():
    from ray import serve

    from serving_cluster import APP, serving_cluster, until_drafted
    from services.gateway.client import make_request

    with serving_cluster(env={TOKEN_ENV: "cluster-token"}) as (client, _):
        chunks = until_drafted(client, make_request("def parse_args(argv):", 16, method="draft", gamma=4))
        endpoint = serve.get_deployment_handle("drafter", app_name=APP).endpoint.remote().result()
        port = int(endpoint.rsplit(":", 1)[1])
        host = endpoint.rsplit(":", 1)[0]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(one_stream(endpoint, (), write=False))
    assert sum(len(c.token_ids) for c in chunks) == 16 and chunks[-1].stats.drafted > 0  # drafted over the stream
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert host not in ("0.0.0.0", "::", "[::]") and port > 0  # bound to the node's address
