"""Fuzzing the public API: random and adversarial GenerateRequests, each checked
against the status the documented contract allows (README "Errors", outrider.proto).

Requests come from hypothesis strategies (every field, including NaN and infinite
floats, out-of-range token ids, unknown enum values, malformed trees, unicode ids),
run as a hypothesis test so the examples explore the edges rather than the middle.
``expected`` is an oracle written from the documentation, independent of the
gateway's code: where validity depends on the server's configuration (its vocabulary,
context, heads), both OK and INVALID_ARGUMENT are allowed. Never allowed: INTERNAL,
UNKNOWN, UNAVAILABLE, a hang (DEADLINE_EXCEEDED), a non-OK status without a reason, or
an OK stream that breaks the stream contract.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from ..rpc import outrider_pb2

OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_GAMMA = 16  # Speculation.gamma's documented range is [1, 16] (0: the default)
KNOWN_METHODS = range(0, 7)
HEAD_METHODS = (4, 5, 6)  # MEDUSA, MTP, EAGLE: served only where the heads are loaded
SMALL_VOCAB = 256  # every served model's vocabulary is larger
LARGEST_VOCAB = 2**22  # and every one is smaller
NEVER_FITS = 10**7  # no model's context holds this many tokens
MAX_STOPS, MAX_STOP_CHARS, MAX_LOGPROBS, MAX_SAMPLES = 16, 256, 20, 8  # outrider.proto's documented limits


@dataclass
class Expected:
    codes: frozenset
    why: str


def expected(req: outrider_pb2.GenerateRequest) -> Expected:
    """The statuses the contract allows for ``req``."""
    sampling, spec = req.sampling, req.speculation
    kind = req.WhichOneof("prompt")
    ids = list(req.token_ids.ids) if kind == "token_ids" else []
    definite = []  # reasons the request is certainly invalid
    maybe = []  # reasons it may be, depending on the server
    if kind is None or (kind == "text" and not req.text) or (kind == "token_ids" and not ids):
        definite.append("empty prompt")
    if any(t < 0 or t >= LARGEST_VOCAB for t in ids):
        definite.append("token id outside any vocabulary")
    elif any(t >= SMALL_VOCAB for t in ids):
        maybe.append("token id maybe outside the vocabulary")
    if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
        definite.append("temperature not a finite number >= 0")
    if sampling.HasField("top_p") and not (0 < sampling.top_p <= 1):
        definite.append("top_p outside (0, 1]")
    if spec.gamma > MAX_GAMMA:
        definite.append("gamma over 16")
    if spec.method not in KNOWN_METHODS:
        definite.append("unknown method")
    elif spec.method in HEAD_METHODS:
        maybe.append("heads maybe not served, or a tree they cannot draft")
    elif spec.tree:
        definite.append("a tree without a tree method")
    stop = req.stop
    if len(stop.sequences) > MAX_STOPS or any(not 0 < len(x) <= MAX_STOP_CHARS for x in stop.sequences):
        definite.append("stop strings over the limits")
    named = list(stop.token_ids) + list(sampling.logit_bias)  # token ids the request names besides the prompt
    if any(t < 0 or t >= LARGEST_VOCAB for t in named):
        definite.append("a stop token or biased token outside any vocabulary")
    elif any(t >= SMALL_VOCAB for t in named):
        maybe.append("a stop token or biased token maybe outside the vocabulary")
    if req.max_new_tokens and stop.min_tokens > req.max_new_tokens:
        definite.append("min_tokens over max_new_tokens")
    elif stop.min_tokens > 8:
        maybe.append("min_tokens maybe over the server's default max_new_tokens")
    if req.HasField("logprobs") and req.logprobs > MAX_LOGPROBS:
        definite.append("logprobs over 20")
    if req.n > MAX_SAMPLES:
        maybe.append("n over this server's max_samples, maybe")
    if sampling.HasField("repetition_penalty") and not (0 < sampling.repetition_penalty < math.inf):
        definite.append("repetition_penalty not a finite number > 0")
    if not all(-2 <= v <= 2 for v in (sampling.presence_penalty, sampling.frequency_penalty)):
        definite.append("presence or frequency penalty outside [-2, 2]")
    if not all(-100 <= v <= 100 for v in sampling.logit_bias.values()):
        definite.append("a logit bias outside [-100, 100]")
    if req.max_new_tokens >= NEVER_FITS:
        definite.append("max_new_tokens past any context")
    elif req.max_new_tokens > 128 or len(ids) > 128 or len(req.text.encode()) > 128:
        maybe.append("past this server's limits, maybe")
    if definite:
        return Expected(frozenset({INVALID}), "; ".join(definite))
    if maybe:
        return Expected(frozenset({OK, INVALID, EXHAUSTED}), "; ".join(maybe))
    return Expected(frozenset({OK}), "valid")


def _floats32(**kwargs):
    return st.floats(width=32, **kwargs)


def requests() -> st.SearchStrategy:
    """GenerateRequests: half valid, half with each field drawn from valid or
    adversarial values independently (so one bad field at a time is common)."""
    u32 = st.integers(0, 2**32 - 1)
    fields = {  # field: (valid values, adversarial ones)
        "text": (st.sampled_from(["def f():", "import os", "class A:\n    ", "🙂 hello"]),
                 st.one_of(st.text(max_size=120), st.sampled_from(["", " ", "\x00", "🙂" * 40, "\ud7ff\ue000"]))),
        "token_ids": (st.lists(st.integers(0, SMALL_VOCAB - 1), min_size=1, max_size=24),
                      st.lists(st.one_of(st.integers(0, 600), st.integers(-2**63, 2**63 - 1), st.sampled_from(
                          [-1, 0, SMALL_VOCAB, 8191, 8192, 151_935, 151_936, 2**31])), max_size=48)),
        "max_new_tokens": (st.integers(1, 8), st.one_of(st.integers(0, 12), st.sampled_from([2**32 - 1, NEVER_FITS, 4096]))),
        "temperature": (st.sampled_from([0.0, 0.0, 0.7, 1.0, 1e-38]),
                        st.one_of(_floats32(allow_nan=True), st.sampled_from([1e-45, -0.0, -1.0, float("inf")]))),
        "top_k": (st.integers(0, 50), st.one_of(st.integers(0, 50), u32)),
        "top_p": (st.sampled_from([None, 1.0, 0.9, 0.5]),
                  st.one_of(st.none(), _floats32(allow_nan=True), st.sampled_from([1e-30, 0.0, 1.0000001, -1.0]))),
        "seed": (st.one_of(st.none(), st.integers(0, 2**64 - 1)), st.one_of(st.none(), st.integers(0, 2**64 - 1))),
        "method": (st.integers(0, 3), st.one_of(st.integers(0, 6), st.integers(7, 2**31 - 1))),
        "gamma": (st.integers(0, MAX_GAMMA), st.one_of(st.integers(0, 20), u32)),
        "tree": (st.just(""), st.one_of(st.just(""), st.text(max_size=24), st.sampled_from(
            ["0;1;0.0", "5,2,8", "4,1,4", "0;x", "9" * 30, ",,", "0.0.0.0.0.0.0.0.0.0"]))),
        "request_id": (st.text(max_size=64), st.text(max_size=64)),
        "stops": (st.lists(st.sampled_from(["\n\n", "return", "é", ")"]), max_size=3),
                  st.lists(st.text(max_size=300), max_size=20)),
        "stop_token_ids": (st.lists(st.integers(0, SMALL_VOCAB - 1), max_size=3),
                           st.lists(st.integers(-2**63, 2**63 - 1), max_size=4)),
        "min_tokens": (st.integers(0, 2), st.one_of(st.integers(0, 20), u32)),
        "logprobs": (st.one_of(st.none(), st.integers(0, 5)), st.one_of(st.none(), st.integers(0, 30), u32)),
        "n": (st.integers(0, 3), st.one_of(st.integers(0, 10), u32)),
        "penalty": (st.sampled_from([0.0, 0.5, -0.5]), st.one_of(_floats32(allow_nan=True), st.sampled_from([2.0001, -3.0]))),
        "repetition": (st.sampled_from([None, 1.0, 1.2]),
                       st.one_of(st.none(), _floats32(allow_nan=True), st.sampled_from([0.0, -1.0, 1e-30]))),
        "logit_bias": (st.dictionaries(st.integers(0, SMALL_VOCAB - 1), st.floats(-100, 100), max_size=3),
                       st.dictionaries(st.integers(-2**63, 2**63 - 1), _floats32(allow_nan=True), max_size=3)),
    }

    @st.composite
    def build(draw, adversarial: bool) -> outrider_pb2.GenerateRequest:
        def value(name):
            valid, bad = fields[name]
            return draw(bad if adversarial and draw(st.booleans()) else valid)

        req = outrider_pb2.GenerateRequest(request_id=value("request_id"))
        prompt = draw(st.sampled_from(["text", "token_ids", "none"] if adversarial else ["text", "token_ids"]))
        if prompt == "text":
            req.text = value("text")
        elif prompt == "token_ids":
            req.token_ids.ids.extend(value("token_ids"))
        req.max_new_tokens = value("max_new_tokens")
        req.sampling.temperature = value("temperature")
        req.sampling.top_k = value("top_k")
        if (p := value("top_p")) is not None:
            req.sampling.top_p = p
        if (seed := value("seed")) is not None:
            req.sampling.seed = seed
        req.speculation.method = value("method")
        req.speculation.gamma = value("gamma")
        req.speculation.adaptive = draw(st.booleans())
        if (pipeline := draw(st.one_of(st.none(), st.booleans()))) is not None:
            req.speculation.pipeline = pipeline
        req.speculation.tree = value("tree")
        req.stop.sequences.extend(value("stops"))
        req.stop.token_ids.extend(value("stop_token_ids"))
        req.stop.min_tokens = value("min_tokens")
        req.stop.ignore_eos = draw(st.booleans())
        if (logprobs := value("logprobs")) is not None:
            req.logprobs = logprobs
        if (n := value("n")) and n < 2**31:
            req.n = n
        req.sampling.presence_penalty = value("penalty")
        req.sampling.frequency_penalty = value("penalty")
        if (repetition := value("repetition")) is not None:
            req.sampling.repetition_penalty = repetition
        req.sampling.logit_bias.update(value("logit_bias"))
        return req

    return st.one_of(build(False), build(True))


@dataclass
class FuzzReport:
    requests: int = 0
    wrong_status: int = 0
    by_code: Counter = field(default_factory=Counter)
    wrong: list[dict] = field(default_factory=list)  # the first few, with why
    seconds: float = 0.0

    def as_json(self, replica_restarts: int | None) -> dict:
        return {"requests": self.requests, "wrong_status": self.wrong_status, "replica_restarts": replica_restarts,
                "seconds": round(self.seconds, 1), "by_code": dict(self.by_code), "wrong": self.wrong}


def check(client, req: outrider_pb2.GenerateRequest, timeout: float) -> tuple[grpc.StatusCode, str | None]:
    """Send ``req`` as a stream; (its status, what is wrong with it or None)."""
    want = expected(req)
    code, details, chunks = OK, "", []
    try:
        chunks = list(client.generate(req, timeout=timeout))
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    if code not in want.codes:
        return code, f"{code.name} where {'/'.join(sorted(c.name for c in want.codes))} ({want.why}): {details[:300]}"
    if code != OK:
        return code, None if details.strip() else f"{code.name} without a reason"
    finals = {c.index: c.stats for c in chunks if c.HasField("stats")}
    if not chunks or not chunks[-1].HasField("stats") or sorted(finals) != list(range(max(req.n, 1))):
        return code, "an OK stream without every sample's final stats"
    limit = req.max_new_tokens or 10**9
    for index, stats in finals.items():
        emitted = sum(len(c.token_ids) for c in chunks if c.index == index)
        if emitted > limit or emitted != stats.emitted:
            return code, f"sample {index}: {emitted} tokens for max_new_tokens {req.max_new_tokens} (stats: {stats.emitted})"
        logprobs = sum(len(c.logprobs) for c in chunks if c.index == index)
        if logprobs != (emitted if req.HasField("logprobs") else 0):
            return code, f"sample {index}: {logprobs} logprobs for {emitted} tokens"
    if req.request_id and any(c.request_id != req.request_id for c in chunks):
        return code, "the request_id was not echoed"
    return code, None


def fuzz(client, n: int, seed: int = 0, timeout: float = 60.0, progress=None) -> FuzzReport:
    """``n`` requests through ``client`` (an OutriderClient), one at a time."""
    report = FuzzReport()

    @fixed_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def one(req):
        code, wrong = check(client, req, timeout)
        report.requests += 1
        report.by_code[code.name] += 1
        if wrong is not None:
            report.wrong_status += 1
            if len(report.wrong) < 20:
                report.wrong.append({"why": wrong, "request": str(req)[:600]})
        if progress is not None:
            progress()

    start = time.monotonic()
    one()
    report.seconds = time.monotonic() - start
    return report


def serve_replicas(dashboard: str) -> set[str]:
    """The ids of every Serve replica the cluster's dashboard lists (its REST API, as
    `serve status` reads it)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(dashboard).get_serve_details()
    return {replica["replica_id"] for app in details.get("applications", {}).values()
            for deployment in app.get("deployments", {}).values() for replica in deployment.get("replicas", [])}
