"""``outrider bench --tracing``: what tracing costs in tokens/s.

The in-process loopback (the verifier and drafter services over loopback gRPC, the
code the Serve deployments wrap; a request span stands in for the gateway's) decodes
the same prompts with tracing off, on, and off again, interleaved over passes. "On" is
every span of every request (parent-based trace-id ratio sampling at 1.0) through the
SDK's ``BatchSpanProcessor`` to an exporter that encodes each batch to OTLP protobuf,
as the OTLP exporter does before sending, then drops it: all the work of tracing in
the traced process except the network write. Ratios are taken within a pass (the
machine's speed drifts between passes); "off again" against "off" is the noise floor.

Besides wall-clock tokens/s, each run's CPU seconds per token (every thread of the
process, the exporter's included) are compared: on a shared machine they move far less
with the other load than the wall clock does. And the tracing calls of one pipelined
round (verifier and draft worker, the export included) are timed alone, off and on,
against the measured time of a round: off runs the same code with the no-op tracer.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

from ..telemetry import tracing
from .concurrent import run_local
from .runs import Run


class EncodingDropExporter(SpanExporter):
    """Does the OTLP exporter's CPU work (protobuf encoding), then drops the bytes."""

    def __init__(self):
        self.spans = 0
        self.bytes = 0

    def export(self, spans) -> SpanExportResult:
        self.bytes += len(encode_spans(spans).SerializeToString())
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def traced_provider(exporter: SpanExporter) -> TracerProvider:
    """Every span sampled (parentbased_traceidratio at 1.0), exported in batches."""
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(1.0), resource=Resource.create({"service.name": "outrider-bench"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def round_tracing_cost_s(provider: TracerProvider | None, repeat: int = 2000) -> float:
    """CPU seconds per round of the tracing a pipelined round does, with tracing off
    (``provider`` None) or on: the verifier's round span with its outcome and event,
    the context sent with the outcome, the batcher's verify span, and the draft
    worker's context extraction and spans for a fresh and an early block, with their
    wrappers; on, also the batch processor's export (flushed inside the timing)."""
    import torch

    from ..core.engine import RoundResult
    from ..core.pipeline import DraftBlock
    from ..core.proposals import Proposal
    from ..drafter.service import DrafterService, _drafted
    from ..rpc import internal_pb2
    from ..verifier import batcher
    from ..verifier.round_spans import record_round, round_span

    req = internal_pb2.VerifyRequest(request_id="0" * 32, session_id="1" * 32)
    block = DraftBlock(0, Proposal(tokens=torch.arange(4)), False, None, 0.004)
    early = DraftBlock(1, Proposal(tokens=torch.arange(4)), True, 7, 0.004)
    result = RoundResult(tokens=[0, 1, 2, 3, 7], num_accepted=4)

    async def rounds(n: int) -> float:
        done = asyncio.get_running_loop().create_future()
        done.set_result(early)
        root = tracing.start_span("outrider.generate")
        request_ctx = tracing.extract(*tracing.inject(root))
        t0 = time.process_time()
        span = round_span(req, 0, request_ctx)
        for k in range(n):
            # verifier: the pass's verify span, the round's outcome, the next round's span
            job = batcher._Job(None, done, proposal=block.proposal, span=span if span.is_recording() else None)
            if job.span is not None:
                batcher._verify_spans([job], time.time_ns(), time.time_ns(), [result])
            if span.is_recording():
                record_round(span, block, result, early, True, True)
            span.end()
            span = round_span(req, k + 1, request_ctx)
            traceparent, tracestate = tracing.inject(span)
            # draft worker: the outcome's context, the fresh and the early block's spans
            round_ctx = tracing.extract(traceparent, tracestate)
            await _drafted(DrafterService._draft_span(round_ctx, req.session_id, k + 1, False), done)
            await _drafted(DrafterService._draft_span(round_ctx, req.session_id, k + 2, True), done)
            if provider is not None and k % 100 == 99:
                provider.force_flush()  # every span exported: none dropped from a full queue
        span.end()
        if provider is not None:
            provider.force_flush()
        seconds = (time.process_time() - t0) / n
        root.end()
        return seconds

    tracing.use_provider(provider)
    try:
        return min(asyncio.run(rounds(repeat)) for _ in range(3))
    finally:
        tracing.use_provider(None)


def run_tracing_overhead(pair, prompts: list[list[int]], max_new: int, method: str, gamma: int, repeat: int,
                         on_run=None) -> dict:
    exporter = EncodingDropExporter()
    provider = traced_provider(exporter)
    configs = [("off", None), ("on", provider), ("off again", None)]

    def measure(provider) -> Run:
        tracing.use_provider(provider)
        cpu = time.process_time()
        try:
            run = run_local(pair, method, gamma, prompts, max_new, 1, True)
            if provider is not None:
                provider.force_flush()  # the export is part of the cost
            run.cpu_seconds = time.process_time() - cpu  # every thread of this process
            return run
        finally:
            tracing.use_provider(None)

    for _, p in configs[:2]:  # warm-up: both paths once
        tracing.use_provider(p)
        run_local(pair, method, gamma, prompts[:1], 8, 1, True)
    tracing.use_provider(None)
    provider.force_flush()
    warm_spans = exporter.spans

    passes: list[dict[str, Run]] = []
    for n in range(repeat):
        runs = {}
        for name, p in configs[n % 3:] + configs[: n % 3]:  # each config in each position in turn
            runs[name] = measure(p)
            if on_run:
                on_run(n, name, runs[name])
        passes.append(runs)
    provider.shutdown()
    spans = exporter.spans - warm_spans

    def ratios(name: str, key) -> list[float]:
        return [key(r[name]) / key(r["off"]) for r in passes]

    tokens_per_s = lambda run: run.tokens_per_s  # noqa: E731
    cpu_per_token = lambda run: run.cpu_seconds / run.tokens  # noqa: E731
    off_outputs = passes[0]["off"].outputs
    rounds = sum(r["on"].stats.rounds for r in passes)
    seconds_per_round = statistics.median(r["off"].seconds / r["off"].stats.rounds for r in passes)
    off_s, on_s = round_tracing_cost_s(None), round_tracing_cost_s(traced_provider(EncodingDropExporter()))
    summary = {
        "method": method, "gamma": gamma, "prompts": len(prompts), "max_new_tokens": max_new, "passes": repeat,
        "tokens_per_s": {name: statistics.median(tokens_per_s(r[name]) for r in passes) for name, _ in configs},
        # wall clock: what a client sees, and what the machine's other load moves most
        "on_over_off_tokens_per_s": ratios("on", tokens_per_s),
        "off_again_over_off_tokens_per_s": ratios("off again", tokens_per_s),
        # CPU seconds of this process per token (all threads, the span exporter's too)
        "on_over_off_cpu_per_token": ratios("on", cpu_per_token),
        "off_again_over_off_cpu_per_token": ratios("off again", cpu_per_token),
        "spans_exported_when_on": spans,
        "spans_per_round_when_on": spans / rounds if rounds else 0.0,
        "otlp_bytes_per_span": exporter.bytes / exporter.spans if exporter.spans else 0.0,
        "seconds_per_round": seconds_per_round,
        # the tracing calls of one pipelined round, timed alone (CPU seconds)
        "round_tracing_s_off": off_s,
        "round_tracing_s_on": on_s,
        "round_tracing_share_off": off_s / seconds_per_round,
        "round_tracing_share_on": on_s / seconds_per_round,
        "outputs_identical": all(run.outputs == off_outputs for r in passes for run in r.values()),
    }
    for key in ("on_over_off_tokens_per_s", "off_again_over_off_tokens_per_s", "on_over_off_cpu_per_token",
                "off_again_over_off_cpu_per_token"):
        summary[key + "_median"] = statistics.median(summary[key])
    return summary
