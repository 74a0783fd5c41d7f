"""Speculative decoding against target-only decoding on one GPU, with the draft worker
and the verifier as separate processes (``python -m services.bench.gpu_served OUT.json``).

The lent GPU machines have no Ray, so this is the served path without Serve: the
verifier service (batching, pipelined rounds, the acceptance sampler) in this process,
the draft worker's service in a spawned one, talking the internal gRPC protocol over
loopback TCP, both on the same GPU in bf16. The bundled pair, the held-out prompts,
greedy, seeded sampled (coupled) and unseeded sampled (rejection sampling; prompt i
takes seed i as the gateway would draw one), one stream and several. Every level's
configs run interleaved in each pass, so the ratios are taken on the same machine
minutes apart; greedy and seeded outputs must equal target-only's (in bf16, near-tied
argmaxes may flip between a pass of 1 position and one of several).

``--device cpu`` runs the same code on a CPU (a check of the script, not a figure).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time

import torch

from ..core.sampling import SamplingParams
from ..models.loading import bundled_paths, configure_cuda
from ..models.pair import load_pair
from .concurrent import run_local
from .gpu import heldout_ids
from .loopback import serve_drafter

CONFIGS = (("none", None), ("draft", 4), ("draft", 8))


def start_drafter(device: str, dtype: str, threads: int) -> tuple[multiprocessing.Process, str]:
    ctx = multiprocessing.get_context("spawn")  # a fresh CUDA context: no fork of this one
    ports = ctx.Queue()
    process = ctx.Process(target=serve_drafter, args=(bundled_paths().draft, device, dtype, threads, ports), daemon=True)
    process.start()
    return process, f"127.0.0.1:{ports.get(timeout=300)}"


def measure(device: str, dtype: str, levels: list[int], passes: int, prompts: int, new: int, threads: int,
            record) -> None:
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        configure_cuda()
    pair = load_pair(bundled_paths(), device, dtype, with_draft=False)
    ids = heldout_ids(pair, prompts)
    drafter, address = start_drafter(device, dtype, threads)
    try:
        # Seeded sampling is coupled (core/coupling.py); unseeded keeps rejection sampling.
        modes = {"greedy": SamplingParams(seed=0), "T=1.0 seeded": SamplingParams(temperature=1.0, seed=0),
                 "T=1.0 unseeded": SamplingParams(temperature=1.0, seed=0, coupled=False)}
        for mode, params in modes.items():
            # Warm-up: kernels, allocator, the drafter's first sessions.
            for method, gamma in CONFIGS:
                run_local(pair, method, gamma, ids[:2], 16, 2, True, params, address)
            for level in levels:
                for n in range(passes):
                    runs = {f"{method} gamma={gamma}" if gamma else "target-only":
                            run_local(pair, method, gamma, ids, new, level, True, params, address)
                            for method, gamma in CONFIGS}
                    base = runs["target-only"]
                    record({
                        "mode": mode, "streams": level, "pass": n, "dtype": dtype,
                        "target_only_tokens_per_s": base.tokens_per_s,
                        "rows": [{"config": label, "tokens_per_s": run.tokens_per_s,
                                  "vs_target_only": run.tokens_per_s / base.tokens_per_s,
                                  "tokens_per_round": run.stats.mean_acceptance_length,
                                  "identical_to_target_only": run.outputs == base.outputs
                                  if params.greedy or params.resolve_seed().coupled else None}
                                 for label, run in runs.items() if run is not base],
                    })
    finally:
        drafter.terminate()
        drafter.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--levels", default="1,8", help="streams at once, comma-separated")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=4, help="torch threads in each process")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "torch": torch.__version__, "levels": []}
    start = time.perf_counter()

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        result["levels"].append(row)
        result["seconds"] = time.perf_counter() - start
        with open(args.out, "w") as f:  # after every row: a run cut short keeps what it measured
            json.dump(result, f, indent=2)

    measure(args.device, args.dtype, [int(v) for v in args.levels.split(",")], args.passes, args.prompts,
            args.max_new_tokens, args.threads, record)


if __name__ == "__main__":
    main()
