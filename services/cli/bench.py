"""``outrider bench``: target-only vs Outrider (each proposer, across gamma) vs
transformers' assisted generation, measured in one run."""

from __future__ import annotations

import json
import os
import platform
from functools import partial
from pathlib import Path

import grpc
import torch

from ..bench.concurrent import combine_passes, summarize_concurrency
from ..bench.report import format_table, run_rows, summarize, write_concurrency_plot, write_json, write_plot
from ..bench.workloads import repetitive_prompts
from ..models.loading import BUNDLED_DIR
from ..models.pair import drafter_heads, load_pair
from .bench_configs import (TREE_DRAFTERS, check_fits, check_sampling, concurrency_configs, local_configs, parse_ints,
                            server_configs)
from .common import (UsageError, add_model_options, add_server_options, apply_threads, model_paths, server_client,
                     tree_option, validate_device)

DEFAULT_PROMPTS = BUNDLED_DIR / "heldout_prompts.jsonl"
BENCH_DRAFTERS = ("draft", "ngram", "suffix", "medusa", "mtp", "eagle", "tree")


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="benchmark against target-only and HF assisted generation")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSONL with a \"prompt\" field")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=8, help="use the first N prompts")
    parser.add_argument("--gammas", default="1,2,3,4,6,8", help="comma-separated gammas; 0 = adaptive")
    parser.add_argument("--drafters", default="draft,ngram",
                        help=f"comma-separated proposers to measure, of {', '.join(BENCH_DRAFTERS)} (medusa, mtp "
                             "and eagle run their whole tree once: --tree / --eagle-tree, or the heads' own)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' assisted generation")
    parser.add_argument("--workload", choices=("heldout", "repetitive"), default="heldout",
                        help="repetitive: an editor's, one file edited and resubmitted --requests times (suffix decoding's)")
    parser.add_argument("--requests", type=int, default=8, help="--workload repetitive: requests per editor session")
    parser.add_argument("--fanouts", default="",
                        help="--server: comma-separated speculation-cache fan-outs to compare (default: the server's)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="passes over all configs; reports the median pass (by speedup over target-only)")
    add_server_options(parser, None, "measure a running server through its gRPC API (target-only through the "
                                     "same service, each drafter pipelined and serial); HF assisted stays in-process")
    parser.add_argument("--concurrency", default="", metavar="N[,N...]",
                        help="N streams at once (a comma list: one level after another), aggregate tokens/s and "
                             "time to first token: target-only and each drafter; in-process (no --server) each "
                             "with batched and with per-session verification")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="--concurrency: sample at this temperature (0: greedy). Request i is seeded i, so "
                             "speculative output must equal target-only's (coupled sampling), unless --unseeded")
    parser.add_argument("--unseeded", action="store_true",
                        help="--concurrency with --temperature: no seeds (rejection sampling; outputs not compared)")
    parser.add_argument("--kill-replica", type=int, default=0, metavar="N",
                        help="with --server: N streams, each losing a replica (drafter and verifier in turn) "
                             "mid-stream; checks every stream against an undisturbed run")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                        help="with --server: time to first token with a TOKENS-long prefix computed earlier by "
                             "another verifier replica, against cold")
    parser.add_argument("--cancels", type=int, default=0, metavar="N",
                        help="with --server (one replica a role): N streams cancelled right after their first "
                             "chunk (every 4th by a 1 s deadline); seconds until every deployment freed the session")
    parser.add_argument("--features", action="store_true",
                        help="with --server: what stops, logprobs and penalties cost, and HTTP next to gRPC")
    parser.add_argument("--http-url", default=None,
                        help="--features: the OpenAI-compatible API (default: http://HOST:8000/v1 of --server)")
    parser.add_argument("--trials", type=int, default=5, help="--shared-prefix trials")
    parser.add_argument("--ray-address", default="127.0.0.1:6390",
                        help="the server's Ray cluster, for --kill-replica and --cancels (default: `outrider serve`'s)")
    parser.add_argument("--tracing", action="store_true",
                        help="in-process: tokens/s with OpenTelemetry tracing off vs on (every span sampled), "
                             "interleaved; the first of --drafters and --gammas (default JSON: bench-out/tracing.json)")
    parser.add_argument("--scale", action="store_true",
                        help="in-process, random-init models of real shapes: verify pass vs transformers' bare "
                             "forward at batch 8 and contexts 256/1024/4096, bytes per round at V=151,936, what "
                             "truncating q costs in acceptance (default JSON: bench-out/scale.json)")
    parser.add_argument("--tp", action="store_true",
                        help="a TP=2 verifier group (gloo, a local Ray cluster) against TP=1 in-process: the "
                             "group's overhead a verify round, batch 8, gamma 8, acceptance on rank 0 and with the "
                             "logits back (default JSON: bench-out/tp.json)")
    parser.add_argument("--profile", type=Path, default=None, metavar="OUT",
                        help="measure what `outrider capacity` plans from into OUT: in-process, the verify pass by "
                             "batch and gamma, draft step by rows, prefill, acceptance, bytes and transport a round; "
                             "with --server, also serving's own cost, target-only and speculative at --concurrency "
                             "(default 1,2,8)")
    parser.add_argument("--json", type=Path, default=Path("bench-out/bench.json"), help="JSON output path")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to the JSON)")
    add_model_options(parser)


def load_prompts(path: Path, limit: int) -> list[str]:
    if not path.exists():
        raise UsageError(f"prompts file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{path}:{n}: expected a JSON object with a \"prompt\" field") from None
        if not isinstance(prompt, str) or not prompt:
            raise UsageError(f"{path}:{n}: \"prompt\" must be a non-empty string")
        prompts.append(prompt)
    if not prompts:
        raise UsageError(f"no prompts in {path}")
    return prompts[:limit]


def run(args) -> int:
    apply_threads(args)
    validate_device(args.device)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {args.repeat}")
    if args.requests < 1:
        raise UsageError(f"--requests must be >= 1, got {args.requests}")
    args.levels = parse_ints(args.concurrency, "concurrency") if args.concurrency else []
    if 0 in args.levels:
        raise UsageError(f"--concurrency levels must be >= 1, got {args.concurrency!r}")
    check_sampling(args)
    if args.kill_replica or args.shared_prefix or args.cancels:
        return run_resilience(args)
    if args.tracing:
        return run_tracing(args)
    if args.scale:
        return run_scale_bench(args)
    if args.tp:
        return run_tp_bench(args)
    if args.features:
        return run_features_bench(args)
    if args.profile:
        return run_profile_bench(args)
    gammas = parse_ints(args.gammas, "gammas")
    drafters = [d.strip() for d in args.drafters.split(",") if d.strip()]
    for d in drafters:
        if d not in BENCH_DRAFTERS:
            raise UsageError(f"unknown drafter {d!r} for bench; choose from {', '.join(BENCH_DRAFTERS)}")
    if any(d in TREE_DRAFTERS for d in drafters) and args.levels:
        raise UsageError("--concurrency measures draft and ngram; measure medusa, mtp and eagle at one stream")
    texts = load_prompts(args.prompts, args.limit)
    if args.levels:
        args.no_hf = True  # the single-stream anchor means nothing next to N streams
    need_pair = args.server is None or not args.no_hf
    pair = None
    if need_pair:
        pair = load_pair(model_paths(args), args.device, args.dtype,
                         with_draft=bool({"draft", "tree"} & set(drafters)) or not args.no_hf, trust_remote_code=args.trust_remote_code,
                         heads=tuple(dict.fromkeys(h for d in drafters for h in drafter_heads(d, tree_option(args, d))))
                         if args.server is None else ())
    summarize_pass, speedup_key = summarize, "speedup_vs_ar"
    if args.levels:
        build = concurrency_configs
        summarize_pass, speedup_key = partial(summarize_concurrency, compare=not args.unseeded), None
    elif args.server:
        build = server_configs
    else:
        build = local_configs
    if args.workload == "repetitive":
        if args.levels:
            raise UsageError("--workload repetitive runs one stream")
        files = texts
        # Each pass an editor session over another file: a pass never finds its own
        # completions from an earlier pass in a server's suffix index.
        workloads = [repetitive_prompts(files, args.requests, n) for n in range(args.repeat)]
    else:
        workloads = [texts] * args.repeat

    # Every pass measures every config, interleaved, so that drift in machine load hits
    # all configs of a pass alike. Ratios are taken within a pass (these machines are
    # shared and their speed drifts between passes); the report is the median pass by
    # speedup over target-only, with every pass's ratios listed.
    passes: list[list] = []
    for n in range(args.repeat):
        runs = []
        measure, configs = build(args, drafters, gammas, workloads[n], pair)
        for config in configs:
            measured = measure(config)
            runs.append(measured)
            print(f"  pass {n + 1}: {measured.label}: {measured.tokens_per_s:.1f} tok/s", flush=True)
        passes.append(runs)
    summaries = [summarize_pass(runs) for runs in passes]
    if speedup_key:
        order = sorted(range(len(passes)), key=lambda i: summaries[i][speedup_key])
        median = order[len(order) // 2]
        per_pass = {"speedup_vs_ar_per_pass": [s["speedup_vs_ar"] for s in summaries],
                    "speedup_vs_hf_per_pass": [s["speedup_vs_hf"] for s in summaries]}
    else:
        median, per_pass = len(passes) - 1, {"per_pass": summaries, "by_concurrency": combine_passes(summaries)}
    rows = run_rows(passes[median])
    summary = {**summaries[median], "passes": len(passes), "reported_pass": median + 1, **per_pass}
    if pair is not None and any(d in TREE_DRAFTERS for d in drafters):
        summary["verify_cost"] = tree_verify_cost(pair)
    meta = {"server": args.server, "target": pair.paths.target if pair else None,
            "draft": pair.paths.draft if pair else None, "prompts": len(workloads[0]), "workload": args.workload,
            "max_new_tokens": args.max_new_tokens, "repeat": args.repeat, "concurrency": args.levels,
            "temperature": args.temperature, "seeded": not args.unseeded, "threads": torch.get_num_threads(),
            "device": args.device, "torch": torch.__version__, "machine": platform.machine()}
    print(format_table(rows))
    print(json.dumps(summary, indent=2))
    write_json(args.json, summary, rows, meta)
    if args.levels:  # the plot is speculative over target-only against concurrency
        plot = args.plot or args.json.with_suffix(".png")
        sampling = "greedy" if not args.temperature else f"T={args.temperature:g}{' unseeded' if args.unseeded else ' seeded'}"
        write_concurrency_plot(plot, summary["by_concurrency"], sampling)
        print(f"wrote {args.json} and {plot}")
        return 0
    plot = args.plot or args.json.with_suffix(".png")
    write_plot(plot, rows)
    print(f"wrote {args.json} and {plot}")
    return 0


def tree_verify_cost(pair) -> dict:
    """One verify pass (256-token context) with an N-node tree against one with a
    5-token chain (6 positions either way counts the last committed token), here."""
    from ..models.build.heads import verify_cost

    cost = verify_cost(pair.target, 64, str(pair.target.device), repeats=9)
    return {"tree16_vs_chain5": float(cost[16] / cost[5]),
            "vs_one_token": {str(n): float(cost[n]) for n in (5, 8, 16, 32, 64)}}


def run_profile_bench(args) -> int:
    from ..bench.profile import run_profile

    if args.levels and not args.server:
        raise UsageError("--profile --concurrency sets the served levels: give --server HOST:PORT too")
    pair = load_pair(model_paths(args), args.device, args.dtype, trust_remote_code=args.trust_remote_code)
    texts = load_prompts(args.prompts, args.limit)
    prompts = [pair.tokenizer(t)["input_ids"] for t in texts]
    check_fits(pair, prompts, args.max_new_tokens)
    # With a server, serving's own cost is measured through it, target-only and
    # speculative: one stream, and two levels of several (what the model of a round
    # misses grows with the sessions that share it).
    client = server_client(args) if args.server else None
    profile = run_profile(pair, prompts, max(3, args.repeat), args.max_new_tokens,
                          client=client, texts=texts, levels=args.levels or [1, 2, 8])
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    args.profile.write_text(json.dumps(profile, indent=2) + "\n")
    print(f"wrote {args.profile}")
    return 0


def run_resilience(args) -> int:
    """--kill-replica / --shared-prefix / --cancels: session-state scenarios against a server."""
    from ..bench import resilience
    from . import local_cluster
    from ..gateway.client import make_request
    from ..models.loading import load_tokenizer

    if not args.server:
        raise UsageError("--kill-replica, --shared-prefix and --cancels measure a server: give --server HOST:PORT")
    if args.kill_replica < 0 or args.shared_prefix < 0 or args.cancels < 0 or args.trials < 1:
        raise UsageError("--kill-replica, --shared-prefix, --cancels and --trials must be positive")
    client = server_client(args)
    texts = load_prompts(args.prompts, 10**6)
    summary: dict = {}
    if args.shared_prefix:
        tokenizer = load_tokenizer(model_paths(args).target, args.trust_remote_code)
        corpus = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        try:
            summary["shared_prefix"] = resilience.shared_prefix(client, corpus, args.shared_prefix, args.trials)
        except ValueError as error:
            raise UsageError(str(error)) from None
        sp = summary["shared_prefix"]
        print(f"shared prefix of {sp['prefix_tokens']} tokens: cold TTFT {sp['cold_ttft_s'] * 1e3:.0f} ms, "
              f"on another replica {sp['warm_ttft_s'] * 1e3:.0f} ms ({sp['warm_over_cold']:.0%} of cold)")
    if args.kill_replica:
        prompt = texts[0]
        reference = client.generate_unary(make_request(prompt, args.max_new_tokens, method="none"), timeout=600)
        if local_cluster.running():  # `outrider serve`'s cluster: join it as its nodes did
            os.environ.update(local_cluster.AUTH_ENV)
        report = resilience.kill_replicas(
            client, args.ray_address, prompt, list(reference.token_ids), args.kill_replica, args.max_new_tokens,
            on_result=lambda r: print(f"  killed a {r.deployment}: {r.tokens} tokens in {r.seconds:.1f} s, "
                                      f"{'identical' if r.identical else 'DIFFERENT'}"
                                      f"{', moved' if r.continued else ''}", flush=True),
        )
        summary["kill_replica"] = report.summary()
    if args.cancels:
        if local_cluster.running():
            os.environ.update(local_cluster.AUTH_ENV)
        try:
            summary["cancels"] = resilience.cancellations(client, args.ray_address, texts, args.cancels)
        except RuntimeError as error:
            raise UsageError(str(error)) from None
        c = summary["cancels"]
        print(f"{c['freed_within_1s']} of {c['cancels']} cancelled sessions freed everywhere within 1 s "
              f"(median {c['median_s']:.2f} s, max {c['max_s']:.2f} s)")
    print(json.dumps(summary, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "server": args.server}, indent=2))
    print(f"wrote {args.json}")
    ok = summary.get("kill_replica", {}).get("all_identical", True)
    ok = ok and summary.get("cancels", {}).get("freed_within_1s") == summary.get("cancels", {}).get("cancels")
    return 0 if ok else 1


def run_tracing(args) -> int:
    """--tracing: what OpenTelemetry tracing costs, in-process (services/bench/tracing.py)."""
    from ..bench.tracing import run_tracing_overhead

    if args.server or args.levels:
        raise UsageError("--tracing measures in-process; drop --server and --concurrency")
    drafter = args.drafters.split(",")[0].strip()
    if drafter not in ("draft", "ngram"):
        raise UsageError(f"unknown drafter {drafter!r} for bench; choose draft or ngram")
    gamma = parse_ints(args.gammas, "gammas")[0] or 4
    pair = load_pair(model_paths(args), args.device, args.dtype, with_draft=drafter == "draft",
                     trust_remote_code=args.trust_remote_code)
    prompts = [pair.tokenizer(t)["input_ids"] for t in load_prompts(args.prompts, args.limit)]
    check_fits(pair, prompts, args.max_new_tokens)
    summary = run_tracing_overhead(
        pair, prompts, args.max_new_tokens, drafter, gamma, args.repeat,
        on_run=lambda n, name, run: print(f"  pass {n + 1}: tracing {name}: {run.tokens_per_s:.1f} tok/s", flush=True),
    )
    print(json.dumps(summary, indent=2))
    path = Path("bench-out/tracing.json") if args.json == Path("bench-out/bench.json") else args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summary": summary, "threads": torch.get_num_threads(), "device": args.device,
                                "torch": torch.__version__, "machine": platform.machine()}, indent=2))
    print(f"tracing on vs off, median of {args.repeat} passes: tokens/s {summary['on_over_off_tokens_per_s_median'] - 1:+.1%} "
          f"(off again vs off: {summary['off_again_over_off_tokens_per_s_median'] - 1:+.1%}), CPU per token "
          f"{summary['on_over_off_cpu_per_token_median'] - 1:+.1%} "
          f"(off again vs off: {summary['off_again_over_off_cpu_per_token_median'] - 1:+.1%})")
    print(f"a round's tracing, timed alone: off {summary['round_tracing_s_off'] * 1e6:.1f} us, "
          f"on {summary['round_tracing_s_on'] * 1e6:.0f} us, against a {summary['seconds_per_round'] * 1e3:.1f} ms "
          f"round ({summary['round_tracing_share_off']:.3%} and {summary['round_tracing_share_on']:.2%})")
    print(f"wrote {path}")
    return 0


def run_scale_bench(args) -> int:
    """--scale: the data path at real vocabularies and contexts (services/bench/scale.py)."""
    from ..bench.scale import run_scale

    if args.server or args.levels:
        raise UsageError("--scale measures in-process (its served figures use loopback gRPC); drop --server and --concurrency")
    pair = load_pair(model_paths(args), args.device, args.dtype, with_draft=True,
                     trust_remote_code=args.trust_remote_code)
    prompts = [pair.tokenizer(t)["input_ids"][:64] for t in load_prompts(args.prompts, args.limit)]
    summary = run_scale(args.repeat, pair, prompts, on_row=lambda line: print(line, flush=True))
    path = Path("bench-out/scale.json") if args.json == Path("bench-out/bench.json") else args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__,
            "machine": platform.machine()}
    path.write_text(json.dumps({**summary, "meta": meta}, indent=2) + "\n")
    print(f"verify pass / bare forward at batch 8, context 4096: {summary['verify_pass_vs_bare_b8_c4096']:.2f}x "
          f"(with Outrider's attention on both: {summary['verify_pass_vs_bare_same_attention_b8_c4096']:.2f}x); "
          f"bytes per round at V=151,936 gamma 8: top-k 50 {summary['bytes_per_round_v151936_g8_topk50']:.0f}, "
          f"T=1.0 {summary['bytes_per_round_v151936_g8_t1']:.0f}")
    print(f"wrote {path}")
    return 0


def run_tp_bench(args) -> int:
    """--tp: the tensor-parallel group's overhead a pass (services/bench/tensor_parallel.py)."""
    from ..bench.tensor_parallel import run_tp_overhead

    if args.server or args.levels:
        raise UsageError("--tp measures in-process against a local Ray cluster; drop --server and --concurrency")
    summary = {f"vocab_{v}": run_tp_overhead(passes=100 * args.repeat, vocab=v, on_row=lambda line: print(line, flush=True))
               for v in (1024, 128_256)}
    path = Path("bench-out/tp.json") if args.json == Path("bench-out/bench.json") else args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def run_features_bench(args) -> int:
    """--features: the generation API's costs, served (services/bench/features.py)."""
    from ..bench.features import run_features

    if not args.server:
        raise UsageError("--features measures a server: give --server HOST:PORT")
    http_url = args.http_url or f"http://{args.server.rsplit(':', 1)[0]}:8000/v1"
    texts = load_prompts(args.prompts, args.limit)
    try:
        summary = run_features(server_client(args), http_url, texts, args.max_new_tokens, args.repeat,
                               on_row=lambda line: print(line, flush=True))
    except (grpc.RpcError, OSError, RuntimeError) as err:
        raise UsageError(f"server {args.server} / {http_url}: {err}") from None
    path = Path("bench-out/features.json") if args.json == Path("bench-out/bench.json") else args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**summary, "server": args.server, "http": http_url}, indent=2) + "\n")
    print(f"stops + logprobs (top 5) on / off: {summary['stops_logprobs_over_off_tokens_per_s']:.3f}x tokens/s; "
          f"all features on / off: {summary['all_features_over_off_tokens_per_s']:.3f}x")
    print(f"speculative speedup with a repetition penalty {summary['speedup_with_penalty']:.2f}x, without "
          f"{summary['speedup_without_penalty']:.2f}x (ratio {summary['penalty_speedup_over_plain_speedup']:.3f})")
    print(f"HTTP / gRPC: {summary['http_over_grpc_tokens_per_s']:.3f}x tokens/s; time to first token "
          f"{summary['http_minus_grpc_ttft_ms_median']:+.1f} ms (gRPC {summary['grpc_ttft_ms_median']:.1f} ms)")
    print(f"wrote {path}")
    return 0
