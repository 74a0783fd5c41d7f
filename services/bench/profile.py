"""``outrider bench --profile OUT``: what the capacity planner (``outrider capacity``)
needs, measured on this machine with the pair it serves:

- the target's verify pass over ``batch`` sessions drafting ``gamma`` each, at the
  prompt length (seconds; ``TargetVerifier.verify``, the pass a replica runs);
- the draft model's batched step over ``rows`` sessions (seconds; the step the draft
  workers batch over their paged KV, ``extend_paged``);
- the prefill of a prompt (seconds per prompt);
- per-draft acceptance of the pair on the prompts, overall and by draft position, and
  what a round costs on the wire (draft block bytes, transport time), served over
  loopback gRPC;
- with a server (``--server``): what serving adds around the passes, measured through
  the public API target-only (``served_decoding``): each level's time to first token
  and seconds per token. On a small model the gateway, Serve's proxy and the stream
  cost as much as the pass; the planner subtracts its own pass costs to get that. The
  same levels speculative (the draft model), with the tokens each round committed: the
  planner prices what its model of a speculative round misses from the difference.

Each timing is the median of ``repeat`` runs, interleaved.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import torch

from ..core.kv_pool import BLOCK_TOKENS, KVPool, kv_bytes_per_token
from ..core.paged_kv import PagedKV, extend_paged
from ..core.proposals import Proposal
from ..core.sampling import SamplingParams
from ..core.stats import GenerationStats
from ..rpc.convert import stats_from_proto
from ..core.target import TargetRunner
from ..core.verifier import TargetVerifier, VerifyRequest

BATCHES = (1, 2, 4, 8, 16)
GAMMAS = (0, 2, 4, 8)
ROWS = (1, 2, 4, 8, 16)


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def verify_costs(target, prompts: list[list[int]], repeat: int) -> list[dict]:
    """Seconds of a verify pass by (batch, gamma); greedy, drafts the target rejects at
    the first position (the pass costs the same whatever is accepted)."""
    verifier = TargetVerifier(TargetRunner(target))
    rows = []
    for batch in BATCHES:
        reqs = []
        for b in range(batch):
            kv, committed = verifier.new_state(), prompts[b % len(prompts)]
            verifier.prefill(kv, committed[:-1], reserve=len(committed) + max(GAMMAS) + 1)
            reqs.append((kv, committed))
        for gamma in GAMMAS:
            drafts = torch.full((gamma,), 2, dtype=torch.long, device=target.device)

            def one():
                for kv, committed in reqs:  # forget the last pass's drafts: the same tokens again
                    kv.tokens = committed[:-1]
                verifier.verify([VerifyRequest(kv, committed, Proposal(drafts), SamplingParams(), 0) for kv, committed in reqs])

            rows.append({"batch": batch, "gamma": gamma, "positions": batch * (gamma + 1), "seconds": _median_time(one, repeat)})
        verifier.release([kv for kv, _ in reqs])
    return rows


def _pool_bytes(draft, rows: int, prompts: list[list[int]], steps: int = 1) -> int:
    """A draft KV pool that holds ``rows`` of the longest prompt and ``steps`` more."""
    positions = rows * (max(map(len, prompts)) + steps + 2 * BLOCK_TOKENS)
    return max(2**20, positions * kv_bytes_per_token(draft.config, draft.dtype))


def _draft_states(draft, pool: KVPool, prompts: list[list[int]]) -> list[PagedKV]:
    states = [PagedKV(pool) for _ in prompts]
    for state, prompt in zip(states, prompts):
        extend_paged(draft, [state], [prompt], [1])
    return states


@torch.inference_mode()
def draft_step_costs(draft, prompts: list[list[int]], repeat: int) -> list[dict]:
    """Seconds of one batched draft step over ``rows`` sessions at the prompt length."""
    out = []
    pool = KVPool.for_model(draft, _pool_bytes(draft, max(ROWS), prompts))
    for rows in ROWS:
        kvs = _draft_states(draft, pool, [prompts[r % len(prompts)] for r in range(rows)])
        lengths = [len(kv) for kv in kvs]

        def one():
            extend_paged(draft, kvs, [[2]] * rows, [1] * rows)
            for kv, n in zip(kvs, lengths):
                kv.truncate(n)

        out.append({"rows": rows, "seconds": _median_time(one, repeat)})
    return out


def colocated_overlap(pair, prompts: list[list[int]], repeat: int, batch: int = 4, gamma: int = 8) -> float:
    """How much of drafting stays exposed when a draft worker shares the verifier's
    hardware (one machine's cores, one GPU): a pass over ``batch`` sessions of ``gamma``
    drafts and the gamma + 1 draft steps that hide under it, timed alone and at once in
    two threads. 0: they overlap fully, as on separate nodes; 1: one waits for the other."""
    from concurrent.futures import ThreadPoolExecutor

    with torch.inference_mode():
        verifier = TargetVerifier(TargetRunner(pair.target))
        reqs = []
        for b in range(batch):
            kv, committed = verifier.new_state(), prompts[b % len(prompts)]
            verifier.prefill(kv, committed[:-1], reserve=len(committed) + gamma + 1)
            reqs.append((kv, committed))
        pool = KVPool.for_model(pair.draft, _pool_bytes(pair.draft, batch, prompts, gamma + 1))
        kvs = _draft_states(pair.draft, pool, [prompts[r % len(prompts)] for r in range(batch)])
        lengths = [len(kv) for kv in kvs]
    drafts = torch.full((gamma,), 2, dtype=torch.long, device=pair.target.device)

    @torch.inference_mode()
    def verify():
        for kv, committed in reqs:
            kv.tokens = committed[:-1]
        verifier.verify([VerifyRequest(kv, committed, Proposal(drafts), SamplingParams(), 0) for kv, committed in reqs])

    @torch.inference_mode()
    def draft():
        for _ in range(gamma + 1):
            extend_paged(pair.draft, kvs, [[2]] * batch, [1] * batch)
        for kv, n in zip(kvs, lengths):
            kv.truncate(n)

    with ThreadPoolExecutor(2) as pool:
        def both():
            for future in [pool.submit(verify), pool.submit(draft)]:
                future.result()

        alone_v, alone_d, together = (_median_time(fn, repeat) for fn in (verify, draft, both))
    with torch.inference_mode():
        verifier.release([kv for kv, _ in reqs])
    return min(1.0, max(0.0, (together - max(alone_v, alone_d)) / min(alone_v, alone_d)))


@torch.inference_mode()
def prefill_seconds(target, prompts: list[list[int]], repeat: int) -> float:
    verifier = TargetVerifier(TargetRunner(target))

    def one():
        kv = verifier.new_state()
        verifier.prefill(kv, prompts[0][:-1], reserve=len(prompts[0]) + 1)
        verifier.release([kv])

    return _median_time(one, repeat)


def served_rounds(pair, prompts: list[list[int]], gamma: int, max_new: int) -> dict:
    """Greedy sessions through the verifier and a draft worker over loopback gRPC: the
    pair's per-draft acceptance (maximum likelihood: accepted / (accepted + rounds that
    ended on a rejection)), the pipeline hit rate, bytes and transport seconds per
    drafting round. Every round drafts ``gamma``, the first too (the pair is measured,
    not the goodput controller nor a served session's rounds decoded while its worker
    reads the prompt: a short one, on a busy machine, may have no drafted round at all),
    after one untimed session (the worker's first forward)."""
    from .loopback import Loopback

    async def go():
        async with Loopback(pair.target, pair.draft, pair.eos_token_id, pair.max_context, load_aware_gamma=False,
                            wait_first_block=True) as loop:
            await loop.generate(prompts[0], max_new, SamplingParams(seed=0), gamma=gamma)
            return [await loop.generate(ids, max_new, SamplingParams(seed=0), gamma=gamma) for ids in prompts]

    runs = [stats for _, stats in asyncio.run(go())]
    accepted, rejections = sum(s.accepted for s in runs), sum(s.rejections for s in runs)
    drafting = sum(s.drafted_per_position[0] for s in runs if s.drafted_per_position) or 1
    total = GenerationStats()
    for s in runs:
        total += stats_from_proto(s)
    return {"gamma": gamma, "alpha": accepted / max(1, accepted + rejections),
            # P(a >= k): the share of rounds that accepted draft k (a run is not geometric)
            "acceptance_per_position": [a / d for a, d in zip(total.accepted_per_position, total.drafted_per_position) if d],
            # Rounds whose next block the worker had drafted early for the outcome: the
            # others wait for a fresh draft.
            "pipeline_hit_rate": total.pipeline_hit_rate,
            "bytes_per_round": sum(s.draft_bytes for s in runs) / drafting,
            "transport_s_per_round": sum(s.transport_s for s in runs) / drafting}


def served_decoding(client, texts: list[str], max_new: int, levels: list[int], method: str = "none",
                    gamma: int = 0) -> list[dict]:
    """Requests through a server at each level of concurrent streams: the median time to
    first token, and the median seconds per token after it. Speculative (``method`` not
    "none", ``gamma`` the clients' ceiling), also the tokens a round committed and the
    drafts a round tested, over all the level's requests, from their final stats."""
    from concurrent.futures import ThreadPoolExecutor

    from ..gateway.client import make_request

    def one(text):
        start, times, stats = time.perf_counter(), [], None
        for chunk in client.generate(make_request(text, max_new, method=method, gamma=gamma)):
            times.extend([time.perf_counter() - start] * len(chunk.token_ids))
            if chunk.HasField("stats"):
                stats = chunk.stats
        return times[0], (times[-1] - times[0]) / max(1, len(times) - 1), stats, len(times)

    out = []
    for streams in levels:
        batch = [texts[i % len(texts)] for i in range(max(streams, len(texts)))]
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(one, batch[:streams]))  # warm-up: this level's batch shapes
            start = time.perf_counter()
            timed = list(pool.map(one, batch))
            wall = time.perf_counter() - start
        tokens = sum(n for *_, n in timed)
        level = {"streams": streams, "ttft_s": statistics.median(t for t, *_ in timed),
                 "token_s": statistics.median(r for _, r, *_ in timed),
                 # As `outrider bench --concurrency` counts: every token over the level's wall time.
                 "tokens_per_s": tokens / wall, "output_tokens": tokens / len(timed)}
        if method != "none":
            rounds = sum(s.rounds for _, _, s, _ in timed) or 1
            level["tokens_per_round"] = sum(s.emitted for _, _, s, _ in timed) / rounds
            level["drafted_per_round"] = sum(s.drafted for _, _, s, _ in timed) / rounds
        out.append(level)
    return out


def run_profile(pair, prompts: list[list[int]], repeat: int, max_new: int, on_row=print,
                client=None, texts: list[str] = (), levels: list[int] = ()) -> dict:
    verify = verify_costs(pair.target, prompts, repeat)
    on_row(f"  verify pass: {len(verify)} (batch, gamma) points, batch 16 gamma 8: "
           f"{verify[-1]['seconds'] * 1e3:.1f} ms")
    steps = draft_step_costs(pair.draft, prompts, repeat)
    on_row(f"  draft step: rows 1 {steps[0]['seconds'] * 1e3:.1f} ms, rows 16 {steps[-1]['seconds'] * 1e3:.1f} ms")
    rounds = served_rounds(pair, prompts, 8, max_new)
    on_row(f"  served rounds: alpha {rounds['alpha']:.3f}, pipeline hits {rounds['pipeline_hit_rate']:.2f}, "
           f"{rounds['bytes_per_round']:.0f} B and "
           f"{rounds['transport_s_per_round'] * 1e3:.2f} ms transport a round")
    served = {}
    if client is not None:
        served["served"] = served_decoding(client, list(texts), max_new, list(levels))
        on_row("  served target-only: " + ", ".join(
            f"{r['streams']} streams {r['token_s'] * 1e3:.1f} ms/token (TTFT {r['ttft_s'] * 1e3:.0f} ms)" for r in served["served"]))
        # Speculative too, the draft model at the profile's gamma as the clients' ceiling:
        # what the model of a round cannot see (sessions out of step, drafting beside the
        # pass on shared hardware, the controller's choices) shows up here.
        served["served_speculative"] = served_decoding(client, list(texts), max_new, list(levels), "draft", rounds["gamma"])
        on_row("  served speculative: " + ", ".join(
            f"{r['streams']} streams {r['token_s'] * 1e3:.1f} ms/token, {r['tokens_per_round']:.2f} tokens a round"
            for r in served["served_speculative"]))
    return {
        "prompt_tokens": round(statistics.fmean(len(p) for p in prompts)), **served,
        "verify_pass": verify, "draft_step": steps, "prefill_s": prefill_seconds(pair.target, prompts, repeat),
        **rounds, "draft_kv_bytes_per_token": kv_bytes_per_token(pair.draft.config, pair.draft.dtype),
        "colocated_overlap": colocated_overlap(pair, prompts, repeat),
        "threads": torch.get_num_threads(), "device": str(pair.target.device),
    }
