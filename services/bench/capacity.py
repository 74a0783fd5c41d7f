"""The capacity planner behind ``outrider capacity``: replicas, latency and the binding
resource for a load, from a profile ``outrider bench --profile`` measured on the
replicas' own hardware (services/bench/profile.py).

The model is the goodput controller's (core/goodput.py), fitted to the profile:
  T(B, g) = a + m*B + b*B(g+1)   verify pass over B sessions of g drafts: each session
                                 costs on its own (its KV, its acceptance), and each position
  s(r) = c + e*r                 one batched draft step over r sessions
  o(B) = u + v*B                 what serving adds to a round of B sessions (gateway,
                                 Serve's proxy, streaming), measured through the API
  E(g) = 1 + sum_k<=g P(a >= k)  tokens a round commits; P(a >= k) the measured share of
                                 rounds that accepted draft k, alpha^k past the deepest
  round(B, g) = T(B, g) + o(B) + exposed draft + hop + r(B)
  r(B) = u' + v'*B, B > 1        what a drafting round of several sessions costs served
                                 beyond all of the above: a served speculative round
                                 (measured through the API at two or more levels of two
                                 streams or more) less the model's at the drafts it tested.
                                 Sessions fall out of step (more, smaller passes), and on one
                                 machine the processes share the cores. r(1) = 0: a lone
                                 session has no one to fall out of step with.
Where served speculative was measured, the drafts and tokens a round are the ones the
replicas' goodput controller chose there (interpolated in B), not the model's best gamma.
The draft of round k+1 runs while round k verifies (pipelining), but only a block
drafted for the outcome that happened can be used: in the measured share h of rounds
(the pipeline hit rate) only what drafting takes beyond the pass is exposed,
max(0, D - T) with D = g*s(B); in the others the worker drafts again once it hears the
outcome, and all of D is exposed. Where the draft workers share the verifier's hardware
(one machine), they draft during every pass, and the profile's measured share x of the
shorter of the two is exposed too, + x*min(D, T). Gamma 0 has no draft and no hop. A
verifier replica running B sessions commits B*E(g)/round(B, g) tokens/s, each session
at TPOT round(B, g)/E(g). A request of O tokens takes TTFT(B) + (O-1)/E(g) * round(B, g):
its first chunk waits for the first round.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..core.gamma import MAX_GAMMA
from ..core.goodput import expected_tokens, fit_line

LINK_BYTES_S = 10e9 / 8  # a 10 Gbit/s link between draft and verifier nodes
OBJECT_STORE_BYTES = 8 * 2**30  # Ray's object store on the head node


def fit_pass(rows: list[dict]) -> tuple[float, float, float]:
    """Least squares (a, m, b) of T(B, g) = a + m*B + b*B(g+1) over the profile's passes,
    no coefficient below 0: a term that fits negative is dropped and the rest refitted."""
    X = np.array([[1.0, r["batch"], r["positions"]] for r in rows])
    y = np.array([r["seconds"] for r in rows])
    keep = [0, 1, 2]
    while True:
        coef = np.zeros(3)
        coef[keep] = np.linalg.lstsq(X[:, keep], y, rcond=None)[0]
        negative = [k for k in keep if coef[k] < 0]
        if not negative:
            return tuple(float(c) for c in coef)
        keep.remove(min(negative, key=lambda k: coef[k]))


@dataclass(frozen=True)
class Model:
    verify: tuple[float, float, float]  # (a, m, b): T(B, g) seconds
    step: tuple[float, float]  # (c, e): s(r) seconds
    prefill_s_per_token: float
    alpha: float
    hop_s: float  # transport a drafting round
    bytes_per_round: float
    draft_kv_bytes_per_token: float = 0.0  # a session's saved draft KV chunks (object store)
    max_batch: int = 16
    prompt_tokens: int = 1
    accept: tuple[float, ...] = ()  # P(a >= k) for k = 1, 2, ...: drafts accepted at each depth
    service: tuple[float, float] = (0.0, 0.0)  # (u, v): o(B) seconds a round; zero without a served profile
    ttft: tuple[float, float] | None = None  # served target-only time to first token, p + q*B seconds
    max_gamma: int = MAX_GAMMA  # the clients' ceiling (Speculation.gamma)
    exposed: float = 0.0  # share of the draft steps not hidden under the pass they overlap (0 on separate nodes)
    hit_rate: float = 1.0  # rounds whose next block was drafted early for their outcome (1 where unmeasured)
    # (u', v'): r(B) seconds a drafting round takes beyond the model's, measured served; zero unmeasured
    speculative_service: tuple[float, float] = (0.0, 0.0)
    # (batch, drafts a round, tokens a round) where served speculative was measured: what
    # the replicas' goodput controller chose there, in place of the model's best gamma
    served_points: tuple[tuple[float, float, float], ...] = ()

    @classmethod
    def from_profile(cls, profile: dict, max_batch: int = 16, shared: bool = False, max_gamma: int = MAX_GAMMA) -> "Model":
        """``shared``: draft workers run on the verifiers' hardware, which slows both by
        the profile's measured ``colocated_overlap`` (all of it, 1.0, where unmeasured)."""
        verify = fit_pass(profile["verify_pass"])
        step = fit_line([r["rows"] for r in profile["draft_step"]], [r["seconds"] for r in profile["draft_step"]])
        model = cls(verify, step, profile["prefill_s"] / profile["prompt_tokens"], min(profile["alpha"], 0.999),
                    profile["transport_s_per_round"], profile["bytes_per_round"],
                    profile.get("draft_kv_bytes_per_token", 0.0), max_batch, profile["prompt_tokens"],
                    tuple(min(p, 0.999) for p in profile.get("acceptance_per_position", ())),
                    max_gamma=max_gamma, exposed=profile.get("colocated_overlap", 1.0) if shared else 0.0,
                    hit_rate=profile.get("pipeline_hit_rate", 1.0))
        served = profile.get("served")
        if not served:
            return model
        # o(B): the served target-only round (one token) less the pass the profile timed,
        # the round solved from the level's tokens/s as for speculative levels below
        # (older profiles: its median seconds a token).
        ttft = fit_line([r["streams"] for r in served], [r["ttft_s"] for r in served])
        model = dataclasses.replace(model, ttft=ttft)
        batches = [min(r["streams"], max_batch) for r in served]
        rounds = [model.served_round_s({**r, "tokens_per_round": 1.0}) if "tokens_per_s" in r
                  else r["token_s"] / math.ceil(r["streams"] / max_batch) for r in served]
        # Not clamped: where the fitted pass is above a level's served round, o there is
        # negative, and the served target-only round is still what was measured.
        extra = [t - model.pass_s(b, 0) for b, t in zip(batches, rounds)]
        overhead = tuple(float(c) for c in np.polyfit(batches, extra, 1)[::-1]) if len(set(batches)) > 1 \
            else (float(np.mean(extra)), 0.0)
        model = dataclasses.replace(model, service=overhead)
        spec = profile.get("served_speculative")
        if not spec:
            return model
        # r(B): the served speculative round, less the model's round at the drafts it
        # tested. The round is solved from the level's tokens/s by the planner's own
        # formula for whole requests (streams_tokens_per_s), so that the model gives back
        # what was measured there: sessions that finish early (speculative requests run
        # unevenly) and the longer first token are in it.
        batches = [min(r["streams"], max_batch) for r in spec]
        # The controller's choices hold for the clients' ceiling they were measured under.
        points = tuple(sorted((b, r["drafted_per_round"], r["tokens_per_round"]) for b, r in zip(batches, spec))) \
            if max_gamma == profile.get("gamma") else ()
        # A lone session cannot fall out of step with others: r(1) = 0, and levels of
        # one stream say nothing of r.
        several = [(b, r) for b, r in zip(batches, spec) if b > 1]
        if not several:
            return dataclasses.replace(model, served_points=points)
        xs = [b for b, _ in several]
        extra = [model.served_round_s(r) - model.round_s(b, r["drafted_per_round"]) for b, r in several]
        missed = tuple(float(c) for c in np.polyfit(xs, extra, 1)[::-1]) if len(set(xs)) > 1 \
            else (float(np.mean(extra)), 0.0)
        return dataclasses.replace(model, speculative_service=missed, served_points=points)

    def served_round_s(self, level: dict) -> float:
        """The round of a served level that makes ``streams_tokens_per_s`` give its
        measured tokens/s, at its measured tokens a round."""
        n, out, per_round = level["streams"], level["output_tokens"], level["tokens_per_round"]
        request_s = n * out / level["tokens_per_s"]
        passes = math.ceil(n / self.max_batch)
        return (request_s - self.first_token_s(n)) * per_round / max(1.0, out - 1) / passes

    def pass_s(self, batch: float, gamma: int) -> float:
        return self.verify[0] + self.verify[1] * batch + self.verify[2] * batch * (gamma + 1)

    def tokens_per_round(self, gamma: int) -> float:
        if not self.accept:
            return expected_tokens(self.alpha, gamma)
        total, reach = 1.0, 1.0  # reach: P(a >= k), never rising with k
        for k in range(gamma):
            reach = min(reach, self.accept[k]) if k < len(self.accept) else reach * self.alpha
            total += reach
        return total

    def round_s(self, batch: int, gamma: int) -> float:
        verify = self.pass_s(batch, gamma)
        served = max(1e-6, verify + self.service[0] + self.service[1] * batch)
        if gamma == 0:
            return served
        draft = gamma * (self.step[0] + self.step[1] * batch)
        # A hit hides the draft under the pass (the longer of the two sets the round); a
        # miss drafts again after it. Sharing hardware, a share of the shorter adds to both.
        exposed = self.hit_rate * max(0.0, draft - verify) + (1 - self.hit_rate) * draft
        missed = self.speculative_service[0] + self.speculative_service[1] * batch if batch > 1 else 0.0
        return served + exposed + self.exposed * min(draft, verify) + self.hop_s + missed

    def first_token_s(self, streams: int) -> float:
        """Target-only time to first token with ``streams`` arriving at once: served as
        measured, else the prefills of a batch one after another."""
        if self.ttft is not None:
            return self.ttft[0] + self.ttft[1] * streams
        return self.prefill_s_per_token * self.prompt_tokens * min(streams, self.max_batch)

    def best_gamma(self, batch: int) -> int:
        """The goodput controller's choice at this batch, by the model."""
        return max(range(self.max_gamma + 1), key=lambda g: self.tokens_per_round(g) / self.round_s(batch, g))

    def operating_point(self, batch: int) -> tuple[float, float]:
        """(drafts a round, tokens a round) of B speculative sessions: where served
        speculative was measured, what the controller chose there (interpolated in B,
        held past the ends; it plans from its own measurements, which the model only
        approximates), else the model's best gamma."""
        if self.served_points:
            b, g, e = zip(*self.served_points)
            return float(np.interp(batch, b, g)), float(np.interp(batch, b, e))
        gamma = self.best_gamma(batch)
        return gamma, self.tokens_per_round(gamma)

    def streams_tokens_per_s(self, streams: int, speculative: bool = True, output_tokens: int | None = None) -> float:
        """Tokens/s of ``streams`` concurrent sessions on one verifier and one draft
        worker: ceil(streams / max_batch) passes make a round of every session. With
        ``output_tokens``, requests of that length back to back, first tokens included."""
        batch = min(streams, self.max_batch)
        passes = math.ceil(streams / self.max_batch)
        gamma, per_round = self.operating_point(batch) if speculative else (0, 1.0)
        round_s = passes * self.round_s(batch, gamma)
        if output_tokens is None:
            return streams * per_round / round_s
        return streams * output_tokens / (self.first_token_s(streams) + (output_tokens - 1) / per_round * round_s)


def plan(model: Model, rps: float, tpot_s: float, prompt_tokens: int, output_tokens: int,
         link_bytes_s: float = LINK_BYTES_S, object_store_bytes: float = OBJECT_STORE_BYTES) -> dict:
    """Replicas for ``rps`` requests/s of ``prompt_tokens`` in and ``output_tokens`` out,
    each token at most ``tpot_s`` apart on average."""
    options = []
    for batch in range(1, model.max_batch + 1):
        gamma, per_round = model.operating_point(batch)
        tpot = model.round_s(batch, gamma) / per_round
        if tpot <= tpot_s:
            options.append((batch * per_round / model.round_s(batch, gamma), batch, gamma, tpot))
    if not options:
        fastest = min(model.round_s(1, g) / model.tokens_per_round(g) for g in range(model.max_gamma + 1))
        raise ValueError(f"a TPOT of {tpot_s * 1e3:.1f} ms is out of reach here: one session alone gets "
                         f"{fastest * 1e3:.1f} ms at best")
    per_replica, batch, gamma, tpot = max(options)
    prefill_s = model.prefill_s_per_token * prompt_tokens
    if model.ttft is not None:  # served target-only, measured; a speculative first chunk waits a round
        ttft = model.first_token_s(batch) + (model.round_s(batch, gamma) if gamma else 0.0)
    else:
        ttft = prefill_s + model.round_s(batch, gamma)
    decode_tokens_s = rps * output_tokens
    # Replica-seconds per second: decoding at the chosen batch, plus every prefill.
    verifiers = math.ceil(decode_tokens_s / per_replica + rps * prefill_s)
    sessions = rps * (ttft + output_tokens * tpot)  # Little's law: sessions open at once
    # A draft worker keeps a session's draft hidden while gamma steps over all its
    # sessions take no longer than the pass they overlap.
    window = model.pass_s(batch, gamma)
    rows = max((r for r in range(1, 257) if gamma * (model.step[0] + model.step[1] * r) <= window), default=1)
    drafters = math.ceil(sessions / rows) if gamma else 0
    rounds_s = decode_tokens_s / model.operating_point(batch)[1]
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
