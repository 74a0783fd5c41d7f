"""A tensor-parallel target: N Ray actors, one shard each, driven by the verifier replica.

Placement: the ranks are scheduled into the replica's own placement group (the
builder asks Serve for one bundle for the replica plus one per rank, STRICT_PACK), so
they sit on the replica's node, one GPU each on GPU nodes, and live and die with it.
Each rank joins one torch.distributed group (NCCL on GPU, gloo on CPU) and loads its
shard with transformers' ``tp_plan="auto"``; it keeps its head-shard of every
session's KV in its own ``TargetRunner``.

Driven from rank 0: per pass the replica makes one Ray call, to rank 0, which
broadcasts the feeds (token ids only) to the other ranks over the group itself (a gloo
group: Python objects) and runs its own shard; the others wait in ``follow`` for the
next command, for the group's life, and run each in rank 0's order. The all-reduces
inside the layers leave rank 0 with the full logits; it runs the round's acceptance on
them (core/verifier.py ``accept``), and only the outcomes come back: a few hundred
bytes a session, not the batch x (gamma + 1) x V logits. A Ray call per
rank per pass cost more than the pass's own collectives; ordering the ranks' work by
one broadcast also keeps every collective in the same order on every rank. Commands
that carry a rank's own Ray objects (a prefix's shards, the store's handle) are staged
on each rank by a Ray call first, so the objects keep Ray's reference counting.

Shared prefixes: each rank restores and publishes its own head-shards of prefix
blocks straight from and to the session store (a name per rank and group size); the
replica only looks up which blocks all ranks have.

Failure: if a rank dies, the others would wait in a collective until the group's
timeout. The replica watches every follower's ``follow`` call beside its own call to
rank 0: a dead rank's fails at once, and the replica kills the whole group so nothing
hangs, and from then on fails its health check, so Serve replaces the replica (and
with it the group); the sessions it held continue elsewhere from their committed
tokens (the gateway retries them).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import socket

import ray
import torch
from ray.exceptions import RayTaskError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..core.errors import PoolExhausted
from ..core.proposals import VerifyOutcome
from ..core.target import DEFAULT_KV_CACHE_BYTES, Feed, TargetRunner
from ..core.verifier import AcceptRow, accept

GROUP_TIMEOUT = datetime.timedelta(seconds=120)  # a collective never waits longer than this


class TargetRank:
    """One rank: a shard of the target and its share of every session's KV."""

    def __init__(self, rank: int, world_size: int, threads: int):
        torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.runner: TargetRunner | None = None
        self.commands = None  # the process group rank 0's commands travel on
        self.staged: dict[int, tuple] = {}  # this rank's own arguments of a command to come

    def master_address(self) -> str:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def setup(self, master: str, path: str, device: str, dtype: str, trust_remote_code: bool,
              kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES) -> None:
        from ..models.loading import load_model

        os.environ.update(RANK=str(self.rank), LOCAL_RANK="0", WORLD_SIZE=str(self.world_size))
        torch.distributed.init_process_group(
            "nccl" if device == "cuda" else "gloo", init_method=f"tcp://{master}",
            rank=self.rank, world_size=self.world_size, timeout=GROUP_TIMEOUT,
        )
        # NCCL moves tensors on GPUs only: commands (Python objects) take a gloo group beside it.
        self.commands = torch.distributed.new_group(backend="gloo") if device == "cuda" else None
        model = load_model(path, device, dtype, trust_remote_code, tensor_parallel=True)
        # Every rank's pool has the same blocks and sees the same feeds in the same order,
        # so all ranks admit or refuse (PoolExhausted) a pass alike, before any collective.
        self.runner = TargetRunner(model, kv_cache_bytes, tp_size=self.world_size)

    def lead(self, op: str, *args, own: tuple = ()):
        """Rank 0: send ``op`` to every other rank (each waits in ``follow``), then run it
        here, with ``own`` (arguments only rank 0 reads, which are not broadcast) after
        ``args``."""
        torch.distributed.broadcast_object_list([op, args], src=0, group=self.commands)
        return getattr(self, op)(*args, *own)

    @ray.method(concurrency_group="follow")
    def follow(self) -> None:
        """Ranks 1..N-1, for the group's life (until the group is killed): run every
        command rank 0 leads, in its order. In a concurrency group of its own, so that
        ``ping`` and ``stage`` still answer while it waits."""
        while True:
            box = [None, None]
            torch.distributed.broadcast_object_list(box, src=0, group=self.commands)
            op, args = box
            with contextlib.suppress(PoolExhausted):  # every rank refuses a pass alike, before any collective
                getattr(self, op)(*args)

    def stage(self, key: int, args: tuple) -> None:
        """This rank's own arguments of command ``key`` (Ray objects stay Ray's)."""
        self.staged[key] = args

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor] | None:
        logits = self.runner.forward(feeds)
        # Copies: each row is a view of the whole batch's logits, and a view pickles
        # with its whole storage (8 rows of a batch of 8 would ship the batch 8 times).
        return [x.to("cpu", copy=True) for x in logits] if self.rank == 0 else None

    def verify(self, feeds: list[Feed], rows: list[AcceptRow] | None = None) -> list[VerifyOutcome] | Exception | None:
        """The pass on every rank; on rank 0 (the one given ``rows``) acceptance too, on
        the full logits where the last all-gather left them: only the outcomes go back.
        A failure of acceptance comes back as the exception: every rank has finished the
        pass, so the group itself is sound and serves on."""
        logits = self.runner.forward(feeds)
        if rows is None:
            return None
        try:
            return accept(rows, logits)
        except Exception as error:
            return error

    def release(self, sessions: list[str]) -> None:
        self.runner.release(sessions)

    def prefill(self, key: int, session: str, tokens: list[int], reserve: int = 0) -> None:
        """A new session from this rank's shards of shared prefix blocks (staged under
        ``key``, fetched here), the rest computed with the other ranks."""
        (refs,) = self.staged.pop(key)
        self.runner.prefill(session, tokens, ray.get(refs) if refs else [], reserve)

    def publish_blocks(self, key: int, session: str, first: int, size: int) -> int:
        """Send this rank's shards of blocks ``first``.. (names and the store staged
        under ``key``) to the session store."""
        names, store = self.staged.pop(key)
        blocks = []
        for k, _ in enumerate(names, start=first):
            chunk = self.runner.export(session, k * size, (k + 1) * size)
            if chunk is None:
                break
            blocks.append(chunk)
        if blocks:
            # Waited for: the arguments are this rank's objects, lost if it died first.
            ray.get(store.publish_prefix.remote(names[: len(blocks)], blocks))
        # Rank 0 answers once every rank has published (each holds the same positions,
        # so the same count).
        torch.distributed.barrier(group=self.commands)
        return len(blocks)

    def cached_positions(self) -> int:
        return self.runner.cached_positions()

    def ping(self) -> bool:
        return True


class RankFailed(RuntimeError):
    """A rank of the group died or stopped answering: the group serves nothing more."""


class TensorParallelTarget:
    """The replica's handle on its ranks; a drop-in for ``TargetRunner``. It calls rank
    0 alone, which leads the others (``TargetRank.lead``)."""

    def __init__(self, size: int, path: str, device: str, dtype: str, trust_remote_code: bool,
                 rank_cpus: float, threads: int, group=None, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES):
        """``group``: the placement group whose bundles 1..size take the ranks; by
        default the calling replica's own."""
        group = group or get_current_placement_group()
        if group is None:
            raise RuntimeError("tensor_parallel_size > 1 needs the replica's placement group (see app/builder.py)")
        options = dict(num_cpus=rank_cpus, num_gpus=1 if device == "cuda" else 0)
        self.ranks = [
            ray.remote(concurrency_groups={"follow": 1})(TargetRank).options(
                **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=1 + r),
            ).remote(r, size, threads)
            for r in range(size)
        ]
        self.failed: str | None = None
        master = ray.get(self.ranks[0].master_address.remote())
        self._gather([r.setup.remote(master, path, device, dtype, trust_remote_code, kv_cache_bytes)
                      for r in self.ranks])
        self.following = [r.follow.remote() for r in self.ranks[1:]]  # ready only if a rank exits or dies
        self.keys = itertools.count()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # logits arrive here on the CPU

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """The full logits, on this (the replica's) host."""
        return self._lead("forward", feeds)

    def verify(self, feeds: list[Feed], rows: list[AcceptRow]) -> list[VerifyOutcome]:
        """The pass, and its acceptance on rank 0 (core/verifier.py ``accept``)."""
        result = self._lead("verify", feeds, own=(rows,))
        if isinstance(result, Exception):
            raise result
        return result

    def prefill(self, session: str, tokens: list[int], cached: list, reserve: int = 0) -> None:
        """``cached``: ShardedBlocks (a ref per rank) of a shared prefix of ``tokens``."""
        key = self._stage([([block.refs[r] for block in cached],) for r in range(len(self.ranks))])
        self._lead("prefill", key, session, tokens, reserve)

    def publish_blocks(self, session: str, names_per_rank: list[list[str]], first: int, size: int, store) -> int:
        """Every rank publishes its shards of blocks ``first``..; how many rank 0 did
        (every rank holds the same positions)."""
        key = self._stage([(names, store) for names in names_per_rank])
        return self._lead("publish_blocks", key, session, first, size)

    def release(self, sessions: list[str]) -> None:
        if not self.failed:  # not waited for: ordered after every earlier command
            self.ranks[0].lead.remote("release", sessions)

    def cached_positions(self) -> int:
        return self._gather([self.ranks[0].cached_positions.remote()])[0]

    def control_round_trip(self) -> None:
        """A command through every rank that computes nothing: the group's control path
        alone (the call to rank 0 and its broadcast), what a pass costs beyond the model."""
        self._lead("ping")

    def _lead(self, op: str, *args, own: tuple = ()):
        return self._gather([self.ranks[0].lead.remote(op, *args, own=own)])[0]

    def _stage(self, per_rank: list[tuple]) -> int:
        """Each rank's own arguments of the next command, delivered before it."""
        key = next(self.keys)
        self._gather([rank.stage.remote(key, args) for rank, args in zip(self.ranks, per_rank)])
        return key

    def check(self) -> None:
        """Raise if the group is broken (Serve's health check calls this)."""
        if not self.failed:
            self._gather([r.ping.remote() for r in self.ranks], timeout=30)
        if self.failed:
            raise RankFailed(self.failed)

    def _gather(self, refs: list, timeout: float | None = None) -> list:
        """Results of one call on every rank; the first failure kills the group
        rather than leave the other ranks blocked in a collective."""
        if self.failed:
            raise RankFailed(self.failed)
        pending, refused = list(refs), None
        watched = getattr(self, "following", [])
        while pending:
            ready, _ = ray.wait(pending + watched, num_returns=1, timeout=timeout)
            if not ready:
                self._fail(f"a tensor-parallel rank did not answer within {timeout} s")
            if ready[0] in watched:  # a follower left its loop: it died, or failed a command
                try:
                    ray.get(ready[0])
                    reason = "a tensor-parallel rank stopped following"
                except Exception as error:
                    reason = f"a tensor-parallel rank failed: {type(error).__name__}: {error}"
                self._fail(reason)
            pending.remove(ready[0])
            try:
                ray.get(ready[0])
            except RayTaskError as error:
                if not isinstance(error.cause, PoolExhausted):
                    self._fail(f"a tensor-parallel rank failed: {type(error).__name__}: {error}")
                refused = error.cause  # every rank refuses alike, before any collective
            except Exception as error:
                self._fail(f"a tensor-parallel rank failed: {type(error).__name__}: {error}")
        if refused is not None:
            raise refused
        return ray.get(refs)

    def _fail(self, reason: str) -> None:
        self.failed = reason
        self.shutdown()
        raise RankFailed(reason)

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r, no_restart=True)
