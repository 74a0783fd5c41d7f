"""A tensor-parallel target: N Ray actors, one shard each, driven by the verifier replica.

Placement: the ranks are scheduled into the replica's own placement group (the
builder asks Serve for one bundle for the replica plus one per rank, STRICT_PACK), so
they sit on the replica's node, one GPU each on GPU nodes, and live and die with it.
Each rank joins one torch.distributed group (NCCL on GPU, gloo on CPU) and loads its
shard with transformers' ``tp_plan="auto"``; it keeps its head-shard of every
session's KV in its own ``TargetRunner``. Per pass the replica sends every rank the
same feeds (token ids only) and gets the logits back from rank 0: the all-reduces
inside the layers leave every rank with the full logits.

Shared prefixes: each rank restores and publishes its own head-shards of prefix
blocks straight from and to the session store (a name per rank and group size); the
replica only looks up which blocks all ranks have.

Failure: if a rank dies, the others would wait in a collective until the group's
timeout. The replica sees the dead rank's call fail, kills the whole group so nothing
hangs, and from then on fails its health check, so Serve replaces the replica (and
with it the group); the sessions it held continue elsewhere from their committed
tokens (the gateway retries them).
"""

from __future__ import annotations

import datetime
import os
import socket

import ray
import torch
from ray.exceptions import RayTaskError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..core.errors import PoolExhausted
from ..core.target import DEFAULT_KV_CACHE_BYTES, Feed, TargetRunner

GROUP_TIMEOUT = datetime.timedelta(seconds=120)  # a collective never waits longer than this


class TargetRank:
    """One rank: a shard of the target and its share of every session's KV."""

    def __init__(self, rank: int, world_size: int, threads: int):
        torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.runner: TargetRunner | None = None

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
        model = load_model(path, device, dtype, trust_remote_code, tensor_parallel=True)
        # Every rank's pool has the same blocks and sees the same feeds in the same order,
        # so all ranks admit or refuse (PoolExhausted) a pass alike, before any collective.
        self.runner = TargetRunner(model, kv_cache_bytes, tp_size=self.world_size)

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor] | None:
        logits = self.runner.forward(feeds)
        return [x.cpu() for x in logits] if self.rank == 0 else None

    def release(self, sessions: list[str]) -> None:
        self.runner.release(sessions)

    def prefill(self, session: str, tokens: list[int], refs: list, reserve: int = 0) -> None:
        """A new session from this rank's shards of shared prefix blocks (``refs``,
        fetched here), the rest computed with the other ranks."""
        self.runner.prefill(session, tokens, ray.get(refs) if refs else [], reserve)

    def publish_blocks(self, session: str, names: list[str], first: int, size: int, store) -> int:
        """Send this rank's shards of blocks ``first``.. to the session store."""
        blocks = []
        for k, _ in enumerate(names, start=first):
            chunk = self.runner.export(session, k * size, (k + 1) * size)
            if chunk is None:
                break
            blocks.append(chunk)
        if blocks:
            # Waited for: the arguments are this rank's objects, lost if it died first.
            ray.get(store.publish_prefix.remote(names[: len(blocks)], blocks))
        return len(blocks)

    def cached_positions(self) -> int:
        return self.runner.cached_positions()

    def ping(self) -> bool:
        return True


class RankFailed(RuntimeError):
    """A rank of the group died or stopped answering: the group serves nothing more."""


class TensorParallelTarget:
    """The replica's handle on its ranks; a drop-in for ``TargetRunner``."""

    def __init__(self, size: int, path: str, device: str, dtype: str, trust_remote_code: bool,
                 rank_cpus: float, threads: int, group=None, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES):
        """``group``: the placement group whose bundles 1..size take the ranks; by
        default the calling replica's own."""
        group = group or get_current_placement_group()
        if group is None:
            raise RuntimeError("tensor_parallel_size > 1 needs the replica's placement group (see app/builder.py)")
        options = dict(num_cpus=rank_cpus, num_gpus=1 if device == "cuda" else 0)
        self.ranks = [
            ray.remote(TargetRank).options(
                **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=1 + r),
            ).remote(r, size, threads)
            for r in range(size)
        ]
        self.failed: str | None = None
        master = ray.get(self.ranks[0].master_address.remote())
        self._gather([r.setup.remote(master, path, device, dtype, trust_remote_code, kv_cache_bytes)
                      for r in self.ranks])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # logits arrive here on the CPU

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        return self._gather([r.forward.remote(feeds) for r in self.ranks])[0]

    def prefill(self, session: str, tokens: list[int], cached: list, reserve: int = 0) -> None:
        """``cached``: ShardedBlocks (a ref per rank) of a shared prefix of ``tokens``."""
        self._gather([rank.prefill.remote(session, tokens, [block.refs[r] for block in cached], reserve)
                      for r, rank in enumerate(self.ranks)])

    def publish_blocks(self, session: str, names_per_rank: list[list[str]], first: int, size: int, store) -> int:
        """Every rank publishes its shards of blocks ``first``..; how many all did."""
        counts = self._gather([rank.publish_blocks.remote(session, names, first, size, store)
                               for rank, names in zip(self.ranks, names_per_rank)])
        return min(counts)

    def release(self, sessions: list[str]) -> None:
        if not self.failed:
            for r in self.ranks:  # ordered after every earlier forward on each rank
                r.release.remote(sessions)

    def cached_positions(self) -> int:
        return self._gather([self.ranks[0].cached_positions.remote()])[0]

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
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                self._fail(f"a tensor-parallel rank did not answer within {timeout} s")
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
