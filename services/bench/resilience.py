"""Served scenarios for session state (run against a server with >= 2 replicas a role,
e.g. `outrider serve --replicas 2`):

- ``kill_replicas``: N greedy streams; during each, one replica (drafter and verifier in
  turn) is killed with ``ray.kill``. Every stream must complete with exactly the tokens
  of an undisturbed run: nothing lost, duplicated or changed.
- ``shared_prefix``: time to first token of a request whose long prefix an earlier
  request computed on a *different* verifier replica, against the cold figure.
- ``cancellations`` (one replica a role, as `outrider serve` runs): N long streams, each
  cancelled by its client right after the first chunk (every 4th by a 1 s deadline
  instead); the time until no deployment holds a session any more.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import psutil

from ..gateway.client import OutriderClient, make_request
from ..reliability.chaos import APP
from ..reliability.chaos import replicas as _replicas


def _busiest(actors: list):
    """The replica burning CPU now (the one serving the only stream), where its process
    is on this machine; otherwise the first one."""
    try:
        procs = {a.actor_id: psutil.Process(a.pid) for a in actors}
        before = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
        time.sleep(0.5)
        return max(actors, key=lambda a: sum(procs[a.actor_id].cpu_times()[:2]) - before[a.actor_id])
    except (psutil.Error, TypeError):
        return actors[0]


def _wait_for_replicas(address: str, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while any(len(_replicas(address, d)) < count for d in ("drafter", "verifier")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app did not get back to {count} replicas a role within {timeout:.0f} s")
        time.sleep(1)


@dataclass
class KillResult:
    deployment: str
    identical: bool
    continued: bool  # the stream's stats show it moved (reconnect or resume)
    seconds: float
    tokens: int


@dataclass
class KillReport:
    results: list[KillResult] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "kills": len(self.results),
            "streams_identical": sum(r.identical for r in self.results),
            "streams_moved": sum(r.continued for r in self.results),
            "by_deployment": {d: sum(r.deployment == d for r in self.results) for d in ("drafter", "verifier")},
            "all_identical": all(r.identical for r in self.results),
            "median_stream_s": statistics.median(r.seconds for r in self.results) if self.results else 0.0,
        }


def kill_replicas(client: OutriderClient, ray_address: str, prompt: str, expected: list[int], kills: int,
                  max_new: int, on_result=lambda r: None) -> KillReport:
    import ray

    ray.init(address=ray_address, logging_level="error", log_to_driver=False)
    try:
        replicas_each = min(len(_replicas(ray_address, "drafter")), len(_replicas(ray_address, "verifier")))
        if replicas_each < 2:
            raise RuntimeError("--kill-replica needs >= 2 draft and verifier replicas (outrider serve --replicas 2)")
        report = KillReport()
        for n in range(kills):
            deployment = ("drafter", "verifier")[n % 2]
            _wait_for_replicas(ray_address, replicas_each)
            tokens, stats, killed = [], None, False
            start = time.perf_counter()
            for chunk in client.generate(make_request(prompt, max_new, method="draft", gamma=4), timeout=600):
                tokens += chunk.token_ids
                if not killed and len(tokens) >= 8:
                    victim = _busiest(_replicas(ray_address, deployment))
                    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)  # Serve starts a new one
                    killed = True
                if chunk.HasField("stats"):
                    stats = chunk.stats
            moved = stats.draft_reconnects > 0 if deployment == "drafter" else stats.resumes > 0
            result = KillResult(deployment, tokens == expected, moved, time.perf_counter() - start, len(tokens))
            report.results.append(result)
            on_result(result)
        return report
    finally:
        ray.shutdown()


def cancellations(client: OutriderClient, ray_address: str, prompts: list[str], n: int, on_result=lambda s: None) -> dict:
    import grpc
    import ray
    from ray import serve

    ray.init(address=ray_address, logging_level="error", log_to_driver=False)
    try:
        if any(len(_replicas(ray_address, d)) != 1 for d in ("gateway", "drafter", "verifier")):
            raise RuntimeError("--cancels counts sessions through Serve handles: it needs one replica a role")
        handles = {d: serve.get_deployment_handle(d, app_name=APP) for d in ("gateway", "verifier", "drafter")}

        def sessions() -> int:
            return sum(h.active_sessions.remote().result() for h in handles.values())

        freed_s = []
        for i in range(n):
            request = make_request(prompts[i % len(prompts)], 1500, method="draft", gamma=2)
            if i % 4 == 3:  # a deadline: the server cancels it
                try:
                    for _ in client.generate(request, timeout=1.0):
                        pass
                    raise RuntimeError("a 1500-token stream ended within its 1 s deadline: nothing was cancelled")
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # a failure, not the cancel measured
                        raise
            else:
                stream = client.generate(request, timeout=600)
                next(stream)
                stream.cancel()
            start = time.perf_counter()
            while sessions() and time.perf_counter() - start < 120:
                time.sleep(0.02)
            freed_s.append(time.perf_counter() - start)
            on_result(freed_s[-1])
        return {"cancels": n, "freed_within_1s": sum(s <= 1.0 for s in freed_s),
                "median_s": statistics.median(freed_s), "max_s": max(freed_s)}
    finally:
        ray.shutdown()


def shared_prefix(client: OutriderClient, corpus_ids: list[int], prefix_len: int, trials: int,
                  max_new: int = 8) -> dict:
    """Per trial: a prefix no request used before (cold), then requests sharing it until
    one lands on another verifier replica (warm). Client-side time to first token."""
    if len(corpus_ids) < prefix_len + trials * 7 + 2:
        raise ValueError(f"the prompts give {len(corpus_ids)} tokens: too few for {trials} prefixes of {prefix_len}")
    cold, warm, cached = [], [], []
    for trial in range(trials):
        prefix = corpus_ids[trial * 7 : trial * 7 + prefix_len]  # a new first block: nothing cached
        first_s, reply = _first_token(client, prefix + [corpus_ids[-1]], max_new)
        cold.append(first_s)
        time.sleep(0.5)  # the blocks are published beside the request
        for suffix in corpus_ids[-40:]:
            first_s, other = _first_token(client, prefix + [suffix, suffix], max_new)
            if other.verifier_replica != reply.verifier_replica:
                warm.append(first_s)
                cached.append(other.cached_prefix_tokens)
                break
    cold_s, warm_s = statistics.median(cold), statistics.median(warm) if warm else float("nan")
    return {"prefix_tokens": prefix_len, "trials": trials, "cold_ttft_s": cold_s, "warm_ttft_s": warm_s,
            "warm_over_cold": warm_s / cold_s, "warm_on_other_replica": len(warm),
            "cached_prefix_tokens": cached, "cold_ttft_s_all": cold, "warm_ttft_s_all": warm}


def _first_token(client: OutriderClient, prompt: list[int], max_new: int):
    start, first, stats = time.perf_counter(), None, None
    for chunk in client.generate(make_request(prompt, max_new, method="draft", gamma=4), timeout=300):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - start
        if chunk.HasField("stats"):
            stats = chunk.stats
    return first, stats
