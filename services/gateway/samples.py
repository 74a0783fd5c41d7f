"""A request's n samples: each its own session and random stream, streamed as one."""

from __future__ import annotations

import asyncio
import secrets
from contextlib import aclosing
from typing import AsyncIterator

from ..core.sampling import sample_seed
from ..rpc import internal_pb2


def sample_request(req: internal_pb2.VerifyRequest, index: int) -> internal_pb2.VerifyRequest:
    """Sample ``index`` (> 0) of a request: its own session and random stream."""
    sample = internal_pb2.VerifyRequest()
    sample.CopyFrom(req)
    sample.session_id = secrets.token_hex(16)
    sample.sampling.seed = sample_seed(req.sampling.seed, index)
    return sample


async def merged(streams: list[AsyncIterator]) -> AsyncIterator:
    """The items of several streams as they come; the first error ends them all. The
    first stream leads: the others start at its first item, when its prompt's KV
    blocks are computed and published to the prefix cache, so they start from them."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream) -> None:
        try:
            async with aclosing(stream) as items:
                async for item in items:
                    queue.put_nowait(item)
            queue.put_nowait(None)
        except Exception as error:
            queue.put_nowait(error)

    tasks = [asyncio.ensure_future(pump(streams[0]))]
    try:
        ended = 0
        while ended < len(streams):
            item = await queue.get()
            if len(tasks) < len(streams):
                tasks += [asyncio.ensure_future(pump(stream)) for stream in streams[1:]]
            if item is None:
                ended += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
