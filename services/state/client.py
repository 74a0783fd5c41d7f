"""A replica's end of the session store, with a local cache of the chunks it has
already fetched or saved, so a session that comes back to a replica costs no fetch.

Saving and publishing are fire-and-forget: they run beside the session, never on its
critical path, and a lost save only means recomputing those positions later.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..core.kv_chunks import KVChunk, block_names

log = logging.getLogger(__name__)
NAMESPACE = "outrider"


def session_store(app: str, resources: dict[str, float], prefix_bytes: int, idle_s: float):
    """The app's store actor, created by whichever replica asks first. It goes where
    the gateways go (the head node), takes no CPU, and restarts (empty) if it dies."""
    import ray  # here, not at the top: the loopback services (and a GPU box without Ray) import this module

    from .store import SessionStore

    return (
        ray.remote(SessionStore)
        .options(
            name=f"outrider-state:{app}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0, resources={k: 0.001 for k in resources}, max_restarts=-1, max_concurrency=1000,
        )
        .remote(prefix_bytes, idle_s, app)
    )


@dataclass(frozen=True)
class PrefixSharing:
    """A model's prompt KV shared across replicas through the store, in blocks."""

    client: "StateClient"
    block_tokens: int
    salt: str  # names the model and dtype: blocks of another model never match

    async def lookup(self, tokens: list[int]) -> tuple[list[str], list[KVChunk]]:
        """Names of every full block of ``tokens``, and the cached blocks of the
        longest known prefix; an unreachable store costs a recompute, nothing else."""
        names = block_names(tokens, self.block_tokens, self.salt)
        try:
            return names, await self.client.prefix(names)
        except Exception as error:
            log.warning("prefix lookup failed (computing it instead): %r", error)
            return names, []

    def export(self, runner, session: str, names: list[str], first: int) -> list[KVChunk]:
        """Blocks ``first``.. of a prefilled session (on the runner's compute thread)."""
        size, blocks = self.block_tokens, []
        for k in range(first, len(names)):
            chunk = runner.export(session, k * size, (k + 1) * size)
            if chunk is None:
                break
            blocks.append(chunk)
        return blocks

    def publish(self, names: list[str], first: int, blocks: list[KVChunk]) -> None:
        if blocks:
            self.client.publish_prefix(names[first : first + len(blocks)], blocks)


@dataclass(frozen=True)
class ShardedBlock:
    """A prefix block of a tensor-parallel target: one ref per rank, each to that
    rank's head-shard (ranks fetch their own; nothing crosses the replica)."""

    tokens: tuple[int, ...]
    refs: tuple  # [ranks] ObjectRef of a KVChunk
    nbytes: int = 0  # unknown until a rank fetches it


@dataclass(frozen=True)
class ShardedPrefixSharing:
    """PrefixSharing for a tensor-parallel target: a block's name per rank is the
    block's name plus the rank and group size, so only an identical sharding reuses it."""

    client: "StateClient"
    block_tokens: int
    salt: str
    ranks: int

    def _per_rank(self, names: list[str]) -> list[list[str]]:
        return [[f"{name}/rank{r}of{self.ranks}" for name in names] for r in range(self.ranks)]

    async def lookup(self, tokens: list[int]) -> tuple[list[str], list[ShardedBlock]]:
        names, size = block_names(tokens, self.block_tokens, self.salt), self.block_tokens
        try:
            refs = await self.client.store.lookup_prefix_sharded.remote(self._per_rank(names))
        except Exception as error:
            log.warning("prefix lookup failed (computing it instead): %r", error)
            return names, []
        return names, [ShardedBlock(tuple(tokens[k * size : (k + 1) * size]), tuple(r[k] for r in refs))
                       for k in range(len(refs[0]) if refs else 0)]

    def export(self, runner, session: str, names: list[str], first: int) -> list:
        """The ranks export and publish their own shards of blocks ``first``..; returns
        how many (each rank sends its shard straight to the store)."""
        return [None] * runner.publish_blocks(session, self._per_rank(names[first:]), first, self.block_tokens,
                                              self.client.store)

    def publish(self, names: list[str], first: int, blocks: list) -> None:
        """Nothing left to send: the ranks published their shards in ``export``."""


class StateClient:
    def __init__(self, store, cache_bytes: int = 64 * 2**20):  # bounds what a replica keeps
        self.store = store
        self.cache: OrderedDict[str, KVChunk] = OrderedDict()  # ref id -> chunk
        self.owners: dict[str, str] = {}  # ref id -> the session it was saved or restored for
        self.cache_bytes, self.cached_bytes = cache_bytes, 0
        self.background: set[asyncio.Task] = set()
        self.fetched_bytes = 0  # moved out of the object store into this process

    async def session_chunks(self, session: str) -> list[KVChunk]:
        return await self._fetch(await self.store.session_chunks.remote(session), session)

    async def prefix(self, names: list[str]) -> list[KVChunk]:
        """The cached blocks of the longest known prefix among ``names``."""
        if not names:
            return []
        return await self._fetch(await self.store.lookup_prefix.remote(names))

    def save_chunk(self, session: str, chunk: KVChunk) -> None:
        async def save():
            refs = await self.store.save_chunk.remote(session, chunk)
            if refs:
                self._remember(refs[0].hex(), chunk, session)

        self._spawn(save())

    def forget(self, session: str, after_s: float = 0.0, keep: Callable[[], bool] = lambda: False) -> None:
        """Drop ``session``'s chunks from this replica's cache once the saves in flight
        are done, ``after_s`` later, unless ``keep()`` then (a stream reopened here).
        They are kept for a stream that reconnects here; an ended session's would only
        grow the replica's memory until the cache's bound (64 MiB by default: 12% of a
        draft worker's) evicted them. The store keeps them until the gateway releases them."""
        pending = list(self.background)

        async def forget():
            await asyncio.gather(*pending, return_exceptions=True)
            if after_s > 0:
                asyncio.get_running_loop().call_later(after_s, self._drop, session, keep)
            else:
                self._drop(session, keep)

        self._spawn(forget())

    def _drop(self, session: str, keep: Callable[[], bool]) -> None:
        if keep():
            return
        for key in [key for key, owner in self.owners.items() if owner == session]:
            self.cached_bytes -= self.cache.pop(key).nbytes
            del self.owners[key]

    def publish_prefix(self, names: list[str], chunks: list[KVChunk]) -> None:
        self._spawn(self.store.publish_prefix.remote(names, chunks))

    def release(self, session: str) -> None:
        self._spawn(self.store.release.remote(session))

    def end_attempt(self, attempt: str) -> None:
        self._spawn(self.store.end_attempt.remote(attempt))

    async def flush(self) -> None:
        """Wait for the saves and publishes in flight (tests, shutdown)."""
        while self.background:
            await asyncio.gather(*list(self.background), return_exceptions=True)

    async def _fetch(self, refs: list, session: str | None = None) -> list[KVChunk]:
        chunks = {ref.hex(): self.cache[ref.hex()] for ref in refs if ref.hex() in self.cache}
        missing = [ref for ref in refs if ref.hex() not in chunks]
        for ref, chunk in zip(missing, await asyncio.gather(*missing)):
            self.fetched_bytes += chunk.nbytes
            chunks[ref.hex()] = chunk
            self._remember(ref.hex(), chunk, session)
        for key in chunks:
            if key in self.cache:
                self.cache.move_to_end(key)
        return [chunks[ref.hex()] for ref in refs]

    def _remember(self, key: str, chunk: KVChunk, session: str | None = None) -> None:
        if key in self.cache:
            return
        self.cache[key] = chunk
        self.cached_bytes += chunk.nbytes
        if session is not None:
            self.owners[key] = session
        while self.cached_bytes > self.cache_bytes and self.cache:
            old_key, old = self.cache.popitem(last=False)
            self.cached_bytes -= old.nbytes
            self.owners.pop(old_key, None)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("session store call failed (the state is recomputed if needed): %r", task.exception())


class AttemptWatch:
    """Cancels a verify stream the gateway has ended.

    Serve cancels a stream whose caller went away by cancelling the Ray task that
    reports its chunks. Cancelled while it reports one (rather than while it awaits the
    next), Ray's streaming executor keeps the generator without closing it, and Serve
    then never cancels the user code: the session ran to its end about 1 time in 15
    (tests/app/test_serving.py). So the gateway also ends every attempt in the session
    store, and this watch, one long poll per replica for all its streams, cancels the
    task of any stream still running when its attempt ends. The poll returns every
    attempt ended since the last one (any replica's: a few ids a second), so a stream
    that begins while a poll is out is covered by it.
    """

    def __init__(self, store, poll_s: float = 5.0):
        self.store, self.poll_s = store, poll_s
        self.running: dict[str, asyncio.Task] = {}  # attempt -> the task that runs its stream
        self.new: list[str] = []  # began since the last poll did
        self.changed = asyncio.Event()
        self.poller: asyncio.Task | None = None

    def watch(self, attempt: str) -> None:
        """Cancel the calling task if ``attempt`` ends before ``done(attempt)``."""
        self.running[attempt] = asyncio.current_task()
        self.new.append(attempt)
        self.changed.set()
        if self.poller is None or self.poller.done():
            self.poller = asyncio.ensure_future(self._poll())

    def done(self, attempt: str) -> None:
        self.running.pop(attempt, None)

    async def _poll(self) -> None:
        cursor = -1
        while True:
            if not self.running:
                self.changed.clear()
                await self.changed.wait()
                continue
            check, self.new = [a for a in self.new if a in self.running], []
            try:
                cursor, ended = await self.store.attempts_ended_after.remote(cursor, check, self.poll_s)
            except Exception as error:  # the store restarts: Serve's own cancellation still works
                log.warning("session store poll failed: %r", error)
                self.new = check + self.new
                await asyncio.sleep(1.0)
                continue
            for attempt in ended:
                task = self.running.pop(attempt, None)
                if task is not None:
                    log.info("cancelling the stream of attempt %s: the gateway ended it", attempt)
                    task.cancel()


def replica_state_client(cfg) -> StateClient | None:
    """The calling Serve replica's client of its app's store (``cfg``: AppArgs), or None
    when session state is off."""
    if not cfg.session_state:
        return None
    from ray import serve

    app = serve.get_replica_context().app_name
    return StateClient(session_store(app, cfg.gateway.resources, cfg.prefix_cache_bytes, cfg.session_idle_s),
                       cfg.replica_cache_bytes)
