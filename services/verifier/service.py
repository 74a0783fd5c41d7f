"""The verifier's session loop: one ``Verify`` call per request. Knows nothing of Serve.

A session drives its rounds from here, so that the per-round hop is verifier <->
draft worker over one gRPC bidi stream and nothing else: the gateway only receives the
committed tokens as they come. With pipelining, the worker drafts round k+1 while this
side verifies round k (see core/pipeline.py).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

import grpc

from ..core.eagle_relay import EagleFeatureRelay
from ..core.engine import RoundResult, SequenceState, SpeculativeEngine
from ..core.gamma import GammaSchedule
from ..core.goodput import GoodputController, SessionControl
from ..core.multi_draft import TreeProposer, lookup_budget, tree_members
from ..core.pipeline import DraftBlock, pipeline_hit
from ..core.errors import InvalidRequest
from ..core.proposals import Proposal
from ..core.proposers import NgramProposer, Proposer
from ..core.suffix import SuffixProposer
from ..rpc import internal_pb2, internal_pb2_grpc
from ..rpc.auth import auth_metadata
from ..rpc.channels import CHANNEL_OPTIONS
from ..models.detokenizer import StopScanner
from ..rpc.convert import METHODS, MODEL_FREE, ON_VERIFIER, feature_pieces, sampling_from_proto, stats_to_proto, top_logprobs_to_proto
from ..state.client import PrefixSharing, ShardedPrefixSharing
from ..telemetry import tracing
from .batcher import RoundBatcher
from .draft_link import OPEN_S, DraftLink, NoOtherWorker, draft_open
from .round_spans import record_round, round_span


class VerifierService:
    def __init__(self, engine: SpeculativeEngine, find_drafter: Callable[[], Awaitable[str]],
                 max_batch_size: int = 16, load_aware_gamma: bool = True, prefixes: PrefixSharing | ShardedPrefixSharing | None = None,
                 name: str = "", head_proposer: Callable[[str, str], Proposer] | None = None, tokenizer=None,
                 eagle_relay: Callable[[str], EagleFeatureRelay] | None = None, feature_dtype: str = "bfloat16",
                 wait_first_block: bool = False):
        """``head_proposer(method, tree)``: a proposer for a request drafted by heads on
        this replica (MEDUSA, MTP), raising InvalidRequest for one it cannot serve.
        ``tokenizer``: the target's, for requests with stop strings. ``eagle_relay(tree)``:
        EAGLE is drafted on the draft workers from the features this replica fuses and
        sends them in ``feature_dtype`` (core/eagle_relay.py); None: on this replica.
        ``wait_first_block``: a session waits for its worker's first block instead of
        decoding without drafts meanwhile (a measurement of the pair, not of serving)."""
        self.engine = engine
        self.tokenizer = tokenizer
        # Lookups need no model: drafted here, in microseconds, with no hop. One suffix
        # index per replica, over the outputs of all its sessions.
        self.model_free: dict[str, Proposer] = {
            "ngram": NgramProposer(device=engine.verifier.device),
            "suffix": SuffixProposer(device=engine.verifier.device),
        }
        self.head_proposer = head_proposer
        self.eagle_relay, self.feature_dtype, self.wait_first_block = eagle_relay, feature_dtype, wait_first_block
        self.find_drafter = find_drafter
        self.device = engine.verifier.device
        self.max_batch_size = max_batch_size
        self.prefixes = prefixes
        self.name = name  # reported in each request's stats
        # Each session's gamma, down to none, chosen for the replica's goodput from its
        # own measured passes and the session's acceptance (core/goodput.py).
        self.controller = GoodputController(max_batch_size) if load_aware_gamma else None
        # Concurrent sessions' rounds are verified together in one forward pass.
        self.batcher = RoundBatcher(engine, max_batch_size, self.controller, sessions=lambda: self.active_sessions)
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.active_sessions = 0

    async def verify(self, req: internal_pb2.VerifyRequest) -> AsyncIterator[internal_pb2.VerifyChunk]:
        params = sampling_from_proto(req.sampling, req.stop if req.HasField("stop") else None, req.prompt_len,
                                     req.coupled)
        spec = req.speculation
        method = METHODS[spec.method]
        proposer = None
        relayed = method == "eagle" and self.eagle_relay is not None  # drafted on a draft worker
        if method in MODEL_FREE:
            proposer = self.model_free[method]
        elif method == "tree":  # the worker's draft chain (if a member) merged with lookups drafted here
            members = tree_members(spec.tree)
            proposer = TreeProposer([self._tree_member(m) for m in members if m != "draft"], device=self.device,
                                    drafted_elsewhere=members[0] == "draft")
        elif relayed:
            proposer = self.eagle_relay(spec.tree)
        elif method in ON_VERIFIER:
            if self.head_proposer is None:
                raise InvalidRequest(f"this verifier has no heads for {method.upper()}")
            proposer = self.head_proposer(method, spec.tree)
        schedule = GammaSchedule(initial=spec.gamma, adaptive=spec.adaptive)
        seq = self.engine.start(list(req.prompt_ids), req.max_new_tokens, params, schedule, req.first_round, proposer,
                                logprobs=req.logprobs if req.HasField("logprobs") else None)
        if req.stop.sequences:
            if self.tokenizer is None:
                raise InvalidRequest("this verifier has no tokenizer for stop strings")
            seq.text_stop = StopScanner(self.tokenizer, tuple(req.stop.sequences), req.stop.min_tokens,
                                        earlier=seq.committed[seq.params.prompt_len :])
        seq.stats.queue_time_s += max(0.0, time.time() - req.received_at)
        # The request's span context crossed the Serve handle hop in the request; every
        # span of this session is in its trace.
        trace_ctx = tracing.extract(req.traceparent, req.tracestate)
        control = self._join(seq, method)
        self.active_sessions += 1
        try:
            local = (method == "none" or method in ON_VERIFIER and not relayed
                     or method == "tree" and not proposer.drafted_elsewhere)
            rounds = (self._local_rounds(seq, req, control, trace_ctx) if local
                      else self._speculative(seq, req, method, control, trace_ctx))
            # Closed explicitly, so a cancelled session cancels its draft stream at once.
            async with aclosing(rounds) as results:
                async for result in results:
                    chunk = internal_pb2.VerifyChunk(token_ids=result.tokens, next_gamma=seq.gamma)
                    if result.logprobs is not None:
                        chunk.logprobs.extend(result.logprobs)
                        if seq.logprobs:
                            chunk.top_logprobs.extend(top_logprobs_to_proto(result.top_logprobs))
                    yield chunk
            stopped = seq.stopped_by is not None or seq.text_stop is not None and seq.text_stop.matched is not None
            stats = stats_to_proto(seq.stats, "stop" if stopped else "length")
            if seq.stopped_by is not None:
                stats.stop_token_id = seq.stopped_by
            elif stopped:
                stats.stop_sequence = seq.text_stop.matched
            stats.verifier_replica = self.name
            yield internal_pb2.VerifyChunk(stats=stats)
        finally:
            self.batcher.release(seq)
            self.active_sessions -= 1
            if control is not None:
                self.controller.leave(control)

    def _join(self, seq: SequenceState, method: str) -> SessionControl | None:
        """The session's place in the goodput plan. A chain's gamma is the plan's (the
        request's is its ceiling; a seeded sampled request's too: it is coupled, so its
        tokens do not depend on gamma, VerifyRequest.coupled); a tree keeps its shape
        (counted in the plan at its node count), at both EAGLE placements too: planned,
        EAGLE's drafting was often cut or switched off (on the verifier 1.37-1.45x
        target-only served against 1.74x fixed; on the draft workers 1.60-1.66x, 3.34
        tokens a round, against 1.71-1.80x, 4.11, in three passes each). A TREE's worker
        chain is planned as the draft model's is."""
        if self.controller is None:
            return None
        if method == "none":  # in the passes' cost; never drafts, so not a load to measure the arms at
            return self.controller.join(0, fixed=True)
        if getattr(seq.proposer, "tree", None) is not None:  # a fixed shape of max_nodes nodes
            return self.controller.join(seq.proposer.max_nodes, fixed=True)
        control = self.controller.join(seq.gamma)
        seq.gamma_cap = self.controller.gamma(control)
        return control

    async def _prefill(self, seq: SequenceState, trace_ctx=None) -> None:
        """The prompt's target KV, from shared prefix blocks as far as they reach; the
        blocks computed here are published for every other replica. An EAGLE session
        computes its whole prompt: its drafter reads the target's features at every
        position, which cached KV does not hold (started from the uncached tail alone,
        it drafted so poorly that its drafting was switched off)."""
        span = tracing.start_span("outrider.prefill", trace_ctx)
        try:
            names, cached, found = [], [], 0
            if self.prefixes is not None:
                names, cached = await self.prefixes.lookup(seq.committed[:-1])
                found = len(cached)
                if getattr(seq.proposer, "reads_every_position", False):
                    cached = []
            seq.stats.cached_prefix_tokens = sum(len(chunk.tokens) for chunk in cached)
            if span.is_recording():
                span.set_attributes({
                    "outrider.prompt_tokens": len(seq.committed), "outrider.cached_prefix_tokens": seq.stats.cached_prefix_tokens,
                    # The shared prefix KV blocks this prompt starts from, read through the
                    # object store (or this replica's cache of what it read before).
                    "outrider.object_store_bytes": sum(chunk.nbytes for chunk in cached),
                })
            await self.batcher.run(seq, self.engine.prefill, seq, cached)
            if found < len(names):
                runner, session = self.engine.verifier.runner, seq.target_kv.session
                new = await self.batcher.run(None, self.prefixes.export, runner, session, names, found)
                self.prefixes.publish(names, found, new)
                if span.is_recording():
                    span.set_attribute("outrider.published_blocks", len(new))
        except Exception as error:
            tracing.record_error(span, error)
            raise
        finally:
            span.end()

    async def _local_rounds(self, seq: SequenceState, req, control, trace_ctx) -> AsyncIterator[RoundResult]:
        """Rounds with no draft hop: target-only, drafted here by a lookup (n-gram,
        suffix), or by heads from the hidden states of the pass before (the first
        round's from the prefill's)."""
        await self._prefill(seq, trace_ctx)
        round = req.first_round
        while not seq.finished:
            span = round_span(req, round, trace_ctx)
            try:
                t0 = time.perf_counter()
                proposal = await self.batcher.run(seq, self.engine.propose, seq) if seq.proposer else Proposal.empty(self.device)
                drafted_s = time.perf_counter() - t0  # on the compute thread: all of it exposed
                seq.stats.draft_time_s += drafted_s
                result = await self.batcher.verify(seq, proposal, span)
                first = round == req.first_round  # its draft read the prompt too: not a draft's price
                self._control(seq, control, proposal.depth, result.num_accepted, None if first else drafted_s,
                              None if first else 0.0)
                if span.is_recording():
                    span.set_attributes({"outrider.gamma": proposal.depth, "outrider.tree_nodes": len(proposal),
                                         "outrider.accepted": result.num_accepted, "outrider.committed": len(result.tokens)})
            finally:
                span.end()
            yield result
            round += 1

    async def _speculative(self, seq: SequenceState, req, method: str, control, trace_ctx=None) -> AsyncIterator[RoundResult]:
        pipeline = req.speculation.pipeline
        round = req.first_round  # a resumed stream numbers its rounds on
        link = DraftLink(lambda first, avoid: self._open_stream(seq, req, method, first, avoid, link.trace),
                         seq, self.device)
        # A round's span starts as the previous one ends, so the blocks drafted for it (and the
        # early one drafted while it verifies) are its children: the worker gets its context.
        span = round_span(req, round, trace_ctx)
        link.trace = tracing.inject(span)
        # The target's prefill overlaps finding a draft replica and drafting the first
        # round; an EAGLE drafter there needs the prompt's features from it first.
        prefill = asyncio.ensure_future(self._prefill(seq, trace_ctx))
        relayed = getattr(seq.proposer, "relays_features", False)
        # A session starting at gamma 0 opens no draft stream until drafting resumes (the open then
        # carries everything committed); EAGLE on a worker reads features from the first position.
        opened = None if seq.effective_gamma == 0 and not relayed else round  # the round the open drafts
        try:
            if relayed:
                await prefill
            if opened is not None:
                link.start(round)  # in the background: the session never waits for the open
            await prefill
            exposed, transport = seq.stats.exposed_draft_time_s, seq.stats.transport_time_s
            told = seq.effective_gamma  # the gamma the draft worker drafts with
            unreported: list[int] = []  # committed tokens the worker has not been told yet
            resumed = None  # the round drafted after a stretch at gamma 0
            # While the worker reads the context the session decodes without drafts (still_reading),
            # unless EAGLE on a worker (opened after the prefill, for its features), or wait_first_block.
            undrafted = opened is None or not (relayed or self.wait_first_block) and link.still_reading(round)
            block = DraftBlock.undrafted(round, self.device) if undrafted else await link.receive(round)
            while True:
                reading = link.reading is not None  # (a block waited for ends the reading)
                seq.stats.reading_rounds += reading
                if control is not None:
                    control.reading = reading  # its passes measure neither arm (GoodputController.observe_pass)
                proposal = await self._with_lookups(seq, block.proposal)
                result = await self.batcher.verify(seq, proposal, span)
                # Did the round commit the worker's own drafts (a TREE's path may leave them)?
                followed = proposal is block.proposal or (
                    result.num_accepted <= len(block.proposal)
                    and result.tokens[: result.num_accepted] == block.proposal.tokens[: result.num_accepted].tolist())
                # Its block read the whole context too (the first), or every token committed
                # while the session was stopped (a probe, a resume): not a draft's price.
                first = round == opened or round == resumed
                # The controller plans the worker's chain: a tree's lookups ride along, free to draft.
                self._control(seq, control, len(block.proposal), min(result.num_accepted, len(block.proposal)),
                              None if first else seq.stats.exposed_draft_time_s - exposed,
                              None if first else seq.stats.transport_time_s - transport)
                exposed, transport = seq.stats.exposed_draft_time_s, seq.stats.transport_time_s
                early = None
                full = result.num_accepted == len(block.proposal)
                # The worker drafts branches for this round's outcomes whenever it drafts
                # at all (told > 0): take the one for what happened if it is here already.
                pipelined = pipeline and told > 0 and not reading and not seq.finished
                if pipelined:
                    seq.stats.pipeline_rounds += 1
                    if followed:  # (else no branch drafted after the worker's drafts can be for what was committed)
                        early = link.take_branch(round + 1, result.num_accepted, result.tokens[-1])
                hit = pipelined and pipeline_hit(block.proposal, result.num_accepted, result.tokens[-1], early)
                if hit:
                    seq.stats.record_cache_hit(full)
                seq.stats.pipeline_hits += hit
                unreported += result.tokens
                if span.is_recording():
                    record_round(span, block, result, early, hit, pipelined, reading)
                span.end()
                span = tracing.INVALID_SPAN if seq.finished else round_span(req, round + 1, trace_ctx)
                link.trace = tracing.inject(span)
                # A worker told gamma 0 drafts nothing and waits: while drafting stays off it is told
                # nothing (no per-round message); it hears every token at once when drafting resumes.
                if opened is None and seq.effective_gamma > 0 and not seq.finished:
                    told, opened, unreported = seq.effective_gamma, round + 1, []
                    link.start(opened)
                elif link.reading is not None:
                    if not seq.finished and await link.catch_up(round, unreported, seq.effective_gamma):
                        told, opened, unreported = seq.effective_gamma, round + 1, []
                elif told > 0 or seq.effective_gamma > 0:
                    resumed = round + 1 if told == 0 else resumed
                    told = seq.effective_gamma
                    await link.report(round, unreported, hit, told, self._unsent_features(seq) if relayed else ())
                    unreported = []
                yield result
                if seq.finished:
                    return
                round += 1
                if hit:
                    block = early
                elif link.still_reading(round):
                    block = DraftBlock.undrafted(round, self.device)
                elif told > 0:
                    # The worker sends the branch it drafted for this outcome at once
                    # (from_cache), or drafts a fresh block.
                    block = await link.receive(round)
                    if block.from_cache:
                        seq.stats.record_cache_hit(full)
                        if span.is_recording():  # drafted for the outcome while it verified; sent once reported
                            span.add_event("draft.cache_hit", {"outrider.round": round,
                                                               "outrider.outcome": "full" if full else "partial"})
                else:  # no drafting at this load: a plain decoding step, no hop
                    block = DraftBlock.undrafted(round, self.device)
        except Exception as error:
            tracing.record_error(span, error)
            raise
        finally:
            span.end()  # a round left open by a cancelled or failed session
            link.close(seq.finished)

    def _tree_member(self, name: str) -> Proposer:
        """A TREE member drafted on this replica: a lookup, or heads it holds."""
        if name in self.model_free:
            return self.model_free[name]
        if self.head_proposer is None:
            raise InvalidRequest(f"this verifier has no heads for a tree with {name.upper()}")
        return self.head_proposer(name, "")

    async def _with_lookups(self, seq: SequenceState, drafted: Proposal) -> Proposal:
        """TREE: the worker's chain, first at every node, merged with what this replica
        drafts (lookups, heads; on the compute thread, in turn with the passes)."""
        if not isinstance(seq.proposer, TreeProposer):
            return drafted
        t0 = time.perf_counter()
        merged = await self.batcher.run(seq, seq.proposer.propose, seq.draft_state, seq.committed, len(drafted),
                                        seq.params, None, drafted, lookup_budget(seq.effective_gamma, seq.remaining))
        seq.stats.draft_time_s += time.perf_counter() - t0
        return merged

    def _control(self, seq: SequenceState, control: SessionControl | None, drafted: int, accepted: int,
                 exposed_s: float | None, transport_s: float | None) -> None:
        """Feed the round to the controller; the next round drafts what it plans, never
        more than the request's gamma schedule asks for."""
        if control is None:
            return
        self.controller.observe_round(control, drafted, accepted, exposed_s, transport_s)
        if not control.fixed:
            control.ceiling = seq.gamma
        seq.gamma_cap = self.controller.gamma(control)

    def _unsent_features(self, seq: SequenceState) -> list:
        unsent = seq.draft_state.take_unsent()
        return [] if unsent is None else feature_pieces(*unsent, self.feature_dtype)

    def _open_stream(self, seq: SequenceState, req, method: str, first_round: int, avoid: set[str],
                     trace=("", "")) -> Awaitable[tuple[str, object]]:
        """A Draft stream on a worker Serve picks (not one in ``avoid``), opened at
        ``seq``'s committed tokens as they are now (rounds may go on while it opens:
        DraftLink.start). ``trace``: the context of round ``first_round``'s span; the
        request's own context goes in the call's metadata (the worker's session span)."""
        opened = draft_open(seq, req, method, first_round, trace)
        features = []
        if getattr(seq.proposer, "relays_features", False):  # EAGLE: the committed text's features follow
            opened.tree = seq.proposer.tree.spec  # the budget the verifier planned for
            kept = seq.draft_state.snapshot()
            features = [] if kept is None else feature_pieces(*kept, self.feature_dtype)
            opened.feature_rows = sum(piece.rows for piece in features)
            seq.stats.feature_bytes += sum(piece.ByteSize() for piece in features)
        return self._send_open(req, opened, features, avoid)

    async def _send_open(self, req, opened, features: list, avoid: set[str]) -> tuple[str, object]:
        address = await self._find_drafter(avoid)
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        call = internal_pb2_grpc.DrafterStub(self.channels[address]).Draft(
            metadata=(tracing.grpc_metadata(req.traceparent, req.tracestate) or ()) + auth_metadata())
        try:
            await call.write(internal_pb2.DraftCommand(open=opened))
            for piece in features:
                await call.write(internal_pb2.DraftCommand(features=piece))
        except BaseException:
            call.cancel()
            raise
        return address, call

    async def _find_drafter(self, avoid: set[str]) -> str:
        if not avoid:
            return await self.find_drafter()
        # Serve does not know a frozen worker is frozen: it may pick it again, and a
        # call routed to it never returns. Ask a few times, briefly each.
        for _ in range(4):
            try:
                address = await asyncio.wait_for(self.find_drafter(), OPEN_S / 4)
            except TimeoutError:
                continue
            if address not in avoid:
                return address
        raise NoOtherWorker(f"Serve offers no draft worker but {sorted(avoid)}")
