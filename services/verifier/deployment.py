"""Serve shim for the target verifier: loads the target and runs ``VerifierService``
sessions; the gateway calls ``Verify`` through a Serve handle (one call per request)."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator

import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..app.args import AppArgs
from ..core.engine import SpeculativeEngine
from ..core.errors import InvalidRequest
from ..core.verifier import TargetVerifier
from ..core.kv_pool import BLOCK_TOKENS
from ..core.target import TargetRunner
from ..models.loading import context_length, load_config, load_model, load_tokenizer
from ..models.pair import Planners, eagle_relay, head_proposer, load_pair_heads
from ..rpc import internal_pb2
from ..state.client import AttemptWatch, PrefixSharing, ShardedPrefixSharing, replica_state_client
from ..telemetry import tracing
from ..telemetry.metrics import watch_goodput, watch_kv_pool
from .service import VerifierService
from .tensor_parallel import TensorParallelTarget


@serve.deployment(name="verifier", health_check_period_s=5)
class Verifier:
    async def __init__(self, drafter: DeploymentHandle, args: dict):
        cfg = AppArgs.model_validate(args)
        tracing.setup_tracing("outrider-verifier", serve_replica=True)  # OTEL_* / OUTRIDER_TRACES_FILE
        torch.set_num_threads(cfg.verifier.torch_threads)
        paths = cfg.paths
        tokenizer = load_tokenizer(paths.target, cfg.trust_remote_code)
        if cfg.tensor_parallel_size > 1:
            runner = TensorParallelTarget(
                cfg.tensor_parallel_size, paths.target, cfg.device, cfg.dtype, cfg.trust_remote_code,
                cfg.verifier_rank.num_cpus, cfg.verifier_rank.torch_threads, kv_cache_bytes=cfg.kv_cache_bytes,
            )
        else:
            runner = TargetRunner(load_model(paths.target, cfg.device, cfg.dtype, cfg.trust_remote_code, lean=True),
                                  cfg.kv_cache_bytes)
        engine = SpeculativeEngine(
            verifier=TargetVerifier(runner), proposer=None,
            eos_token_id=tokenizer.eos_token_id, max_context=context_length(load_config(paths.target, cfg.trust_remote_code)),
        )
        self.runner = runner
        self.drafter = drafter
        state = replica_state_client(cfg)
        self.attempts = AttemptWatch(state.store) if state is not None else None
        prefixes = None
        if state is not None:
            salt = f"target|{paths.target}|{cfg.device}|{cfg.dtype}"
            if isinstance(runner, TensorParallelTarget):  # the ranks move their own shards
                prefixes = ShardedPrefixSharing(state, cfg.prefix_block_tokens, salt, cfg.tensor_parallel_size)
            else:
                prefixes = PrefixSharing(state, cfg.prefix_block_tokens, f"{salt}|{runner.model.dtype}")
        context = serve.get_replica_context()
        replica = context.replica_id.unique_id
        heads = {kind: load_pair_heads(paths, kind, runner.model) for kind, why in cfg.head_methods().items()
                 if why is None}
        relay = None
        if "eagle" in heads and cfg.eagle.placement == "drafter":  # drafted on the draft workers: keep only fc
            relay = eagle_relay(heads.pop("eagle"), cfg.eagle.feature_window)
        planners = Planners(runner.model) if isinstance(runner, TargetRunner) else None
        head_proposer = _heads_proposer(heads, planners) if heads else None
        self.service = VerifierService(engine, self._find_drafter, cfg.max_batch_size, prefixes=prefixes, name=replica,
                                       load_aware_gamma=cfg.gamma_policy == "measured",
                                       head_proposer=head_proposer, tokenizer=tokenizer, eagle_relay=relay,
                                       feature_dtype=cfg.eagle.feature_dtype)
        if self.service.controller is not None:
            watch_goodput(self.service.controller, context.app_name, replica)
        if isinstance(runner, TargetRunner):  # a tensor-parallel group's pools live on its ranks
            pool = runner.pool
            watch_kv_pool(lambda: (pool.used_blocks * BLOCK_TOKENS, pool.capacity_tokens), context.app_name, replica)
        if state is not None:  # its first call (the actor's address resolved), not the first prefill's
            await state.store.usage.remote()
        # The handle's first call waits for Serve to list the draft workers: made now, in
        # the background (a worker may still be starting), not by the first session.
        self.warming = asyncio.ensure_future(self._find_drafter())
        self.warming.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def check_health(self) -> None:
        """Serve replaces the replica when this raises: a tensor-parallel group with a
        dead rank can serve nothing."""
        if isinstance(self.runner, TensorParallelTarget):
            await asyncio.to_thread(self.runner.check)

    async def _find_drafter(self) -> str:
        # Serve picks the draft replica (load-aware); the session then talks to it directly.
        return await self.drafter.endpoint.remote()

    async def Verify(self, request: bytes) -> AsyncIterator[bytes]:
        req = internal_pb2.VerifyRequest.FromString(request)
        watched = self.attempts is not None and bool(req.attempt_id)
        if watched:  # cancelled here if the gateway ends the attempt first (AttemptWatch)
            self.attempts.watch(req.attempt_id)
        try:
            async with aclosing(self.service.verify(req)) as chunks:  # see Gateway.Generate
                async for chunk in chunks:
                    if watched and chunk.HasField("stats"):  # the gateway ends the attempt on these
                        self.attempts.done(req.attempt_id)
                    yield chunk.SerializeToString()
        finally:
            if watched:
                self.attempts.done(req.attempt_id)

    def active_sessions(self) -> int:
        return self.service.active_sessions

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _heads_proposer(heads: dict, planners: Planners | None):
    """The verifier's head proposer: one per request, for the method and tree it asks
    for; a tree planned from measurement ("auto") shares the replica's planner."""

    def proposer(method: str, tree: str):
        if method not in heads:
            raise InvalidRequest(f"this verifier serves {', '.join(k.upper() for k in heads)}, not {method.upper()}")
        return head_proposer(heads[method], tree, None if planners is None else planners(heads[method]))

    return proposer
