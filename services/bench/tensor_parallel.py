"""What tensor parallelism adds to a verify pass beyond the model (``outrider bench --tp``).

A TP=2 group over gloo on a local Ray cluster, against the same model in-process
(TP=1), on a random-init Llama small enough that the pass is nearly all overhead:
batch 8 decode passes (one token a session after a 32-token prompt), the two
interleaved pass by pass, medians. The difference is the group's per-pass overhead:
the call to rank 0, the broadcast of the feeds, the logits' way back (the layers'
all-reduces are in it too: on a model this small they are the only compute TP adds).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from ..core.target import Feed, TargetRunner
from ..models.shapes import random_model


def run_tp_overhead(passes: int = 200, on_row=print) -> dict:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from ..verifier.tensor_parallel import TensorParallelTarget

    model = random_model("llama3", layers=2, hidden=256)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    group = placement_group([{"CPU": 0.1}] + [{"CPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(group.ready())
    try:
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            tp = TensorParallelTarget(2, path, "cpu", "float32", False, rank_cpus=1, threads=1, group=group)
            try:
                local = TargetRunner(model)
                sessions = [f"s{i}" for i in range(8)]
                prompt = list(range(10, 42))
                first = [Feed(s, 0, prompt, 1) for s in sessions]
                tp.forward(first), local.forward(first)
                times: dict[str, list[float]] = {"tp2": [], "tp1": []}
                for step in range(passes):
                    feeds = [Feed(s, len(prompt) + step, [7], 1) for s in sessions]
                    for name, runner in (("tp2", tp), ("tp1", local)):
                        t0 = time.perf_counter()
                        runner.forward(feeds)
                        times[name].append(time.perf_counter() - t0)
            finally:
                tp.shutdown()
    finally:
        remove_placement_group(group)
        if started:
            ray.shutdown()
    tp2, tp1 = statistics.median(times["tp2"]), statistics.median(times["tp1"])
    summary = {"passes": passes, "batch": 8, "tp2_pass_ms": tp2 * 1e3, "tp1_pass_ms": tp1 * 1e3,
               "tp2_overhead_ms": (tp2 - tp1) * 1e3, "threads": torch.get_num_threads()}
    on_row(f"TP=2 pass {tp2 * 1e3:.2f} ms, TP=1 {tp1 * 1e3:.2f} ms: overhead {(tp2 - tp1) * 1e3:.2f} ms a pass")
    return summary
