"""GPU figures, in one short run (``python -m services.bench.gpu OUT.json``): what a
session lent a GPU measures, with only torch and transformers.

- the verify pass against transformers' bare forward, bf16, batch 8, contexts 256 /
  1,024 / 4,096, on a real-vocabulary model at a width where the GPU is not idle;
- a verify pass with an N-node tree against a 5-token chain (the tree methods' price),
  on that model and on the bundled target;
- in-process decoding of the bundled pair on held-out prompts: target-only, the draft
  model, and Medusa, MTP and EAGLE-3 with their shipped trees and with larger ones
  (verification costs little more per node on a GPU than on a CPU), in one run.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from ..core.gamma import GammaSchedule
from ..core.sampling import SamplingParams
from ..models.build.heads import verify_cost
from ..models.loading import BUNDLED_DIR, bundled_paths, configure_cuda
from ..models.pair import load_pair, make_engine
from ..models.shapes import random_model
from .runs import run_outrider
from .scale import CONTEXTS, verify_pass

# A 16-node Medusa tree: the top 2-4 candidates near the root, the top path to depth 4.
MEDUSA16 = "0;1;2;3;0.0;0.1;0.2;1.0;0.0.0;0.0.1;0.1.0;1.0.0;0.0.0.0;0.0.0.1;0.0.1.0;0.1.0.0"
MTP8 = "0;1;2;0.0;0.1;1.0;0.0.0;0.0.1"
EAGLE16 = "6,4,16"  # depth, top_k, nodes


def heldout_ids(pair, prompts: int) -> list[list[int]]:
    lines = (BUNDLED_DIR / "heldout_prompts.jsonl").read_text().splitlines()[:prompts]
    return [pair.tokenizer(json.loads(line)["prompt"])["input_ids"] for line in lines]


def speculative_vs_target_only(dtype: str, params: SamplingParams, gammas=(4, 8), prompts=8, new=128,
                               device: str = "cuda") -> dict:
    """The held-out prompts of the bundled pair, as ``outrider bench`` uses them."""
    pair = load_pair(bundled_paths(), device, dtype, with_draft=True)
    ids = heldout_ids(pair, prompts)

    def tokens_per_s(drafter: str, gamma: int) -> float:
        engine = make_engine(pair, drafter, GammaSchedule(gamma))
        engine.generate(ids[0], 16, params)  # warm-up
        t0, n = time.perf_counter(), 0
        for i, prompt in enumerate(ids):
            n += len(engine.generate(prompt, new, SamplingParams(params.temperature, params.top_k, params.top_p, seed=i)).token_ids)
        return n / (time.perf_counter() - t0)

    base = tokens_per_s("none", 0)
    out = {"dtype": dtype, "temperature": params.temperature, "target_only_tokens_per_s": base}
    for gamma in gammas:
        spec = tokens_per_s("draft", gamma)
        out[f"draft_gamma{gamma}_tokens_per_s"] = spec
        out[f"draft_gamma{gamma}_vs_target_only"] = spec / base
    return out


def heads_vs_draft(dtype: str, prompts: int = 8, new: int = 128, device: str = "cuda") -> dict:
    """Greedy, one stream: every drafter's tokens/s over target-only's, and its mean
    tokens per round, interleaved in one run. Outputs must equal target-only's."""
    pair = load_pair(bundled_paths(), device, dtype, with_draft=True, heads=("medusa", "mtp", "eagle"))
    ids = heldout_ids(pair, prompts)
    configs = [("none", None, None), ("draft", 4, None), ("draft", 6, None), ("medusa", 16, None),
               ("medusa", 16, MEDUSA16), ("mtp", 16, None), ("mtp", 16, MTP8), ("eagle", 16, None),
               ("eagle", 16, EAGLE16)]
    for drafter, gamma, tree in configs:  # warm-up: allocator, kernels
        run_outrider(pair, drafter, gamma, ids[:1], 8, tree)
    runs = [run_outrider(pair, drafter, gamma, ids, new, tree) for drafter, gamma, tree in configs]
    base = runs[0]
    out = {"dtype": dtype, "target_only_tokens_per_s": base.tokens_per_s, "rows": []}
    for run in runs[1:]:
        out["rows"].append({"method": run.label, "vs_target_only": run.tokens_per_s / base.tokens_per_s,
                            "mean_acceptance_length": run.stats.mean_acceptance_length,
                            "identical_to_target_only": run.outputs == base.outputs})
    return out


def tree_costs(target, device: str = "cuda") -> dict:
    cost = verify_cost(target, 64, device, repeats=9)
    return {"tree16_vs_chain5": float(cost[16] / cost[5]), "tree64_vs_chain5": float(cost[64] / cost[5]),
            "vs_one_token": {str(n): float(cost[n]) for n in (5, 8, 16, 32, 64)}}


def main(path: str) -> None:
    torch.set_num_threads(8)  # the lent machine has 16 cores; the GPU does the work
    torch.backends.cuda.matmul.allow_tf32 = True
    configure_cuda()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "verify_pass": []}

    def record(key: str, row) -> None:
        print(json.dumps({key: row}), flush=True)
        result.setdefault(key, []).append(row)
        with open(path, "w") as f:  # after every row: a run cut short keeps what it measured
            json.dump(result, f, indent=2)

    model = random_model("llama3", layers=4, hidden=2048).to("cuda", torch.bfloat16)
    for context in CONTEXTS:
        record("verify_pass", verify_pass(model, context, repeat=10))
    record("tree_cost", {"model": "llama3-shaped, width 2048, 4 layers, bf16", **tree_costs(model)})
    del model
    bundled = load_pair(bundled_paths(), "cuda", "bfloat16", with_draft=False)
    record("tree_cost", {"model": "bundled target, bf16", **tree_costs(bundled.target)})
    del bundled
    for dtype in ("bfloat16", "float32"):
        record("heads", heads_vs_draft(dtype))
    for dtype in ("bfloat16", "float32"):
        for params in (SamplingParams(), SamplingParams(temperature=1.0)):
            record("in_process", speculative_vs_target_only(dtype, params))


if __name__ == "__main__":
    main(sys.argv[1])
