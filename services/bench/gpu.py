"""GPU figures for the data path, in one short run (``python -m services.bench.gpu
OUT.json``): what a session lent a GPU measures, with only torch and transformers.

- the verify pass against transformers' bare forward, bf16, batch 8, contexts 256 /
  1,024 / 4,096, on a real-vocabulary model at a width where the GPU is not idle;
- in-process speculative decoding against target-only on the bundled pair, bf16 and
  fp32, greedy and sampled, in one run (the same process and GPU for both).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from ..core.sampling import SamplingParams
from ..models.loading import BUNDLED_DIR, bundled_paths
from ..models.pair import load_pair, make_engine
from ..core.gamma import GammaSchedule
from ..models.shapes import random_model
from .scale import CONTEXTS, verify_pass


def speculative_vs_target_only(dtype: str, params: SamplingParams, gammas=(4, 8), prompts=8, new=128,
                               device: str = "cuda") -> dict:
    """The held-out prompts of the bundled pair, as ``outrider bench`` uses them."""
    pair = load_pair(bundled_paths(), device, dtype, with_draft=True)
    lines = (BUNDLED_DIR / "heldout_prompts.jsonl").read_text().splitlines()[:prompts]
    ids = [pair.tokenizer(json.loads(line)["prompt"])["input_ids"] for line in lines]

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


def main(path: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "verify_pass": []}
    model = random_model("llama3", layers=4, hidden=2048).to("cuda", torch.bfloat16)
    for context in CONTEXTS:
        row = verify_pass(model, context, repeat=10)
        print(json.dumps(row), flush=True)
        result["verify_pass"].append(row)
    del model
    for dtype in ("bfloat16", "float32"):
        for params in (SamplingParams(), SamplingParams(temperature=1.0)):
            row = speculative_vs_target_only(dtype, params)
            print(json.dumps(row), flush=True)
            result.setdefault("in_process", []).append(row)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
