"""Where a GPU pass's time goes (``python -m services.bench.gpu_profile OUT.json``):
the verify pass of ``services.bench.gpu`` and target-only decoding of the bundled pair,
each with its CUDA runtime calls counted (kernel launches, copies, host syncs) and its
busiest operators listed, plus target-only decoding against transformers' ``generate``
in the same run. On a GPU, a pass of a model this size is bound by what the host does
per kernel, not by the GPU: these counts say where to cut.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from ..core.sampling import SamplingParams
from ..core.verifier import TargetVerifier
from ..models.loading import bundled_paths, configure_cuda
from ..models.pair import load_pair, make_engine
from ..core.gamma import GammaSchedule
from ..models.shapes import random_model
from .gpu import heldout_ids
from .runs import run_hf, run_outrider
from .scale import verify_pass

RUNTIME_CALLS = {"launches": ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"),
                 "copies": ("cudaMemcpyAsync", "cudaMemcpy"),
                 "syncs": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")}


def summarize(prof, per: int = 1) -> dict:
    """Runtime calls per unit (pass or token), GPU busy time, and the top operators."""
    names = Counter(e.name for e in prof.events())
    out = {kind: sum(names[n] for n in calls) / per for kind, calls in RUNTIME_CALLS.items()}
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    out["gpu_busy_ms"] = sum(e.time_range.elapsed_us() for e in kernels) / 1000 / per
    out["top_ops_by_self_cpu"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return out


def profiled_verify(model, context: int) -> dict:
    """verify_pass's figures, with its 4th verify pass (after warm-up) profiled."""
    original, seen = TargetVerifier.verify, {"n": 0}

    def verify(self, batch):
        seen["n"] += 1
        if seen["n"] != 4:
            return original(self, batch)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = original(self, batch)
        seen["profile"] = summarize(prof)
        return out

    TargetVerifier.verify = verify
    try:
        row = verify_pass(model, context, repeat=10)
    finally:
        TargetVerifier.verify = original
    return {**row, **seen["profile"]}


def decode_profile(dtype: str, prompts: int = 4, new: int = 64) -> dict:
    """Target-only decoding of the bundled pair: Outrider's against transformers'
    ``generate`` (tokens/s, same prompts, interleaved), and one profiled generation."""
    pair = load_pair(bundled_paths(), "cuda", dtype, with_draft=False)
    ids = heldout_ids(pair, prompts)
    run_outrider(pair, "none", None, ids[:1], 8), run_hf(pair, None, ids[:1], 8)  # warm-up
    ours, hf = run_outrider(pair, "none", None, ids, new), run_hf(pair, None, ids, new)
    engine = make_engine(pair, "none", GammaSchedule(0))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tokens = len(engine.generate(ids[0], 32, SamplingParams()).token_ids)
    return {"dtype": dtype, "outrider_tokens_per_s": ours.tokens_per_s, "hf_generate_tokens_per_s": hf.tokens_per_s,
            "outrider_vs_hf": ours.tokens_per_s / hf.tokens_per_s, "same_tokens": ours.outputs == hf.outputs,
            "per_token": summarize(prof, per=tokens)}


def main(path: str) -> None:
    torch.set_num_threads(8)  # the lent machine has 16 cores; the GPU does the work
    configure_cuda()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def record(key: str, row: dict) -> None:
        print(json.dumps({key: {k: v for k, v in row.items() if k != "top_ops_by_self_cpu"}}), flush=True)
        result.setdefault(key, []).append(row)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

    model = random_model("llama3", layers=4, hidden=2048).to("cuda", torch.bfloat16)
    for context in (256, 4096):
        record("verify_pass", profiled_verify(model, context))
    del model
    if len(sys.argv) > 2 and sys.argv[2] == "--verify-only":
        return
    record("decode", decode_profile("bfloat16"))


if __name__ == "__main__":
    main(sys.argv[1])
