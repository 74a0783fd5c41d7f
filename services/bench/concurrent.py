"""Concurrency scenarios: N streams at once, aggregate tokens/s.

In-process (``run_local``): the verifier and drafter services over loopback gRPC, the
same code the Serve deployments wrap, with the verifier batching concurrent rounds or
verifying each session on its own, so both are measured in one run. Through a server
(``run_server``): N client threads against the public gRPC API.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ..core.sampling import SamplingParams
from ..rpc.convert import stats_from_proto
from .loopback import Loopback
from .runs import Run


def _label(method: str, concurrency: int, batched: bool | None) -> str:
    base = "target-only" if method == "none" else f"outrider-{method}"
    mode = "" if batched is None else (" batched" if batched else " separate")
    return f"{base} x{concurrency}{mode}"


def run_local(pair, method: str, gamma: int | None, prompts: list[list[int]], max_new: int,
              concurrency: int, batched: bool, params: SamplingParams = SamplingParams(seed=0),
              drafter_address: str | None = None) -> Run:
    """``drafter_address``: a draft worker in another process (``loopback.serve_drafter``).
    Sampled ``params``: prompt i is seeded ``params.seed + i``."""
    run = Run(method=_label(method, concurrency, batched), gamma=gamma, concurrency=concurrency)
    # Fresh services per run: nothing (caches, channels) carries over between configs.
    loop = Loopback(pair.target, pair.draft, pair.eos_token_id, pair.max_context,
                    max_batch_size=16 if batched else 1, drafter_address=drafter_address)

    async def go():
        async with loop:
            gate = asyncio.Semaphore(concurrency)

            async def one(i, ids):
                async with gate:
                    return await loop.generate(ids, max_new, replace(params, seed=params.seed + i), method=method,
                                               gamma=gamma or 1, pipeline=True)

            start = time.perf_counter()
            results = await asyncio.gather(*[one(i, ids) for i, ids in enumerate(prompts)])
            return results, time.perf_counter() - start

    results, run.seconds = asyncio.run(go())
    run.ttfts = list(loop.ttfts)
    for tokens, stats in results:
        run.outputs.append(list(tokens))
        run.tokens += len(tokens)
        run.stats += stats_from_proto(stats)
    return run


def run_server(client, method: str, gamma: int | None, prompts: list[str], max_new: int, concurrency: int,
               params: SamplingParams = SamplingParams()) -> Run:
    """Sampled ``params`` with a seed: prompt i is seeded ``params.seed + i``; without
    one, the server draws each request's seed."""
    from ..gateway.client import make_request

    run = Run(method=_label(method, concurrency, None), gamma=gamma, concurrency=concurrency)

    def one(i, prompt):
        seeded = params if params.seed is None else replace(params, seed=params.seed + i)
        request = make_request(prompt, max_new, seeded, method=method, gamma=gamma or 0, pipeline=True)
        ids, stats, first = [], None, None
        start = time.perf_counter()
        for chunk in client.generate(request):
            if chunk.token_ids and first is None:
                first = time.perf_counter() - start  # the client's time to first token, every hop included
            ids.extend(chunk.token_ids)
            if chunk.HasField("stats"):
                stats = chunk.stats
        run.ttfts.append(first)
        return ids, stats

    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(one, range(len(prompts)), prompts))
        run.seconds = time.perf_counter() - start
    for ids, stats in results:
        run.outputs.append(ids)
        run.tokens += len(ids)
        run.stats += stats_from_proto(stats)
    return run


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, nearest rank (p99 of 32 values is the largest)."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, math.ceil(q / 100 * len(ranked)) - 1))]


def summarize_concurrency(runs: list[Run], compare: bool = True) -> dict:
    """Ratios within one pass: batched over separate per method, and speculative over
    target-only under the same concurrency and batching. ``by_concurrency``: per level,
    the first speculative config against target-only, with its time-to-first-token
    percentiles (batched verification where both modes ran). ``compare``: the outputs
    must equal target-only's (greedy or seeded; not for unseeded sampling)."""
    out: dict = {"tokens_per_s": {r.label: r.tokens_per_s for r in runs}}
    for r in runs:
        name, _, mode = r.method.partition(" x")  # "outrider-draft", "8 batched"
        key = f"{name} x{mode}" if r.gamma is None else f"{name} x{mode} gamma={r.gamma}"
        if mode.endswith(" batched"):
            separate = next((s for s in runs if s.method == r.method.replace(" batched", " separate")
                             and s.gamma == r.gamma), None)
            if separate:
                out.setdefault("batching_speedup", {})[key] = r.tokens_per_s / separate.tokens_per_s
        if name.startswith("outrider-"):
            baseline = next((b for b in runs if b.method == f"target-only x{mode}"), None)
            if baseline:
                out.setdefault("speculative_vs_target_only", {})[r.label] = r.tokens_per_s / baseline.tokens_per_s
    by_level: dict = {}
    for n in sorted({r.concurrency for r in runs}):
        level = [r for r in runs if r.concurrency == n and not r.method.endswith(" separate")]
        baseline = next(r for r in level if r.method.startswith("target-only"))
        spec = next((r for r in level if r.method.startswith("outrider-")), None)
        if spec is None:
            continue
        by_level[str(n)] = {
            "speculative_vs_target_only": spec.tokens_per_s / baseline.tokens_per_s, "config": spec.label,
            "ttft_p50_s": percentile(spec.ttfts, 50), "ttft_p99_s": percentile(spec.ttfts, 99),
            "target_only_ttft_p50_s": percentile(baseline.ttfts, 50),
            "target_only_ttft_p99_s": percentile(baseline.ttfts, 99),
            "mean_accepted_length": spec.stats.mean_acceptance_length,
            # Rounds verified with no drafts (speculation off for the round, or the
            # session's worker still reading its prompt: the second share, of all rounds).
            "undrafted_round_share": 1 - spec.stats.drafted_per_position[0] / spec.stats.rounds
            if spec.stats.rounds and spec.stats.drafted_per_position else 1.0,
            "reading_round_share": spec.stats.reading_rounds / spec.stats.rounds if spec.stats.rounds else 0.0,
        }
    out["by_concurrency"] = by_level
    # Greedy or seeded: every config produces exactly the target-only tokens for every prompt.
    out["outputs_identical"] = None if not compare else all(
        r.outputs == next(b for b in runs if b.concurrency == r.concurrency and b.method.startswith("target-only")).outputs
        for r in runs)
    return out


def combine_passes(summaries: list[dict]) -> dict:
    """Per level, the median pass by speculative_vs_target_only, with every pass's ratio."""
    combined: dict = {}
    for n in summaries[-1]["by_concurrency"]:
        levels = sorted((s["by_concurrency"][n] for s in summaries), key=lambda v: v["speculative_vs_target_only"])
        combined[n] = {**levels[len(levels) // 2],
                       "per_pass": [s["by_concurrency"][n]["speculative_vs_target_only"] for s in summaries]}
    return combined
