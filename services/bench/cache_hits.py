"""How often the speculation cache holds the next round's block, for sampled requests
(``python -m services.bench.cache_hits OUT.json``).

The bundled pair, the held-out prompts, the services over gRPC on loopback in one
process (services/bench/loopback.py), gamma 4, every branch a request asks for drafted
(the load policy off: this measures the guesses, not the budget). For each temperature
and fan-out: seeded requests (coupled: their guesses rank by the draft's perturbed
scores) and unseeded ones (rejection sampling: by q). A hit is a round whose next
block the worker had drafted for the outcome that happened: in full before the outcome
came, or in part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import torch

from ..core.sampling import SamplingParams
from ..models.loading import bundled_paths
from ..models.pair import load_pair
from .gpu import heldout_ids
from .loopback import Loopback


def cache_hits(pair, prompts: list[list[int]], temperature: float, fanout: int, coupled: bool,
               max_new: int = 64, gamma: int = 4) -> dict:
    async def run() -> dict:
        totals = dict(rounds=0, pipeline_rounds=0, cache_hits=0, cache_hits_full=0, cache_hits_partial=0, tokens=0)
        async with Loopback(pair.target, pair.draft, measured_fanout=False) as loopback:
            for i, prompt in enumerate(prompts):
                params = SamplingParams(temperature=temperature, seed=100 + i, coupled=coupled)
                tokens, stats = await loopback.generate(prompt, max_new, params, gamma=gamma, fanout=fanout)
                totals["tokens"] += len(tokens)
                for key in ("rounds", "pipeline_rounds", "cache_hits", "cache_hits_full", "cache_hits_partial"):
                    totals[key] += getattr(stats, key)
        totals["hit_rate"] = totals["cache_hits"] / max(totals["pipeline_rounds"], 1)
        return totals

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--temperatures", default="1.0,0.7")
    parser.add_argument("--fanouts", default="1,4")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = load_pair(bundled_paths())
    prompts = heldout_ids(pair, args.prompts)
    rows = []
    for temperature in (float(t) for t in args.temperatures.split(",")):
        for fanout in (int(f) for f in args.fanouts.split(",")):
            for coupled in (True, False):
                row = dict(temperature=temperature, fanout=fanout, coupled=coupled,
                           **cache_hits(pair, prompts, temperature, fanout, coupled, args.max_new_tokens))
                print(f"T={temperature} fanout {fanout} {'seeded (coupled)' if coupled else 'unseeded'}: hit rate "
                      f"{row['hit_rate']:.3f} ({row['cache_hits_full']} full, {row['cache_hits_partial']} partial, "
                      f"of {row['pipeline_rounds']} rounds)", flush=True)
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
