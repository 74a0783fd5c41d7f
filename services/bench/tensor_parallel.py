"""What tensor parallelism adds to a verify pass beyond the model (``outrider bench --tp``).

A TP=2 group over gloo on a local Ray cluster, against the same model in-process
(TP=1), on a random-init Llama small enough that the pass is nearly all overhead:
batch 8 verify rounds of gamma 8 (sampled rows, T = 1.0, drafts with their compact q)
after a 32-token prompt, each committing its outcome, the variants interleaved round
by round, medians. Three ways to run the round:

- TP=2, acceptance on rank 0 (how the verifier runs it): only the outcomes come back;
- TP=2, the logits back to the replica and accepted there (how it ran before);
- TP=1, in-process.

TP=2 less TP=1 is what the group adds to a round: the call to rank 0, the broadcast of
the feeds, the layers' all-reduces (on a model this small, the only compute TP adds)
and what comes back. The control path alone (a command through every rank that
computes nothing) is timed beside them.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from ..core.draft_q import SparseQ, compact
from ..core.proposals import Proposal
from ..core.sampling import SamplingParams
from ..core.target import TargetRunner
from ..core.verifier import TargetVerifier, VerifyRequest
from ..models.shapes import random_model

BATCH, GAMMA, PROMPT = 8, 8, 32


class LogitsBack:
    """A TP group seen only through ``forward``: the logits come back to the replica,
    and the verifier accepts there (the path before acceptance moved to rank 0)."""

    def __init__(self, tp):
        self.tp = tp

    def forward(self, feeds):
        return self.tp.forward(feeds)


def _proposals(V: int, gen: torch.Generator) -> list[Proposal]:
    """A round's drafts for each session: GAMMA tokens, each sampled from its own compact q."""
    out = []
    for _ in range(BATCH):
        qs = [compact(torch.softmax(torch.randn(V, generator=gen) * 4, -1)) for _ in range(GAMMA)]
        tokens = torch.stack([torch.multinomial(q.dense()[0], 1, generator=gen)[0] for q in qs])
        out.append(Proposal(tokens, SparseQ.stack(qs)))
    return out


def run_tp_overhead(passes: int = 200, vocab: int | None = None, on_row=print) -> dict:
    """``vocab``: another than Llama-3's 128,256 (the logits of a round are batch x
    (gamma + 1) x V)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from ..verifier.tensor_parallel import TensorParallelTarget

    model = random_model("llama3", layers=2, hidden=256, vocab=vocab)
    V = model.config.vocab_size
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    group = placement_group([{"CPU": 0.1}] + [{"CPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(group.ready())
    names = ("tp2", "tp2_logits_back", "tp1")
    times: dict[str, list[float]] = {name: [] for name in names + ("control",)}
    try:
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            tp = TensorParallelTarget(2, path, "cpu", "float32", False, rank_cpus=1, threads=1, group=group)
            try:
                verifiers = dict(zip(names, (TargetVerifier(tp), TargetVerifier(LogitsBack(tp)),
                                             TargetVerifier(TargetRunner(model)))))
                kvs = {name: [v.new_state() for _ in range(BATCH)] for name, v in verifiers.items()}
                committed = {name: [list(range(10 + b, 10 + b + PROMPT)) for b in range(BATCH)] for name in names}
                params = [SamplingParams(temperature=1.0, seed=b, coupled=False) for b in range(BATCH)]
                gen = torch.Generator().manual_seed(0)
                for step in range(passes + 1):  # the first (the prompts' prefill) is not timed
                    proposals = _proposals(V, gen)
                    for name, verifier in verifiers.items():
                        batch = [VerifyRequest(kv, list(c), p, sp, step)
                                 for kv, c, p, sp in zip(kvs[name], committed[name], proposals, params)]
                        t0 = time.perf_counter()
                        outcomes = verifier.verify(batch)
                        if step:
                            times[name].append(time.perf_counter() - t0)
                        for c, outcome in zip(committed[name], outcomes):
                            c += outcome.tokens
                    t0 = time.perf_counter()
                    tp.control_round_trip()
                    times["control"].append(time.perf_counter() - t0)
            finally:
                tp.shutdown()
    finally:
        remove_placement_group(group)
        if started:
            ray.shutdown()
    tp2, back, tp1, control = (statistics.median(times[k]) * 1e3 for k in names + ("control",))
    summary = {"passes": passes, "batch": BATCH, "gamma": GAMMA, "vocab": V, "tp2_pass_ms": tp2,
               "tp2_logits_back_pass_ms": back, "tp1_pass_ms": tp1, "tp2_over_tp1_ms": tp2 - tp1,
               "logits_back_over_tp1_ms": back - tp1, "control_path_ms": control,
               "logits_bytes": BATCH * (GAMMA + 1) * V * 4, "threads": torch.get_num_threads(),
               # The same logits accepted on rank 0 or on the replica commit the same tokens.
               "rank0_same_as_logits_back": committed["tp2"] == committed["tp2_logits_back"],
               "same_as_tp1": committed["tp2"] == committed["tp1"]}
    on_row(f"V={V}: a verify round (batch {BATCH}, gamma {GAMMA}, T=1.0): TP=2 accepting on rank 0 {tp2:.2f} ms, "
           f"TP=2 with the logits back {back:.2f} ms, TP=1 {tp1:.2f} ms; TP=2 adds {tp2 - tp1:.2f} ms "
           f"(was {back - tp1:.2f}); the control path alone {control:.2f} ms")
    return summary
