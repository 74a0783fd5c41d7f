"""What the generation features cost when served, and the HTTP API next to gRPC.

Every figure is a ratio of configurations measured in the same run, interleaved
request by request (these machines are shared and noisy):
  - stops + logprobs (top 5) on versus off: the same tokens, so the pure overhead;
  - the speculative speedup over target-only decoding with a repetition penalty, over
    the same speedup without (a penalty changes the text, so only speedups compare);
  - every feature on (stops, logprobs top 5, repetition penalty) versus off;
  - one streamed request over the OpenAI-compatible HTTP API versus gRPC: time to
    first token and tokens/s.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..core.sampling import Penalties, SamplingParams
from ..gateway.client import make_request

NEVER = "\x00never\x00"  # a stop string no output contains: stops are scanned, never end a sample


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def grpc_stream(client, request) -> tuple[int, float, float]:
    """(tokens, seconds, time to first token) of one streamed request."""
    start, first, tokens = time.perf_counter(), None, 0
    for chunk in client.generate(request, timeout=600):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - start
        tokens += len(chunk.token_ids)
    return tokens, time.perf_counter() - start, first or 0.0


class HttpClient:
    """One kept-alive connection to the OpenAI-compatible API, as the OpenAI client keeps
    (gRPC's channel is kept alive too: a connection a request would time the handshake)."""

    def __init__(self, base_url: str):
        self.url = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=600)

    def stream(self, body: dict) -> tuple[int, float, float]:
        """POST /completions with server-sent events: (tokens, seconds, time to first token)."""
        start, first, tokens = time.perf_counter(), None, 0
        self.conn.request("POST", f"{self.url.path}/completions",
                          json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                          {"Content-Type": "application/json"})
        reply = self.conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.read()[:300]!r}")
        for line in reply:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("error"):
                raise RuntimeError(event["error"]["message"])
            if event["choices"] and event["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return tokens, time.perf_counter() - start, first or 0.0


def run_features(client, http_url: str, texts: list[str], max_new: int, repeat: int, gamma: int = 6,
                 on_row=print) -> dict:
    penalty = SamplingParams(penalties=Penalties(repetition=1.1))
    features = dict(stop=(NEVER,), logprobs=5)
    configs = {
        "off": lambda t: make_request(t, max_new, method="draft", gamma=gamma),
        "stops+logprobs": lambda t: make_request(t, max_new, method="draft", gamma=gamma, **features),
        "all": lambda t: make_request(t, max_new, penalty, method="draft", gamma=gamma, **features),
        "target-only": lambda t: make_request(t, max_new, method="none"),
        "penalty": lambda t: make_request(t, max_new, penalty, method="draft", gamma=gamma),
        "penalty target-only": lambda t: make_request(t, max_new, penalty, method="none"),
    }
    tallies = {name: Tally() for name in [*configs, "grpc", "http"]}
    http_client = HttpClient(http_url)
    for text in texts[:1]:  # warm-up: every path once
        for build in configs.values():
            grpc_stream(client, build(text))
        http_client.stream({"model": "outrider", "prompt": text, "max_tokens": 8, "temperature": 0})
    for r in range(repeat):
        for text in texts:
            for name, build in configs.items():
                _add(tallies[name], grpc_stream(client, build(text)))
            # HTTP and gRPC back to back, the same greedy request each way.
            _add(tallies["grpc"], grpc_stream(client, configs["off"](text)))
            body = {"model": "outrider", "prompt": text, "max_tokens": max_new, "temperature": 0,
                    "speculation": {"method": "draft", "gamma": gamma}}
            _add(tallies["http"], http_client.stream(body))
        on_row(f"pass {r + 1}/{repeat}: " + ", ".join(f"{n} {t.tokens_per_s:.1f} tok/s" for n, t in tallies.items()))
    t = tallies
    summary = {
        "stops_logprobs_over_off_tokens_per_s": t["stops+logprobs"].tokens_per_s / t["off"].tokens_per_s,
        "all_features_over_off_tokens_per_s": t["all"].tokens_per_s / t["off"].tokens_per_s,
        "speedup_without_penalty": t["off"].tokens_per_s / t["target-only"].tokens_per_s,
        "speedup_with_penalty": t["penalty"].tokens_per_s / t["penalty target-only"].tokens_per_s,
        "http_over_grpc_tokens_per_s": t["http"].tokens_per_s / t["grpc"].tokens_per_s,
        "http_minus_grpc_ttft_ms_median": 1e3 * (statistics.median(t["http"].ttft) - statistics.median(t["grpc"].ttft)),
        "grpc_ttft_ms_median": 1e3 * statistics.median(t["grpc"].ttft),
    }
    summary["penalty_speedup_over_plain_speedup"] = summary["speedup_with_penalty"] / summary["speedup_without_penalty"]
    summary["tokens_per_s"] = {name: tally.tokens_per_s for name, tally in t.items()}
    return summary


def _add(tally: Tally, run: tuple[int, float, float]) -> None:
    tally.tokens += run[0]
    tally.seconds += run[1]
    tally.ttft.append(run[2])
