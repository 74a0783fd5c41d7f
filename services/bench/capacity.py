"""The capacity planner behind ``outrider capacity``: replicas, latency and the binding
resource for a load, from a profile ``outrider bench --profile`` measured on the
replicas' own hardware (services/bench/profile.py).

The model is the goodput controller's (core/goodput.py), fitted to the profile:
  T(n) = a + b*n                 verify pass over n positions (batch x (gamma+1))
  s(r) = c + e*r                 one batched draft step over r sessions
  E(g) = (1 - alpha^(g+1)) / (1 - alpha)   tokens a round commits
  round(B, g) = T(B(g+1)) + max(0, g*s(B) - T(B(g+1))) + hop
The draft of round k+1 runs while round k verifies (pipelining): only what it takes
beyond the pass is exposed; gamma 0 has no draft and no hop. A verifier replica running
B sessions commits B*E(g)/round(B, g) tokens/s, each session at TPOT round(B, g)/E(g).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.gamma import MAX_GAMMA
from ..core.goodput import expected_tokens, fit_line

LINK_BYTES_S = 10e9 / 8  # a 10 Gbit/s link between draft and verifier nodes
OBJECT_STORE_BYTES = 8 * 2**30  # Ray's object store on the head node


@dataclass(frozen=True)
class Model:
    verify: tuple[float, float]  # (a, b): T(n) seconds
    step: tuple[float, float]  # (c, e): s(r) seconds
    prefill_s_per_token: float
    alpha: float
    hop_s: float  # transport a drafting round
    bytes_per_round: float
    draft_kv_bytes_per_token: float = 0.0  # a session's saved draft KV chunks (object store)
    max_batch: int = 16

    @classmethod
    def from_profile(cls, profile: dict, max_batch: int = 16) -> "Model":
        verify = fit_line([r["positions"] for r in profile["verify_pass"]], [r["seconds"] for r in profile["verify_pass"]])
        step = fit_line([r["rows"] for r in profile["draft_step"]], [r["seconds"] for r in profile["draft_step"]])
        return cls(verify, step, profile["prefill_s"] / profile["prompt_tokens"], min(profile["alpha"], 0.999),
                   profile["transport_s_per_round"], profile["bytes_per_round"],
                   profile.get("draft_kv_bytes_per_token", 0.0), max_batch)

    def pass_s(self, positions: float) -> float:
        return self.verify[0] + self.verify[1] * positions

    def tokens_per_round(self, gamma: int) -> float:
        return expected_tokens(self.alpha, gamma)

    def round_s(self, batch: int, gamma: int) -> float:
        verify = self.pass_s(batch * (gamma + 1))
        if gamma == 0:
            return verify
        draft = gamma * (self.step[0] + self.step[1] * batch)
        return verify + max(0.0, draft - verify) + self.hop_s

    def best_gamma(self, batch: int) -> int:
        """The goodput controller's choice at this batch."""
        return max(range(MAX_GAMMA + 1), key=lambda g: self.tokens_per_round(g) / self.round_s(batch, g))

    def streams_tokens_per_s(self, streams: int, speculative: bool = True) -> float:
        """Tokens/s of ``streams`` concurrent sessions on one verifier and one draft
        worker: ceil(streams / max_batch) passes make a round of every session."""
        batch = min(streams, self.max_batch)
        passes = math.ceil(streams / self.max_batch)
        gamma = self.best_gamma(batch) if speculative else 0
        return streams * self.tokens_per_round(gamma) / (passes * self.round_s(batch, gamma))


def plan(model: Model, rps: float, tpot_s: float, prompt_tokens: int, output_tokens: int,
         link_bytes_s: float = LINK_BYTES_S, object_store_bytes: float = OBJECT_STORE_BYTES) -> dict:
    """Replicas for ``rps`` requests/s of ``prompt_tokens`` in and ``output_tokens`` out,
    each token at most ``tpot_s`` apart on average."""
    options = []
    for batch in range(1, model.max_batch + 1):
        gamma = model.best_gamma(batch)
        tpot = model.round_s(batch, gamma) / model.tokens_per_round(gamma)
        if tpot <= tpot_s:
            options.append((batch * model.tokens_per_round(gamma) / model.round_s(batch, gamma), batch, gamma, tpot))
    if not options:
        fastest = min(model.round_s(1, g) / model.tokens_per_round(g) for g in range(MAX_GAMMA + 1))
        raise ValueError(f"a TPOT of {tpot_s * 1e3:.1f} ms is out of reach here: one session alone gets "
                         f"{fastest * 1e3:.1f} ms at best")
    per_replica, batch, gamma, tpot = max(options)
    prefill_s = model.prefill_s_per_token * prompt_tokens
    ttft = prefill_s + model.round_s(batch, gamma)
    decode_tokens_s = rps * output_tokens
    # Replica-seconds per second: decoding at the chosen batch, plus every prefill.
    verifiers = math.ceil(decode_tokens_s / per_replica + rps * prefill_s)
    sessions = rps * (ttft + output_tokens * tpot)  # Little's law: sessions open at once
    # A draft worker keeps a session's draft hidden while gamma steps over all its
    # sessions take no longer than the pass they overlap.
    window = model.pass_s(batch * (gamma + 1))
    rows = max((r for r in range(1, 257) if gamma * (model.step[0] + model.step[1] * r) <= window), default=1)
    drafters = math.ceil(sessions / rows) if gamma else 0
    rounds_s = decode_tokens_s / model.tokens_per_round(gamma)
    network = rounds_s * model.bytes_per_round if gamma else 0.0
    stored = sessions * (prompt_tokens + output_tokens) * model.draft_kv_bytes_per_token if gamma else 0.0
    use = {"target compute": (decode_tokens_s / per_replica + rps * prefill_s) / verifiers,
           "drafter compute": sessions / (drafters * rows) if drafters else 0.0,
           "network": network / (link_bytes_s * max(1, verifiers)),
           "object store": stored / object_store_bytes}
    return {
        "verifier_replicas": verifiers, "draft_replicas": drafters, "batch_per_verifier": batch, "gamma": gamma,
        "expected_tpot_s": tpot, "expected_ttft_s": ttft, "sessions_open": sessions,
        "sessions_per_draft_replica": rows, "tokens_per_s_per_verifier": per_replica,
        "network_bytes_per_s": network, "object_store_bytes": stored, "utilization": use, "binds_first": max(use, key=use.get),
    }
