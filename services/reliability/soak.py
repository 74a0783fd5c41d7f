"""Soak and chaos against a running server (``outrider soak``).

S client streams run at once for M minutes, each drawing its next request from a fixed
set of cases: every method the server is asked to soak, greedy and seeded-sampled,
short and long; one stream in ten is cancelled right after its first chunk and one in
ten gets a one-second deadline. Every case first runs once undisturbed; its tokens are
the reference each later completion must equal (greedy and seeded output do not
depend on what shares a batch, or on which replica serves which round).

With chaos, a schedule (chaos.py) kills replicas and the session store, freezes whole
nodes and drops draft streams while the streams run. A stream then either completes
identical to the reference, or ends with UNAVAILABLE and a reason; anything else is
lost, a differing completion is corrupted, and a stream the server stopped serving
(its generous deadline passed) is hung. A seeded sampled stream is coupled
(services/core/coupling.py), so rounds that went on without drafts (no draft worker
answered) leave its tokens as they were, as for greedy. After the soak every deployment and the store
must hold no session, and each deployment's memory per replica is compared with its
level after warm-up.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from ..core.sampling import SamplingParams
from ..gateway.client import make_request
from .chaos import Chaos, deployment_memory, leftover_state

NORMAL, CANCEL, DEADLINE = "normal", "cancel", "deadline"


@dataclass(frozen=True)
class Case:
    prompt: str
    method: str
    params: SamplingParams
    max_new: int

    def request(self, request_id: str):
        return make_request(self.prompt, self.max_new, self.params, method=self.method, request_id=request_id)


def make_cases(prompts: list[str], methods: list[str], short: int = 16, long: int = 96) -> list[Case]:
    """Every method x (greedy, seeded T=0.8 top-k 50) x (short, long), over the prompts."""
    cases = []
    for i, (method, sampled, max_new) in enumerate(
            (m, s, n) for m in methods for s in (False, True) for n in (short, long)):
        params = SamplingParams(temperature=0.8, top_k=50, seed=1000 + i) if sampled else SamplingParams()
        cases.append(Case(prompts[i % len(prompts)], method, params, max_new))
    return cases


@dataclass
class Outcome:
    kind: str  # NORMAL | CANCEL | DEADLINE
    verdict: str  # identical | corrupted | unavailable | lost | hung | cancelled | deadline
    code: str  # the gRPC status the client saw (OK for a completion)
    seconds: float
    why: str = ""
    ended: float = 0.0  # when, since the soak started (set by the soak)
    capacity_retries: int = 0  # times it was refused at capacity and sent again after the hint


MAX_CAPACITY_RETRIES = 3
RETRY_HINT = re.compile(r"retry in about ([0-9.]+) s")


def run_stream(client, case: Case, kind: str, reference: list[int] | None, request_id: str,
               deadline_s: float) -> Outcome:
    """One stream, classified. ``reference``: the case's undisturbed tokens. Refused at
    capacity with a retry hint (RESOURCE_EXHAUSTED, the gateway's backpressure), it is
    sent again after the hint, as a client should, at most MAX_CAPACITY_RETRIES times:
    64 streams at a 64-session limit find now and then a slot that a cancelled
    session has not freed yet."""
    for retries in range(MAX_CAPACITY_RETRIES + 1):
        outcome = _one_stream(client, case, kind, reference, request_id, deadline_s)
        hint = RETRY_HINT.search(outcome.why) if outcome.code == "RESOURCE_EXHAUSTED" else None
        if hint is None or retries == MAX_CAPACITY_RETRIES:
            break
        time.sleep(float(hint.group(1)))
    outcome.capacity_retries = retries
    return outcome


def _one_stream(client, case: Case, kind: str, reference: list[int] | None, request_id: str,
                deadline_s: float) -> Outcome:
    start, tokens, final = time.monotonic(), [], None
    timeout = 1.0 if kind == DEADLINE else deadline_s
    try:
        stream = client.generate(case.request(request_id), timeout=timeout)
        for chunk in stream:
            if chunk.request_id != request_id:
                return Outcome(kind, "lost", "OK", time.monotonic() - start, f"echoed {chunk.request_id!r}")
            tokens += chunk.token_ids
            if chunk.HasField("stats"):
                final = chunk.stats
            if kind == CANCEL:
                stream.cancel()
    except grpc.RpcError as error:
        code, details, seconds = error.code(), error.details() or "", time.monotonic() - start
        if kind == CANCEL and code == grpc.StatusCode.CANCELLED:
            return Outcome(kind, "cancelled", code.name, seconds)
        if kind == DEADLINE and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Outcome(kind, "deadline", code.name, seconds)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # a generous deadline: the server stopped serving it
            return Outcome(kind, "hung", code.name, seconds, details)
        if code == grpc.StatusCode.UNAVAILABLE and details:
            return Outcome(kind, "unavailable", code.name, seconds, details)
        return Outcome(kind, "lost", code.name, seconds, details or "no reason given")
    seconds = time.monotonic() - start
    if final is None:
        return Outcome(kind, "lost", "OK", seconds, "the stream ended without its final stats")
    if reference is not None and tokens != reference:
        at = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
        return Outcome(kind, "corrupted", "OK", seconds, f"{case.method} {'greedy' if case.params.greedy else 'sampled'}: "
                       f"{len(tokens)} tokens, the first of them to differ from the undisturbed run's "
                       f"{len(reference)} is #{at}")
    return Outcome(kind, "identical", "OK", seconds)


@dataclass
class SoakReport:
    outcomes: list[Outcome] = field(default_factory=list)
    chaos: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)  # {"t": s, deployment: MiB per replica}
    leftover: dict = field(default_factory=dict)
    seconds: float = 0.0
    warmup_s: float = 0.0  # memory is compared from the first sample this far into the load

    def memory_growth_ratio(self) -> float | None:
        """The largest end / after-warm-up ratio of a deployment's memory per replica.
        Warm-up includes the load's first minutes: the verifier's working set for S
        streams is reached under load, not by the undisturbed reference runs."""
        warm = [m for m in self.memory if m["t"] >= self.warmup_s]
        if len(warm) < 2:
            return None
        first, last = warm[0], warm[-1]
        ratios = [last[d] / first[d] for d in first if d != "t" and first[d] and last.get(d)]
        return max(ratios) if ratios else None

    def as_json(self) -> dict:
        verdicts = Counter(o.verdict for o in self.outcomes)
        latencies = sorted(o.seconds for o in self.outcomes if o.verdict == "identical")

        def pct(q: float) -> float | None:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

        return {
            "streams": len(self.outcomes), "lost": verdicts["lost"], "corrupted": verdicts["corrupted"],
            "hung": verdicts["hung"], "memory_growth_ratio": self.memory_growth_ratio(),
            "capacity_retries": sum(o.capacity_retries for o in self.outcomes),
            "verdicts": dict(verdicts), "by_code": dict(Counter(o.code for o in self.outcomes)),
            "by_kind": dict(Counter(o.kind for o in self.outcomes)),
            "completed_p50_s": pct(0.5), "completed_p99_s": pct(0.99), "seconds": self.seconds,
            "chaos": self.chaos, "memory_mib_per_replica": self.memory, "memory_warmup_s": self.warmup_s,
            "leftover": self.leftover,
            "failures": [o.__dict__ for o in self.outcomes if o.verdict in ("lost", "corrupted", "hung")][:50],
        }


def references(client, cases: list[Case], deadline_s: float, workers: int) -> list[list[int]]:
    """Each case's tokens, undisturbed (no chaos yet)."""
    def one(case: Case) -> list[int]:
        tokens = []
        for chunk in client.generate(case.request("reference"), timeout=deadline_s):
            tokens += chunk.token_ids
        return tokens

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, cases))


def soak(client, cases: list[Case], streams: int, seconds: float, ray_address: str | None, chaos_every_s: float = 0.0,
         freeze_s: float = 10.0, deadline_s: float = 600.0, seed: int = 0, sample_every_s: float | None = None,
         on_outcome=lambda o: None) -> SoakReport:
    """``chaos_every_s`` > 0 runs the chaos schedule at that period (needs ``ray_address``);
    memory and leftovers are read through Ray when ``ray_address`` is given, memory every
    ``sample_every_s`` (default: 30 s, and 8 samples at least in a short soak)."""
    if sample_every_s is None:
        sample_every_s = min(30.0, max(1.0, seconds / 8))
    report = SoakReport(warmup_s=min(120.0, seconds / 4))
    refs = references(client, cases, deadline_s, min(streams, 8))
    chaos = Chaos(ray_address, freeze_s) if chaos_every_s > 0 else None
    start, lock = time.monotonic(), threading.Lock()
    end = start + seconds
    if ray_address:
        report.memory.append({"t": 0.0, **deployment_memory(ray_address)})

    def worker(w: int) -> None:
        rng, n = random.Random(seed * 1000 + w), 0
        while time.monotonic() < end:
            roll = rng.random()
            kind = CANCEL if roll < 0.1 else DEADLINE if roll < 0.2 else NORMAL
            index = rng.randrange(len(cases))
            outcome = run_stream(client, cases[index], kind, refs[index] if kind != CANCEL else None,
                                 f"soak-{w}-{n}", deadline_s)
            n += 1
            outcome.ended = round(time.monotonic() - start, 1)
            with lock:
                report.outcomes.append(outcome)
            on_outcome(outcome)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(streams)]
    for thread in threads:
        thread.start()
    next_chaos, next_sample = start + chaos_every_s, start + sample_every_s
    try:
        while any(t.is_alive() for t in threads):
            now = time.monotonic()
            if chaos and now >= next_chaos and now < end:
                report.chaos.append({"t": round(now - start, 1), **chaos.next_event()})
                next_chaos = time.monotonic() + chaos_every_s
            if ray_address and now >= next_sample:
                report.memory.append({"t": round(now - start, 1), **deployment_memory(ray_address)})
                next_sample = now + sample_every_s
            time.sleep(0.5)
    finally:
        if chaos:
            chaos.close()
    if ray_address:
        report.memory.append({"t": round(time.monotonic() - start, 1), **deployment_memory(ray_address)})
        report.leftover = leftover_state(ray_address)
    report.seconds = time.monotonic() - start
    return report
