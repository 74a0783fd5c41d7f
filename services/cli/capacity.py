"""``outrider capacity``: replicas, latency and the binding resource for a load, from a
profile measured on the replicas' own hardware (``outrider bench --profile OUT``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..bench.capacity import LINK_BYTES_S, OBJECT_STORE_BYTES, Model, plan
from ..core.gamma import MAX_GAMMA
from .common import UsageError


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="plan draft and verifier replicas for a load, from a measured profile")
    parser.add_argument("--profile", type=Path, required=True, help="JSON from `outrider bench --profile OUT`")
    parser.add_argument("--rps", type=float, default=1.0, help="requests per second")
    parser.add_argument("--tpot-ms", type=float, default=100.0, help="mean time per output token to hold, ms")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default: the profile's prompts'")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=16, help="the app's max_batch_size")
    parser.add_argument("--link-gbps", type=float, default=LINK_BYTES_S * 8 / 1e9,
                        help="network between draft and verifier nodes, Gbit/s")
    parser.add_argument("--object-store-gib", type=float, default=OBJECT_STORE_BYTES / 2**30,
                        help="Ray object store that holds the sessions' draft KV chunks, GiB")
    parser.add_argument("--streams", default="", metavar="N[,N...]",
                        help="instead: predicted tokens/s of N concurrent streams on one verifier and one draft "
                             "worker, speculative and target-only (to check against `outrider bench --server "
                             "--concurrency N`)")
    parser.add_argument("--gamma", type=int, default=MAX_GAMMA, help="the clients' gamma ceiling")
    parser.add_argument("--drafter-placement", choices=("separate", "shared"), default="separate",
                        help="draft workers on their own nodes (as the k8s overlays place them), or on the "
                             "verifiers' hardware (one machine, `outrider serve`): draft steps and passes then slow "
                             "each other as much as the profile measured (`colocated_overlap`)")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan here")


def run(args) -> int:
    try:
        profile = json.loads(args.profile.read_text())
        if not 0 <= args.gamma <= MAX_GAMMA:
            raise UsageError(f"--gamma must be within 0..{MAX_GAMMA}, got {args.gamma}")
        model = Model.from_profile(profile, args.max_batch_size, args.drafter_placement == "shared", args.gamma)
    except FileNotFoundError:
        raise UsageError(f"profile not found: {args.profile}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ZeroDivisionError) as error:
        raise UsageError(f"{args.profile} is not a profile from `outrider bench --profile` ({error!r})") from None
    if args.streams:
        try:
            levels = [int(n) for n in args.streams.split(",") if n.strip()]
        except ValueError:
            raise UsageError(f"--streams must be comma-separated integers, got {args.streams!r}") from None
        if not levels or min(levels) < 1:
            raise UsageError(f"--streams needs positive integers, got {args.streams!r}")
        out = args.output_tokens
        result = {"output_tokens": out, "served_overhead": model.ttft is not None,
                  "served_speculative": "served_speculative" in profile, "by_concurrency": {}}
        for n in levels:
            batch = min(n, model.max_batch)
            gamma, per_round = model.operating_point(batch)
            result["by_concurrency"][str(n)] = {
                "tokens_per_s": model.streams_tokens_per_s(n, output_tokens=out),
                "target_only_tokens_per_s": model.streams_tokens_per_s(n, False, output_tokens=out),
                "gamma": gamma, "tokens_per_round": per_round, "round_s": model.round_s(batch, gamma)}
        if model.ttft is None:
            print("the profile has no served measurement (`outrider bench --profile OUT --server ADDR`): "
                  "serving's own cost per round is left out")
        for n, row in result["by_concurrency"].items():
            print(f"{n:>4} streams: {row['tokens_per_s']:7.1f} tok/s speculative (gamma {row['gamma']:.1f}, "
                  f"{row['tokens_per_round']:.2f} tokens a {row['round_s'] * 1e3:.1f} ms round), "
                  f"{row['target_only_tokens_per_s']:7.1f} target-only")
    else:
        if args.rps <= 0 or args.tpot_ms <= 0 or args.output_tokens < 1 or args.link_gbps <= 0 or args.object_store_gib <= 0:
            raise UsageError("--rps, --tpot-ms, --output-tokens, --link-gbps and --object-store-gib must be positive")
        prompt = args.prompt_tokens if args.prompt_tokens is not None else profile["prompt_tokens"]
        if prompt < 1:
            raise UsageError(f"--prompt-tokens must be >= 1, got {prompt}")
        try:
            result = plan(model, args.rps, args.tpot_ms / 1e3, prompt, args.output_tokens,
                          args.link_gbps * 1e9 / 8, args.object_store_gib * 2**30)
        except ValueError as error:
            raise UsageError(str(error)) from None
        print(f"verifier replicas {result['verifier_replicas']} (batch {result['batch_per_verifier']}, gamma "
              f"{result['gamma']}), draft replicas {result['draft_replicas']} "
              f"({result['sessions_per_draft_replica']} sessions each)")
        print(f"expected TTFT {result['expected_ttft_s'] * 1e3:.0f} ms, TPOT {result['expected_tpot_s'] * 1e3:.1f} ms; "
              f"{result['sessions_open']:.1f} sessions open; binds first: {result['binds_first']}")
        print("utilization: " + ", ".join(f"{k} {v:.0%}" for k, v in result["utilization"].items()))
    result["profile"] = str(args.profile)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
