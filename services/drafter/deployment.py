"""Serve shim for draft workers: loads the proposers and serves ``DrafterService`` on
its own gRPC port, which verifiers reach directly once Serve has picked the replica."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import ray
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig

from ..app.args import AppArgs
from ..app.autoscaling import DRAFT_SESSIONS
from ..core.kv_pool import BLOCK_TOKENS
from ..models.eagle_away import load_eagle_away
from ..models.loading import check_pair, load_config, load_model, load_tokenizer
from ..rpc import internal_pb2_grpc
from ..rpc.auth import TOKEN_ENV, TokenInterceptor, internal_token
from ..rpc.channels import SERVER_OPTIONS
from ..state.client import PrefixSharing, replica_state_client
from ..telemetry import tracing
from ..telemetry.metrics import watch_kv_pool
from .routing import STATS_PERIOD_S, LeastLoadedDrafter
from .service import DrafterService, make_proposers

log = logging.getLogger(__name__)


@serve.deployment(name="drafter", request_router_config=RequestRouterConfig(
    # Serve sees no load here (sessions live on the side stream): route on the load
    # each worker reports (drafter/routing.py).
    request_router_class=LeastLoadedDrafter, request_routing_stats_period_s=STATS_PERIOD_S))
class DraftWorker:
    async def __init__(self, args: dict):
        cfg = AppArgs.model_validate(args)
        tracing.setup_tracing("outrider-drafter", serve_replica=True)  # OTEL_* / OUTRIDER_TRACES_FILE
        torch.set_num_threads(cfg.drafter.torch_threads)
        paths = cfg.paths
        draft = load_model(paths.draft, cfg.device, cfg.dtype, cfg.trust_remote_code, lean=True)
        check_pair(
            load_config(paths.target, cfg.trust_remote_code), draft.config,
            load_tokenizer(paths.target, cfg.trust_remote_code), load_tokenizer(paths.draft, cfg.trust_remote_code),
        )
        state = replica_state_client(cfg)
        prefixes = None
        if state is not None:
            prefixes = PrefixSharing(state, cfg.prefix_block_tokens, f"draft|{paths.draft}|{cfg.dtype}|{draft.dtype}")
        eagle = None
        if cfg.eagle.placement == "drafter" and cfg.head_methods()["eagle"] is None:
            # EAGLE drafts here, from the features its verifier sends (core/eagle_relay.py).
            eagle = load_eagle_away(paths.eagle, paths.target, cfg.device, cfg.dtype, cfg.trust_remote_code)
        proposers, steps = make_proposers(draft, cfg.confidence_stop, cfg.max_batch_size, eagle,
                                          cfg.draft_kv_cache_bytes)
        self.service = DrafterService(proposers, max_sessions=cfg.session_limits()["drafter"], state=state,
                                      chunk_tokens=cfg.draft_chunk_tokens, prefixes=prefixes, steps=steps,
                                      measured_fanout=cfg.fanout_policy == "measured")
        pool, context = proposers["draft"].pool, serve.get_replica_context()
        watch_kv_pool(lambda: (pool.used_blocks * BLOCK_TOKENS, pool.capacity_tokens), context.app_name,
                      context.replica_id.unique_id, "draft")
        self.port = cfg.drafter_port
        self.server: grpc.aio.Server | None = None
        self.starting = asyncio.Lock()
        await self._warm(state)

    async def _warm(self, state) -> None:
        """What a fresh replica's first stream would otherwise wait for, done before
        Serve routes to it: its gRPC server, and its first call to the session store
        (the actor's address resolved, a connection opened). Measured on a cold
        two-replica cluster, the first stream reached its worker 1.3 s after the
        request began and then waited over 0.5 s on the store."""
        await self.endpoint()
        if state is not None:
            await state.store.usage.remote()

    async def endpoint(self) -> str:
        """host:port of this replica's Drafter service (started on first use, on the
        replica's event loop), bound to the node's address only."""
        host = ray.util.get_node_ip_address()
        host = f"[{host}]" if ":" in host else host  # an IPv6 node
        async with self.starting:
            if self.server is None:
                token = internal_token()
                if token is None:
                    log.warning("%s is not set: the Drafter service on %s accepts any stream", TOKEN_ENV, host)
                server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[TokenInterceptor(token)] if token else [])
                internal_pb2_grpc.add_DrafterServicer_to_server(self.service, server)
                self.port = server.add_insecure_port(f"{host}:{self.port}")
                await server.start()
                self.server = server
        return f"{host}:{self.port}"

    async def drop_streams(self) -> int:
        """Chaos (`outrider soak --chaos`): close every open Draft stream at once, as a
        network fault would, then listen again on the same port. Verifiers must carry
        on (reconnect, or verify without drafts). Returns how many sessions were open."""
        async with self.starting:
            if self.server is None:
                return 0
            dropped = self.service.active_sessions
            await self.server.stop(grace=None)
            self.server = None
        await self.endpoint()
        return dropped

    def active_sessions(self) -> int:
        return self.service.active_sessions

    def record_routing_stats(self) -> dict[str, float]:
        """What LeastLoadedDrafter ranks workers by, polled by Serve's controller; with
        when it was measured, so a router adds the sessions it sent since."""
        return {**self.service.load(), "reported_at": time.time()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Draft sessions open here: what the drafter deployment scales on (app/autoscaling.py)."""
        return {DRAFT_SESSIONS: float(self.service.active_sessions)}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
