"""What tensor parallelism adds to a verify pass beyond the model (``outrider bench --tp``).

A TP=2 group over gloo on a local Ray cluster, against the same model in-process
(TP=1), on a random-init Llama small enough that the pass is nearly all overhead:
batch 8 decode passes (one token a session after a 32-token prompt), the two
interleaved pass by pass, medians. The difference is what the group adds to a pass: the
call to rank 0, the broadcast of the feeds, the layers' all-reduces (on a model this
small, the only compute TP adds) and the logits' way back. The control path alone (a
command through every rank that computes nothing) is timed beside it.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from ..core.target import Feed, TargetRunner
from ..models.shapes import random_model


def run_tp_overhead(passes: int = 200, vocab: int | None = None, on_row=print) -> dict:
    """``vocab``: another than Llama-3's 128,256 (the logits rank 0 returns are batch x V)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from ..verifier.tensor_parallel import TensorParallelTarget

    model = random_model("llama3", layers=2, hidden=256, vocab=vocab)
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
                times: dict[str, list[float]] = {"tp2": [], "tp1": [], "control": []}
                for step in range(passes):
                    feeds = [Feed(s, len(prompt) + step, [7], 1) for s in sessions]
                    for name, call in (("tp2", lambda: tp.forward(feeds)), ("tp1", lambda: local.forward(feeds)),
                                       ("control", tp.control_round_trip)):
                        t0 = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - t0)
            finally:
                tp.shutdown()
    finally:
        remove_placement_group(group)
        if started:
            ray.shutdown()
    tp2, tp1, control = (statistics.median(times[k]) * 1e3 for k in ("tp2", "tp1", "control"))
    summary = {"passes": passes, "batch": 8, "vocab": model.config.vocab_size, "tp2_pass_ms": tp2, "tp1_pass_ms": tp1,
               "tp2_over_tp1_ms": tp2 - tp1, "control_path_ms": control, "threads": torch.get_num_threads()}
    on_row(f"TP=2 pass {tp2:.2f} ms, TP=1 {tp1:.2f} ms (difference {tp2 - tp1:.2f} ms: the control path, the "
           f"layers' all-reduces and the logits' way back); the control path alone {control:.2f} ms")
    return summary
