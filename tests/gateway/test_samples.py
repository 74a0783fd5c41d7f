"""A request's samples: the lead stream starts first, the others at its first item;
the first error ends every stream."""

import asyncio

import pytest

from services.gateway.samples import merged, sample_request
from services.rpc import internal_pb2


def test_the_others_start_at_the_leads_first_item_and_every_item_arrives():
    started = []

    async def stream(name, n):
        started.append(name)
        for i in range(n):
            yield (name, i)
            await asyncio.sleep(0)

    async def go():
        seen = []
        async for item in merged([stream("lead", 3), stream("a", 2), stream("b", 2)]):
            if not seen:
                assert started == ["lead"]  # nobody else ran before the lead's first item
            seen.append(item)
        return seen

    seen = asyncio.run(go())
    assert sorted(seen) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("lead", 0), ("lead", 1), ("lead", 2)]


def test_the_first_error_ends_every_stream():
    closed = []

    async def forever(name):
        try:
            while True:
                yield name
                await asyncio.sleep(0)
        finally:
            closed.append(name)

    async def failing():
        yield "x"
        raise ValueError("replica refused")

    async def go():
        async for _ in merged([forever("lead"), failing(), forever("b")]):
            pass

    with pytest.raises(ValueError, match="refused"):
        asyncio.run(go())
    assert sorted(closed) == ["b", "lead"]


def test_each_sample_has_its_own_session_and_seed():
    req = internal_pb2.VerifyRequest(session_id="s0")
    req.sampling.seed = 7
    one, two = sample_request(req, 1), sample_request(req, 2)
    assert len({req.session_id, one.session_id, two.session_id}) == 3
    assert len({req.sampling.seed, one.sampling.seed, two.sampling.seed}) == 3
    assert sample_request(req, 1).sampling.seed == one.sampling.seed  # reproducible
