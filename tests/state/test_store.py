"""The session store on a real Ray instance: it owns what replicas send it (so the
state outlives them), keeps sessions contiguous, shares prefix blocks within a byte
budget, and frees released and idle sessions."""

import asyncio
import time

import pytest
import ray
from tiny_models import tiny

from services.core.kv_pool import KVPool
from services.core.paged_kv import PagedKV, extend_paged
from services.state.client import AttemptWatch, StateClient
from services.state.store import SessionStore

TOKENS = list(range(3, 40))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="error",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def kv():
    model = tiny("llama", seed=0)
    state = PagedKV(KVPool.for_model(model, 2**20))
    extend_paged(model, [state], [TOKENS], [1])
    return state


def new_store(prefix_bytes=2**20, idle_s=600.0):
    return ray.remote(SessionStore).options(num_cpus=0).remote(prefix_bytes, idle_s)


@ray.remote(num_cpus=0)
class Replica:
    """Stands in for a draft replica: it sends a chunk, then dies."""

    def save(self, store, session, chunk):
        return ray.get(store.save_chunk.remote(session, chunk))


def test_chunks_outlive_the_replica_that_sent_them(local_ray, kv):
    store = new_store()
    replica = Replica.remote()
    chunk = kv.export(0, 10)
    assert len(ray.get(replica.save.remote(store, "s", chunk))) == 1
    ray.kill(replica)
    (ref,) = ray.get(store.session_chunks.remote("s"))
    assert ray.get(ref).tokens == tuple(TOKENS[:10])


def test_a_chunk_must_continue_its_session(local_ray, kv):
    store = new_store()
    assert ray.get(store.save_chunk.remote("s", kv.export(0, 5)))
    assert ray.get(store.save_chunk.remote("s", kv.export(6, 9))) == []  # a gap
    assert ray.get(store.save_chunk.remote("s", kv.export(0, 5))) == []  # stale, a second time
    assert ray.get(store.save_chunk.remote("s", kv.export(5, 9)))
    assert [ray.get(r).end for r in ray.get(store.session_chunks.remote("s"))] == [5, 9]
    assert ray.get(store.usage.remote())["sessions"] == 1


def test_prefix_lookup_returns_the_longest_known_run_and_evicts_least_recently_used(local_ray, kv):
    block = kv.export(0, 8)
    store = new_store(prefix_bytes=3 * block.nbytes)
    ray.get(store.publish_prefix.remote(["a", "b", "c"], [kv.export(s, s + 8) for s in (0, 8, 16)]))
    assert [ray.get(r).start for r in ray.get(store.lookup_prefix.remote(["a", "b", "x", "c"]))] == [0, 8]
    ray.get(store.lookup_prefix.remote(["a"]))  # "a" is now the most recently used
    ray.get(store.publish_prefix.remote(["d"], [kv.export(24, 32)]))  # over budget: "c" goes
    usage = ray.get(store.usage.remote())
    assert usage["prefix_blocks"] == 3 and usage["prefix_bytes"] <= 3 * block.nbytes
    assert ray.get(store.lookup_prefix.remote(["c"])) == []
    assert len(ray.get(store.lookup_prefix.remote(["a", "b"]))) == 2


def test_released_and_idle_sessions_are_dropped(local_ray, kv):
    store = new_store(idle_s=0.5)
    ray.get(store.save_chunk.remote("done", kv.export(0, 5)))
    ray.get(store.save_chunk.remote("idle", kv.export(0, 5)))
    ray.get(store.release.remote("done"))
    assert ray.get(store.usage.remote())["sessions"] == 1
    # A save still in flight when the session ended does not bring it back.
    assert ray.get(store.save_chunk.remote("done", kv.export(0, 5))) == []
    assert ray.get(store.usage.remote())["sessions"] == 1
    deadline = time.monotonic() + 10
    while ray.get(store.usage.remote())["sessions"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.get(store.usage.remote()) == {"sessions": 0, "session_bytes": 0, "prefix_blocks": 0, "prefix_bytes": 0}


def test_the_client_fetches_a_chunk_once(local_ray, kv):
    store = new_store()

    async def go():
        client = StateClient(store)
        client.save_chunk("s", kv.export(0, 6))
        await client.flush()
        first = await client.session_chunks("s")  # saved here: already in the local cache
        other = StateClient(store)
        fetched = await other.session_chunks("s")
        again = await other.session_chunks("s")
        return client.fetched_bytes, first, other.fetched_bytes, fetched, again

    mine, first, fetched_bytes, fetched, again = asyncio.run(go())
    assert mine == 0 and first[0].tokens == tuple(TOKENS[:6])
    assert fetched_bytes == fetched[0].nbytes > 0  # only the first fetch moved bytes
    assert again[0].tokens == fetched[0].tokens


def test_a_replicas_chunk_cache_keeps_within_its_bytes(local_ray, kv):
    store = new_store()
    chunks = [kv.export(i, i + 6) for i in range(0, 30, 6)]
    budget = 2 * chunks[0].nbytes

    async def go():
        client, none = StateClient(store, budget), StateClient(store, 0)
        for chunk in chunks:  # one session's, in order: the store keeps them
            client.save_chunk("s", chunk)
            none.save_chunk("t", chunk)
            await client.flush()
            await none.flush()
        return client, none

    client, none = asyncio.run(go())
    assert client.cached_bytes <= budget and len(client.cache) == 2  # the two saved last
    assert [c.start for c in client.cache.values()] == [18, 24]
    assert none.cached_bytes == 0 and not none.cache


def test_a_forgotten_session_leaves_the_replicas_cache_and_stays_in_the_store(local_ray, kv):
    store = new_store()
    a, b = [kv.export(0, 6), kv.export(6, 12)], kv.export(0, 6)

    async def go():
        client = StateClient(store)
        client.save_chunk("a", a[0])
        await client.flush()  # (the store takes a session's chunks in order)
        client.save_chunk("a", a[1])
        client.save_chunk("b", b)
        client.forget("a")  # with a save still in flight: it is waited for
        await client.flush()
        cached = (client.cached_bytes, [c.tokens for c in client.cache.values()])
        restored = await client.session_chunks("a")  # from the store: fetched again
        fetched = client.fetched_bytes
        # Later, unless kept then (a stream that reopened here).
        client.forget("a", after_s=0.2, keep=lambda: True)
        client.forget("b", after_s=0.2)
        await client.flush()  # (a later drop is not waited for)
        before = len(client.cache)
        await asyncio.sleep(0.4)
        return cached, restored, fetched, before, [c.tokens for c in client.cache.values()]

    (cached_bytes, cached), restored, fetched, before, after = asyncio.run(go())
    assert cached == [b.tokens] and cached_bytes == b.nbytes
    assert [c.tokens for c in restored] == [c.tokens for c in a] and fetched == sum(c.nbytes for c in a)
    assert before == 3 and after == [c.tokens for c in a]


def test_ended_attempts_are_relayed_to_a_long_poll(local_ray):
    store = new_store()
    ray.get(store.end_attempt.remote("early"))
    cursor, ended = ray.get(store.attempts_ended_after.remote(-1, ["early", "a"], 5.0))
    assert ended == ["early"]  # a stream checked when it begins: ended before any poll
    assert ray.get(store.attempts_ended_after.remote(cursor, [], 0.1)) == (cursor, [])  # nothing new: times out
    waiting = store.attempts_ended_after.remote(cursor, [], 30.0)
    time.sleep(0.3)
    ray.get(store.end_attempt.remote("b"))
    cursor, ended = ray.get(waiting, timeout=10)
    assert ended == ["b"]  # woken by the end, not the timeout: any attempt after the cursor
    ray.get(store.end_attempt.remote("c"))
    ray.get(store.end_attempt.remote("d"))
    assert sorted(ray.get(store.attempts_ended_after.remote(cursor, [], 5.0))[1]) == ["c", "d"]


def test_the_watch_cancels_a_stream_whose_attempt_ends_and_spares_a_finished_one(local_ray):
    store = new_store()
    ray.get(store.usage.remote())  # started: its first call can take seconds on a loaded machine

    async def go():
        client = StateClient(store)
        watch = AttemptWatch(store, poll_s=0.2)

        async def stream(attempt, finished_first, then_s):
            watch.watch(attempt)
            try:
                if finished_first:
                    watch.done(attempt)  # its stats went out: the gateway's end is expected
                await asyncio.sleep(0.5)
                client.end_attempt(attempt)  # as the gateway does, however the attempt ends
                started = time.monotonic()
                try:
                    await asyncio.sleep(then_s)
                except asyncio.CancelledError:
                    return f"cancelled after {time.monotonic() - started:.1f} s"
                return "ran to its end"
            finally:
                watch.done(attempt)

        results = await asyncio.gather(stream("lost", False, 60), stream("finished", True, 2))
        return results, watch.running

    (lost, finished), running = asyncio.run(go())
    assert lost.startswith("cancelled after") and float(lost.split()[2]) < 10
    assert finished == "ran to its end" and running == {}
