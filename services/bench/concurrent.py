"""Concurrency scenarios: N streams at once, aggregate tokens/s.

In-process (``run_local``): the verifier and drafter services over loopback gRPC, the
same code the Serve deployments wrap, with the verifier batching concurrent rounds or
verifying each session on its own, so both are measured in one run. Through a server
(``run_server``): N client threads against the public gRPC API.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ..core.sampling import SamplingParams
from ..rpc.convert import stats_from_proto
from .loopback import Loopback
from .runs import Run


def _label(method: str, concurrency: int, batched: bool | None) -> str:
    base = "target-only" if method == "none" else f"outrider-{method}"
    mode = "" if batched is None else (" batched" if batched else " separate")
    return f"{base} x{concurrency}{mode}"


def run_local(pair, method: str, gamma: int | None, prompts: list[list[int]], max_new: int,
              concurrency: int, batched: bool) -> Run:
    run = Run(method=_label(method, concurrency, batched), gamma=gamma)
    # Fresh services per run: nothing (caches, channels) carries over between configs.
    loop = Loopback(pair.target, pair.draft, pair.eos_token_id, pair.max_context,
                    max_batch_size=16 if batched else 1)

    async def go():
        async with loop:
            gate = asyncio.Semaphore(concurrency)

            async def one(ids):
                async with gate:
                    return await loop.generate(ids, max_new, SamplingParams(seed=0), method=method,
                                               gamma=gamma or 1, pipeline=True)

            start = time.perf_counter()
            results = await asyncio.gather(*[one(ids) for ids in prompts])
            return results, time.perf_counter() - start

    results, run.seconds = asyncio.run(go())
    for tokens, stats in results:
        run.outputs.append(list(tokens))
        run.tokens += len(tokens)
        run.stats += stats_from_proto(stats)
    return run


def run_server(client, method: str, gamma: int | None, prompts: list[str], max_new: int, concurrency: int) -> Run:
    from ..gateway.client import make_request

    run = Run(method=_label(method, concurrency, None), gamma=gamma)

    def one(prompt):
        request = make_request(prompt, max_new, method=method, gamma=gamma or 0, pipeline=True)
        ids, stats = [], None
        for chunk in client.generate(request):
            ids.extend(chunk.token_ids)
            if chunk.HasField("stats"):
                stats = chunk.stats
        return ids, stats

    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(one, prompts))
        run.seconds = time.perf_counter() - start
    for ids, stats in results:
        run.outputs.append(ids)
        run.tokens += len(ids)
        run.stats += stats_from_proto(stats)
    return run


def summarize_concurrency(runs: list[Run]) -> dict:
    """Ratios within one pass: batched over separate per method, and speculative over
    target-only under the same concurrency and batching."""
    out: dict = {"tokens_per_s": {r.label: r.tokens_per_s for r in runs}}
    for r in runs:
        name, _, mode = r.method.partition(" x")  # "outrider-draft", "8 batched"
        key = name if r.gamma is None else f"{name} gamma={r.gamma}"
        if mode.endswith(" batched"):
            separate = next((s for s in runs if s.method == r.method.replace(" batched", " separate")
                             and s.gamma == r.gamma), None)
            if separate:
                out.setdefault("batching_speedup", {})[key] = r.tokens_per_s / separate.tokens_per_s
        if name.startswith("outrider-"):
            baseline = next((b for b in runs if b.method == f"target-only x{mode}"), None)
            if baseline:
                out.setdefault("speculative_vs_target_only", {})[r.label] = r.tokens_per_s / baseline.tokens_per_s
    # Greedy: every config produces exactly the target-only tokens for every prompt.
    reference = next(r for r in runs if r.method.startswith("target-only")).outputs
    out["outputs_identical"] = all(r.outputs == reference for r in runs)
    return out
