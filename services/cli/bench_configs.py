"""The configs ``outrider bench`` measures, interleaved in each pass: in-process,
through a server, and at several concurrency levels (``--concurrency``)."""

from __future__ import annotations

import math
from dataclasses import replace

import grpc

from ..bench.concurrent import run_local as run_concurrent_local
from ..bench.concurrent import run_server as run_concurrent_server
from ..bench.runs import run_hf, run_outrider, run_server
from ..core.gamma import MAX_GAMMA
from ..core.sampling import SamplingParams
from ..rpc.convert import ON_VERIFIER
from .common import UsageError, server_client, tree_option

TREE_DRAFTERS = ("medusa", "mtp", "eagle")  # heads on the verifier: each runs its whole tree once


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise UsageError(f"--{name} needs non-negative integers, got {text!r}")
    return values


def drafter_gammas(drafter: str, gammas: list[int]) -> list[int]:
    """A tree drafter runs once, with its whole tree (gamma caps only its depth)."""
    return [MAX_GAMMA] if drafter in TREE_DRAFTERS else gammas


def check_fits(pair, prompts: list[list[int]], max_new: int) -> None:
    for ids in prompts:
        if not ids or len(ids) + max_new > pair.max_context:
            raise UsageError(f"a prompt of {len(ids)} tokens does not fit max_new_tokens in the context")


def local_configs(args, drafters, gammas, texts, pair):
    prompts = [pair.tokenizer(t)["input_ids"] for t in texts]
    check_fits(pair, prompts, args.max_new_tokens)
    # Warm up every code path once (allocator, kernels) so no method pays first-call costs.
    run_outrider(pair, "none", None, prompts[:1], 8)
    for d in drafters:
        run_outrider(pair, d, 2, prompts[:1], 8, tree_option(args, d))
    if not args.no_hf:
        run_hf(pair, 2, prompts[:1], 8)
    configs = [("outrider", "none", None)] + [("outrider", d, g) for d in drafters for g in drafter_gammas(d, gammas)]
    if not args.no_hf:
        configs += [("hf", None, None)] + [("hf", None, g) for g in gammas if g > 0]

    def measure(config):
        kind, drafter, gamma = config
        if kind == "outrider":
            return run_outrider(pair, drafter, gamma, prompts, args.max_new_tokens, tree_option(args, drafter))
        return run_hf(pair, gamma, prompts, args.max_new_tokens)

    return measure, configs


def server_configs(args, drafters, gammas, texts, pair):
    """Target-only and every drafter x gamma (pipelined at each fan-out, and serial for
    comparison) through the server; HF assisted in this process as the single-process
    anchor."""
    client = server_client(args)
    fanouts = parse_ints(args.fanouts, "fanouts") if args.fanouts else [None]
    prompts = None  # token ids for the in-process anchor, tokenized once
    if pair is not None:
        prompts = [pair.tokenizer(t)["input_ids"] for t in texts]
        check_fits(pair, prompts, args.max_new_tokens)
    try:
        run_server(client, "none", None, True, texts[:1], 8)  # warm-up
        for d in drafters:
            if d not in ("suffix", "tree"):  # a suffix index would learn the first prompt's completion
                run_server(client, d, 2, True, texts[:1], 8, tree_option(args, d) or "")
    except grpc.RpcError as err:
        raise UsageError(f"server {args.server}: {err.code().name}: {err.details()}") from None
    if pair is not None:
        run_hf(pair, 2, prompts[:1], 8)
    configs = [("server", "none", None, True, None)]
    for d in drafters:
        for g in drafter_gammas(d, gammas):
            if d in ON_VERIFIER and d != "eagle":  # heads and lookups run on the verifier: no draft hop to pipeline
                configs.append(("server", d, g, True, None))
                continue
            # (EAGLE drafts on the draft workers where the server says eagle.placement:
            # drafter; on the verifier, its serial row is the same as the other.)
            configs += [("server", d, g, True, f) for f in fanouts] + [("server", d, g, False, None)]
    if pair is not None:
        configs += [("hf", None, g, None, None) for g in gammas if g > 0]

    def measure(config):
        kind, drafter, gamma, pipeline, fanout = config
        if kind == "server":
            return run_server(client, drafter, gamma, pipeline, texts, args.max_new_tokens, tree_option(args, drafter) or "",
                              fanout)
        return run_hf(pair, gamma, prompts, args.max_new_tokens)

    return measure, configs


def check_sampling(args) -> None:
    """``--temperature`` and ``--unseeded``: sampled ``--concurrency`` levels only."""
    if args.temperature < 0 or not math.isfinite(args.temperature):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if (args.temperature or args.unseeded) and not args.levels:
        raise UsageError("--temperature and --unseeded apply to --concurrency levels")
    if args.unseeded and not args.temperature:
        raise UsageError("--unseeded needs --temperature > 0 (greedy has no seed)")


def concurrency_configs(args, drafters, gammas, texts, pair):
    """Target-only and each drafter x gamma at each ``--concurrency`` level (a level's
    configs interleaved, levels in order); in-process, each with batched and with
    per-session verification. A level of N streams runs max(N, prompts) requests,
    the prompts cycled. Sampled (``--temperature``): request i is seeded i, or not at
    all with ``--unseeded`` (in-process: seeded but not coupled, rejection sampling)."""
    methods = [("none", None)] + [(d, g) for d in drafters for g in gammas if g > 0]
    params = SamplingParams(temperature=args.temperature, seed=0, coupled=False if args.unseeded else None)

    def cycled(items, n):
        return [items[i % len(items)] for i in range(max(len(items), n))]

    if args.server:
        client = server_client(args)
        top = max(args.levels)
        served = replace(params, seed=None) if args.unseeded else params
        for method, gamma in methods:  # warm-up
            run_concurrent_server(client, method, gamma, cycled(texts, top)[:top], 8, top, served)
        configs = [(m, g, n) for n in args.levels for m, g in methods]
        return (lambda c: run_concurrent_server(client, c[0], c[1], cycled(texts, c[2]), args.max_new_tokens, c[2],
                                                served)), configs
    prompts = [pair.tokenizer(t)["input_ids"] for t in texts]
    check_fits(pair, prompts, args.max_new_tokens)
    configs = [(m, g, n, batched) for n in args.levels for m, g in methods for batched in (True, False)]
    for method, gamma, n, batched in configs:  # warm-up
        run_concurrent_local(pair, method, gamma, cycled(prompts, n)[:n], 8, n, batched, params)

    def measure(config):
        method, gamma, n, batched = config
        return run_concurrent_local(pair, method, gamma, cycled(prompts, n), args.max_new_tokens, n, batched, params)

    return measure, configs
