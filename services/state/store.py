"""The owner of every session object: one detached actor per app.

Why this actor owns them: a Ray object belongs to the worker that ``ray.put`` it and is
lost when that worker dies, and since Ray 2.56 ownership cannot be handed to another
process. Objects put by a draft or verifier replica would die with the replica, which
is exactly when they are needed. So replicas send chunks here and this actor puts
them: it runs on the head node (the gateway's resource), next to Serve's controller,
is detached from every replica's lifetime, and is found by name. If it dies anyway it
restarts empty; sessions then recompute KV from their committed tokens, which the
gateway always holds: slower, never wrong.

Two kinds of state:
- per session, the draft KV of its committed positions as contiguous chunks (drafters
  save one every few rounds); released when the gateway ends the request or after
  ``idle_s`` without use;
- shared prefix blocks of target KV named by their hash chain (core/kv_chunks.py), kept
  least-recently-used within ``prefix_bytes``.

It also relays the end of each verify attempt from the gateway to the verifier replicas
(``end_attempt`` / ``attempts_ended_after``; see client.AttemptWatch).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import ray

from ..core.kv_chunks import KVChunk
from ..telemetry.metrics import set_session_store_bytes


ENDED_REMEMBERED = 100_000  # session ids (about 100 bytes each)
REPORT_S = 5.0  # the held-bytes gauge is set at least this often


@dataclass
class _Session:
    refs: list = field(default_factory=list)  # ObjectRefs of contiguous chunks from position 0
    end: int = 0  # positions covered
    nbytes: int = 0
    used: float = field(default_factory=time.monotonic)


class SessionStore:
    def __init__(self, prefix_bytes: int, idle_s: float, application: str = ""):
        self.prefix_bytes, self.idle_s, self.application = prefix_bytes, idle_s, application
        self.sessions: dict[str, _Session] = {}
        # Recently ended sessions: a save still in flight from a worker when the gateway
        # ended the session must not bring it back (it would linger until idle expiry).
        self.ended: OrderedDict[str, None] = OrderedDict()
        self.prefixes: OrderedDict[str, tuple[ray.ObjectRef, int]] = OrderedDict()  # name -> (ref, bytes)
        self.prefix_held = 0
        self.expiry: asyncio.Task | None = None
        self.ended_attempts: OrderedDict[str, int] = OrderedDict()  # verify attempts the gateway ended -> seq
        self.attempt_seq = 0
        self.attempt_ended = asyncio.Event()  # set (and replaced) at each end

    def _start_expiry(self) -> None:
        if self.expiry is None:
            self.expiry = asyncio.get_running_loop().create_task(self._expire())

    def _report(self) -> None:
        """What this actor holds, for the dashboard (outrider_session_store_bytes)."""
        held = sum(s.nbytes for s in self.sessions.values()) + self.prefix_held
        set_session_store_bytes(held, self.application)

    async def save_chunk(self, session: str, chunk: KVChunk) -> list[ray.ObjectRef]:
        """Append a chunk; [its ref], or [] when it does not continue the session
        (a stale worker's chunk after a failover, or a store that restarted)."""
        self._start_expiry()
        if session in self.ended:
            return []
        state = self.sessions.setdefault(session, _Session())
        state.used = time.monotonic()
        if chunk.start != state.end:
            return []
        ref = ray.put(chunk)
        state.refs.append(ref)
        state.end, state.nbytes = chunk.end, state.nbytes + chunk.nbytes
        self._report()
        return [ref]

    async def session_chunks(self, session: str) -> list[ray.ObjectRef]:
        self._start_expiry()
        state = self.sessions.get(session)
        if state is None:
            return []
        state.used = time.monotonic()
        return list(state.refs)

    async def release(self, session: str) -> None:
        self.sessions.pop(session, None)
        self.ended[session] = None
        while len(self.ended) > ENDED_REMEMBERED:
            self.ended.popitem(last=False)
        self._report()

    async def end_attempt(self, attempt: str) -> None:
        """The gateway is done with a verify attempt, however it ended."""
        self.attempt_seq += 1
        self.ended_attempts[attempt] = self.attempt_seq
        while len(self.ended_attempts) > ENDED_REMEMBERED:
            self.ended_attempts.popitem(last=False)
        self.attempt_ended.set()
        self.attempt_ended = asyncio.Event()

    async def attempts_ended_after(self, cursor: int, check: list[str], timeout_s: float) -> tuple[int, list[str]]:
        """A long poll, one per verifier replica for all its streams: (the new cursor,
        the attempts ended after ``cursor`` plus those of ``check`` ended at all),
        waiting up to ``timeout_s`` for one. ``cursor`` -1: none yet. ``check``: the
        streams that began since the last poll did (they may have ended before it)."""
        deadline = time.monotonic() + timeout_s
        if cursor > self.attempt_seq:  # this actor restarted: everything it knows is new
            cursor = 0
        ended = [attempt for attempt in check if attempt in self.ended_attempts]
        while True:
            if cursor >= 0:
                for attempt, seq in reversed(self.ended_attempts.items()):
                    if seq <= cursor:
                        break
                    ended.append(attempt)
            remaining = deadline - time.monotonic()
            if ended or remaining <= 0:
                return self.attempt_seq, ended
            cursor = self.attempt_seq if cursor < 0 else cursor
            try:
                await asyncio.wait_for(self.attempt_ended.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def lookup_prefix(self, names: list[str]) -> list[ray.ObjectRef]:
        """Refs of the longest run of known blocks from the first one."""
        refs = []
        for name in names:
            if name not in self.prefixes:
                break
            self.prefixes.move_to_end(name)
            refs.append(self.prefixes[name][0])
        return refs

    async def lookup_prefix_sharded(self, names_per_shard: list[list[str]]) -> list[list[ray.ObjectRef]]:
        """For a tensor-parallel target (a name list per rank): refs per rank of the
        longest run of blocks every rank has, so that all ranks start from the same
        position (one call: nothing is evicted between the ranks' lookups)."""
        runs = [await self.lookup_prefix(names) for names in names_per_shard]
        common = min(map(len, runs), default=0)
        return [run[:common] for run in runs]

    async def publish_prefix(self, names: list[str], chunks: list[KVChunk]) -> None:
        for name, chunk in zip(names, chunks):
            if name in self.prefixes or chunk.nbytes > self.prefix_bytes:
                continue
            self.prefixes[name] = (ray.put(chunk), chunk.nbytes)
            self.prefix_held += chunk.nbytes
        while self.prefix_held > self.prefix_bytes:
            _, (_, nbytes) = self.prefixes.popitem(last=False)
            self.prefix_held -= nbytes
        self._report()

    async def usage(self) -> dict:
        return {
            "sessions": len(self.sessions),
            "session_bytes": sum(s.nbytes for s in self.sessions.values()),
            "prefix_blocks": len(self.prefixes),
            "prefix_bytes": self.prefix_held,
        }

    async def clear(self) -> None:
        self.sessions.clear()
        self.prefixes.clear()
        self.prefix_held = 0
        self._report()

    async def _expire(self) -> None:
        while True:
            # Often enough for the gauge too: Ray 2.60 drops a gauge value that is not
            # set again within two report intervals.
            await asyncio.sleep(min(max(self.idle_s / 4, 0.05), REPORT_S))
            now = time.monotonic()
            idle = [s for s, state in self.sessions.items() if now - state.used > self.idle_s]
            for session in idle:
                del self.sessions[session]
            self._report()

