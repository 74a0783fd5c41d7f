"""``outrider bench --scale``: the data path at the scale users run, on random-init
models with real shapes (services/models/shapes.py).

- Verify pass at batch 8 and contexts 256 / 1,024 / 4,096: Outrider's whole pass
  (``TargetVerifier.verify``: feeds, the batched forward over each session's cache,
  batched acceptance with sampled rows, the one host sync) against transformers'
  bare forward of the same tokens on a prebuilt batched cache, the limit, with
  transformers' default attention and with Outrider's. Host time
  per pass is the pass less the time inside the model's forward.
- Bytes per round at V = 151,936, gamma 8, top-k 50 and plain T = 1.0: measured on the
  wire, verifier <-> draft worker over loopback gRPC (services/bench/loopback.py).
- What truncating q costs: the exact per-token acceptance probability sum_x min(p, q)
  with the full q and with the compact q that is sent, on the bundled (trained) pair
  and on the real-vocabulary pair.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
import statistics
import time

import torch
from transformers import DynamicCache

from ..core.draft_q import SparseQ, compact
from ..core.proposals import Proposal
from ..core.sampling import Penalties, SamplingParams, StopRule, adjusted_probs
from ..core.shaping import ContextCounts
from ..core.target import TargetRunner
from ..core.verifier import TargetVerifier, VerifyRequest
from ..models.lean import use_lean_decoding
from ..models.shapes import random_model, random_pair

CONTEXTS = (256, 1024, 4096)
# The limit is transformers' own forward with its default attention; the pass is also
# timed against the same forward with Outrider's attention (models/attention.py), so
# that what the pool and acceptance add is seen apart from what the attention saves.
TRANSFORMERS_ATTENTION = "sdpa"
BATCH, GAMMA = 8, 8


class ForwardTimer:
    """Seconds spent inside ``model``'s forward, or its lean decoder's where it has one
    (models/lean.py), until ``close``."""

    def __init__(self, model):
        self.seconds, self._t0 = 0.0, 0.0
        self.model, self.lean = model, getattr(model, "lean_decoder", None)
        if self.lean is not None:
            def timed(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return self.lean(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0
            model.lean_decoder = timed
        self.hooks = [
            model.register_forward_pre_hook(lambda *_: setattr(self, "_t0", time.perf_counter())),
            model.register_forward_hook(lambda *_: setattr(self, "seconds", self.seconds + time.perf_counter() - self._t0)),
        ]

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        if self.lean is not None:
            self.model.lean_decoder = self.lean


@torch.inference_mode()
def verify_pass(model, context: int, repeat: int, seed: int = 0, penalties: Penalties | None = None,
                coupled: bool = False) -> dict:
    """Outrider's verify pass and transformers' bare forward, batch 8, interleaved.
    With ``penalties``, also the pass with them on every row (the second half of each
    context counted as output); with ``coupled``, also the pass with every row seeded,
    so coupled (core/coupling.py: Gumbel noise over the vocabulary at every slot);
    each interleaved with the others."""
    V, device = model.config.vocab_size, model.device
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, V, (BATCH, context), generator=gen)
    drafts = torch.randint(2, V, (BATCH, GAMMA), generator=gen)
    verifier = TargetVerifier(TargetRunner(model))
    timer = ForwardTimer(model)
    reqs = []
    for b in range(BATCH):
        kv = verifier.new_state()
        committed = prompts[b].tolist()
        verifier.prefill(kv, committed[:-1])
        q = compact(torch.randn(V, generator=gen).mul(4).softmax(-1))
        proposal = Proposal(drafts[b], SparseQ.stack([q] * GAMMA))
        reqs.append(VerifyRequest(kv, committed, proposal, SamplingParams(temperature=1.0, seed=b), 0))
    penalized = [replace(req, params=replace(req.params, penalties=penalties, stop=StopRule(()), prompt_len=context // 2),
                         counts=ContextCounts()) for req in reqs] if penalties is not None else []
    seeded = [replace(req, params=replace(req.params, coupled=True)) for req in reqs] if coupled else []
    # The limit: the same 9 tokens a row, on a cache that already holds the prompts.
    cache = DynamicCache(config=model.config)
    model(input_ids=prompts[:, :-1].to(device), cache=cache, use_cache=True, logits_to_keep=1)
    feed = torch.cat([prompts[:, -1:], drafts], 1).to(device)  # [B, gamma+1]
    positions = torch.arange(context - 1, context + GAMMA, device=device)[None].expand(BATCH, -1)

    def outrider(batch=reqs) -> tuple[float, float]:
        for req in batch:  # forget last pass's drafts: the next pass feeds the same tokens
            req.kv.tokens = req.committed[:-1]
        inside, t0 = timer.seconds, time.perf_counter()
        verifier.verify(batch)
        return time.perf_counter() - t0, timer.seconds - inside

    own = model.config._attn_implementation  # Outrider's (models/attention.py)

    def bare(attention: str = TRANSFORMERS_ATTENTION) -> float:
        model.set_attn_implementation(attention)
        try:
            t0 = time.perf_counter()
            out = model(input_ids=feed, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=GAMMA + 1)
            out.logits[:, :, 0].sum().item()  # wait for the device, as the verify pass's one sync does
            elapsed = time.perf_counter() - t0
        finally:
            model.set_attn_implementation(own)
        cache.crop(-(GAMMA + 1))
        return elapsed

    outrider(), bare(), bare(own)  # warm-up
    for extra in (penalized, seeded):
        if extra:
            outrider(extra)
    ours, limit, same, host, shaped, noised = [], [], [], [], [], []
    for _ in range(repeat):
        total, inside = outrider()
        ours.append(total)
        host.append(total - inside)
        limit.append(bare())
        same.append(bare(own))
        if penalized:
            shaped.append(outrider(penalized)[0])
        if seeded:
            noised.append(outrider(seeded)[0])
    verifier.release([req.kv for req in reqs])
    timer.close()
    o, b, s = statistics.median(ours), statistics.median(limit), statistics.median(same)
    row = {"context": context, "batch": BATCH, "gamma": GAMMA, "verify_pass_s": o, "bare_forward_s": b,
           "verify_over_bare": o / b, "bare_same_attention_s": s, "verify_over_bare_same_attention": o / s,
           "host_s_per_pass": statistics.median(host)}
    if shaped:
        row["penalized_pass_s"] = statistics.median(shaped)
        row["penalized_over_plain"] = row["penalized_pass_s"] / o
    if noised:
        row["coupled_pass_s"] = statistics.median(noised)
        row["coupled_over_plain"] = row["coupled_pass_s"] / o
    return row


@torch.inference_mode()
def acceptance_cost(target, draft, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Exact per-token acceptance probability sum_x min(p(x), q(x)) at every position
    of the prompts, with the full adjusted q and with the compact q drafters send."""
    full, sent, support = [], [], []
    for ids in prompts:
        x = torch.tensor([ids])
        p = adjusted_probs(target(x).logits[0], params)  # [T, V]
        q = adjusted_probs(draft(x).logits[0], params)
        for t in range(len(ids)):
            q_sent = compact(q[t])
            full.append(float(torch.minimum(p[t], q[t]).sum()))
            sent.append(float(torch.minimum(p[t], q_sent.dense()[0]).sum()))
            support.append(q_sent.ids.shape[-1])
    a, b = statistics.fmean(full), statistics.fmean(sent)
    return {"acceptance_full_q": a, "acceptance_sent_q": b, "acceptance_change": b - a,
            "support_tokens_mean": statistics.fmean(support), "support_tokens_max": max(support), "positions": len(full)}


def served_bytes(target, draft, params: SamplingParams, gamma: int, prompts: list[list[int]], max_new: int,
                 coupled: bool = False) -> dict:
    """Draft block bytes per round received by the verifier over loopback gRPC. Not
    coupled by default: rejection sampling, whose drafts carry their q (a seeded
    request is coupled, and its drafts carry none)."""
    from .loopback import Loopback  # gRPC and the services: not needed for the pass timings

    async def go():
        async with Loopback(target, draft, max_context=target.config.max_position_embeddings) as loop:
            out = []
            for i, prompt in enumerate(prompts):
                out.append(await loop.generate(prompt, max_new, SamplingParams(
                    temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=i, coupled=coupled),
                    gamma=gamma))
            return out

    runs = asyncio.run(go())
    rounds = sum(stats.rounds for _, stats in runs)
    drafted = sum(stats.drafted for _, stats in runs)
    draft_bytes = sum(stats.draft_bytes for _, stats in runs)
    return {"gamma": gamma, "rounds": rounds, "bytes_per_round": draft_bytes / rounds,
            "bytes_per_draft": draft_bytes / max(1, drafted),
            "acceptance_rate": sum(stats.accepted for _, stats in runs) / max(1, drafted)}


def run_scale(repeat: int, bundled_pair=None, bundled_prompts=(), on_row=print) -> dict:
    summary: dict = {"verify_pass": []}
    llama = use_lean_decoding(random_model("llama3"))  # as load_model serves a target
    for context in CONTEXTS:
        # At the longest context, also with penalties on every row (repetition, presence, frequency, a bias), and
        # with every row seeded (coupled).
        longest = context == CONTEXTS[-1]
        row = verify_pass(llama, context, repeat, penalties=Penalties(1.1, 0.2, 0.2, ((5, 1.0),)) if longest else None,
                          coupled=longest)
        on_row(f"  verify pass, batch {BATCH}, context {context}: {row['verify_pass_s'] * 1e3:.1f} ms vs bare "
               f"{row['bare_forward_s'] * 1e3:.1f} ms ({row['verify_over_bare']:.2f}x; with Outrider's attention "
               f"{row['bare_same_attention_s'] * 1e3:.1f} ms, {row['verify_over_bare_same_attention']:.2f}x), "
               f"host {row['host_s_per_pass'] * 1e3:.1f} ms")
        summary["verify_pass"].append(row)
    by_context = {row["context"]: row for row in summary["verify_pass"]}
    summary["verify_pass_vs_bare_b8_c4096"] = by_context[4096]["verify_over_bare"]
    summary["verify_pass_vs_bare_same_attention_b8_c4096"] = by_context[4096]["verify_over_bare_same_attention"]
    summary["pass_growth_256_to_4096"] = by_context[4096]["verify_pass_s"] / by_context[256]["verify_pass_s"]
    summary["bare_growth_256_to_4096"] = by_context[4096]["bare_forward_s"] / by_context[256]["bare_forward_s"]
    summary["penalized_over_plain_pass_b8_c4096"] = by_context[4096]["penalized_over_plain"]
    on_row(f"  verify pass with penalties, batch {BATCH}, context 4096: {by_context[4096]['penalized_pass_s'] * 1e3:.1f} ms "
           f"({summary['penalized_over_plain_pass_b8_c4096']:.3f}x the pass without, interleaved)")
    summary["coupled_over_plain_pass_b8_c4096"] = by_context[4096]["coupled_over_plain"]
    on_row(f"  verify pass with every row seeded (coupled), batch {BATCH}, context 4096: "
           f"{by_context[4096]['coupled_pass_s'] * 1e3:.1f} ms ({summary['coupled_over_plain_pass_b8_c4096']:.3f}x)")
    del llama

    target, draft = (use_lean_decoding(model) for model in random_pair("qwen2"))  # as served
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, target.config.vocab_size, (32,), generator=gen).tolist() for _ in range(4)]
    for name, params in (("topk50", SamplingParams(temperature=1.0, top_k=50)), ("t1", SamplingParams(temperature=1.0))):
        wire = served_bytes(target, draft, params, GAMMA, prompts, 48)
        cost = acceptance_cost(target, draft, prompts, params)
        summary[f"bytes_per_round_v151936_g8_{name}"] = wire["bytes_per_round"]
        summary[f"wire_v151936_g8_{name}"] = wire
        summary[f"wire_v151936_g8_{name}_coupled"] = served_bytes(target, draft, params, GAMMA, prompts, 48, coupled=True)
        summary[f"truncation_v151936_{name}"] = cost
        on_row(f"  V=151,936 gamma 8 {name}: {wire['bytes_per_round'] / 1024:.1f} KiB per round on the wire "
               f"(dense float32 q: {GAMMA * 151_936 * 4 / 2**20:.1f} MiB; seeded, coupled, no q: "
               f"{summary[f'wire_v151936_g8_{name}_coupled']['bytes_per_round']:.0f} bytes); per-token acceptance full q "
               f"{cost['acceptance_full_q']:.4f}, sent q {cost['acceptance_sent_q']:.4f} "
               f"(support {cost['support_tokens_mean']:.0f} tokens mean)")
        if bundled_pair is not None:
            cost = acceptance_cost(bundled_pair.target, bundled_pair.draft, bundled_prompts, params)
            summary[f"truncation_bundled_{name}"] = cost
            on_row(f"  bundled pair {name}: per-token acceptance full q {cost['acceptance_full_q']:.4f}, "
                   f"sent q {cost['acceptance_sent_q']:.4f} ({cost['acceptance_change']:+.4f})")
    return summary
