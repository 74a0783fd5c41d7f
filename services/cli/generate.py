"""``outrider generate``: one prompt, in-process, streamed text or one JSON object."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from ..core.gamma import GammaSchedule
from ..core.errors import InvalidRequest
from ..core.sampling import MAX_LOGPROBS, Penalties, SamplingParams, StopRule, sample_seed
from ..core.stats import GenerationStats
from ..models.detokenizer import MAX_STOPS, StopScanner
from ..models.pair import DRAFTERS, HEAD_KINDS, drafter_heads, load_pair, make_engine
from .common import (UsageError, add_model_options, add_server_options, apply_threads, model_paths, server_client,
                     tree_option, validate_device)


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="generate text for one prompt")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--drafter", default="draft", help=f"one of {', '.join(DRAFTERS)}")
    parser.add_argument("--gamma", type=int, default=None,
                        help="tokens drafted per round (default: 8 in-process, the server's default with --server)")
    parser.add_argument("--adaptive-gamma", action="store_true", help="+2 on full accept, -1 otherwise")
    parser.add_argument("--confidence-stop", type=float, default=0.0,
                        help="stop a draft when its token probability falls below this")
    parser.add_argument("--n", type=int, default=1, help="independent samples")
    parser.add_argument("--stop", action="append", default=[], metavar="S",
                        help="end the output at this string (repeatable; the text ends before it)")
    parser.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                        help="end the output with this token (repeatable)")
    parser.add_argument("--min-tokens", type=int, default=0, help="no stop before this many tokens")
    parser.add_argument("--ignore-eos", action="store_true", help="EOS does not end the output")
    parser.add_argument("--logprobs", type=int, default=None, metavar="N",
                        help=f"report each token's log-probability and its top N alternatives (N <= {MAX_LOGPROBS})")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off (transformers' rule)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2] (OpenAI's rule)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2] (OpenAI's rule)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--compare", action="store_true",
                        help="also decode with the target alone and report the speedup")
    add_server_options(parser, None, "generate through a running server's gRPC API instead of in-process")
    parser.add_argument("--no-pipeline", action="store_true", help="with --server: draft only after each verify")
    parser.add_argument("--fanout", type=int, default=None,
                        help="with --server: the speculation cache's branches a round (1: one guess; default: the server's)")
    add_model_options(parser)


def sample_seeds(seed: int | None, n: int) -> list[int | None]:
    """Each sample's seed, as the server derives them for a request's n (sample_seed)."""
    return [None if seed is None else sample_seed(seed, i) for i in range(n)]


def run(args) -> int:
    apply_threads(args)
    validate_device(args.device)
    if not args.prompt:
        raise UsageError("prompt is empty")
    if args.drafter not in DRAFTERS:
        raise UsageError(f"unknown drafter {args.drafter!r}; choose one of {', '.join(DRAFTERS)}")
    if args.max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if not 0 <= args.confidence_stop < 1:
        raise UsageError(f"--confidence-stop must be in [0, 1), got {args.confidence_stop}")
    if args.logprobs is not None and not 0 <= args.logprobs <= MAX_LOGPROBS:
        raise UsageError(f"--logprobs must be in [0, {MAX_LOGPROBS}], got {args.logprobs}")
    if len(args.stop) > MAX_STOPS or not all(args.stop):
        raise UsageError(f"--stop takes 1 to {MAX_STOPS} non-empty strings")
    if not 0 <= args.min_tokens <= args.max_new_tokens:
        raise UsageError(f"--min-tokens must be in [0, --max-new-tokens], got {args.min_tokens}")
    schedule = GammaSchedule(initial=8 if args.gamma is None else args.gamma, adaptive=args.adaptive_gamma)
    try:
        base = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              penalties=Penalties(args.repetition_penalty, args.presence_penalty, args.frequency_penalty))
    except InvalidRequest as error:
        raise UsageError(str(error)) from None
    if args.server:
        return run_remote(args, base)

    pair = load_pair(model_paths(args), args.device, args.dtype,
                     with_draft=args.drafter in ("draft", "tree"), trust_remote_code=args.trust_remote_code,
                     heads=drafter_heads(args.drafter, tree_option(args, args.drafter)))
    engine = make_engine(pair, args.drafter, schedule, args.confidence_stop, tree_option(args, args.drafter))
    prompt_ids = pair.tokenizer(args.prompt)["input_ids"]
    engine.validate(prompt_ids, args.max_new_tokens)
    for token in args.stop_token_id:
        if not 0 <= token < len(pair.tokenizer):
            raise UsageError(f"--stop-token-id {token} is outside the vocabulary")
    eos = [] if args.ignore_eos or pair.tokenizer.eos_token_id is None else [pair.tokenizer.eos_token_id]
    base = replace(base, stop=StopRule(tuple(dict.fromkeys(args.stop_token_id + eos)), args.min_tokens))

    samples, total = [], GenerationStats()
    for seed in sample_seeds(args.seed, args.n):
        params = replace(base, seed=seed)
        on_tokens = None if args.json else TextStreamer(pair.tokenizer, args.prompt, args.stop, args.min_tokens)
        # The engine ends the output at a stop with this scanner, which then holds its text.
        text = StopScanner(pair.tokenizer, tuple(args.stop), args.min_tokens)
        result = engine.generate(prompt_ids, args.max_new_tokens, params, on_tokens=on_tokens, logprobs=args.logprobs,
                                 text_stop=text)
        if on_tokens is not None:
            on_tokens.finish()
        sample = {"token_ids": result.token_ids, "text": text.text_out(final=True), "finish_reason": result.finish_reason,
                  "stats": result.stats.to_dict()}
        if args.logprobs is not None:
            sample["logprobs"] = result.logprobs
            sample["top_logprobs"] = [[[i, v] for i, v in top] for top in result.top_logprobs]
        samples.append(sample)
        total += result.stats
    comparison = compare_with_target_only(pair, prompt_ids, base, args, samples, total) if args.compare else None
    report(args, prompt_ids, samples, total, comparison)
    return 0


def run_remote(args, base: SamplingParams) -> int:
    """The same command through the public gRPC API; the same output and JSON."""
    import grpc

    from ..gateway.client import make_request
    from ..rpc.convert import stats_from_proto

    def one(seed, method, on_text=None) -> tuple[dict, list[int]]:
        request = make_request(args.prompt, args.max_new_tokens, replace(base, seed=seed), method, args.gamma or 0,
                               args.adaptive_gamma, pipeline=not args.no_pipeline,
                               tree=(tree_option(args, method) or "") if method in (*HEAD_KINDS, "tree") else "",
                               stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_id), min_tokens=args.min_tokens,
                               ignore_eos=args.ignore_eos, logprobs=args.logprobs, fanout=args.fanout)
        ids, text, final, lps, tops = [], "", None, [], []
        for chunk in client.generate(request):
            ids.extend(chunk.token_ids)
            text += chunk.text
            lps.extend(chunk.logprobs)
            tops.extend([[i, v] for i, v in zip(top.token_ids, top.logprobs)] for top in chunk.top_logprobs)
            if on_text is not None:
                on_text(chunk.text)
            if chunk.HasField("stats"):
                final = chunk
        stats = stats_from_proto(final.stats)
        sample = {"token_ids": ids, "text": text, "finish_reason": final.stats.finish_reason, "stats": stats.to_dict(),
                  "_stats": stats}
        if args.logprobs is not None:
            sample["logprobs"] = lps
            sample["top_logprobs"] = tops if args.logprobs else [[] for _ in ids]
        return sample, list(final.prompt_token_ids)

    with server_client(args, check=False) as client:
        try:
            samples, total, prompt_ids = [], GenerationStats(), []
            for seed in sample_seeds(args.seed, args.n):
                echo = None if args.json else _echo(args.prompt)
                sample, prompt_ids = one(seed, args.drafter, echo)
                if echo is not None:
                    print()
                total += sample.pop("_stats")
                samples.append(sample)
            comparison = None
            if args.compare:
                baseline, identical = GenerationStats(), True
                for seed, sample in zip(sample_seeds(args.seed, args.n), samples):
                    ref, _ = one(seed, "none")
                    baseline += ref.pop("_stats")
                    identical &= ref["token_ids"] == sample["token_ids"]
                comparison = {"target_only_tokens_per_s": baseline.tokens_per_s,
                              "speedup": total.tokens_per_s / baseline.tokens_per_s, "identical": identical}
        except grpc.RpcError as err:
            raise UsageError(f"server {args.server}: {err.code().name}: {err.details()}") from None
    report(args, prompt_ids, samples, total, comparison)
    return 0


def _echo(prompt: str):
    """Streams text after the prompt; the prompt is echoed once the server answers."""
    pending = [prompt]

    def write(text: str) -> None:
        sys.stdout.write("".join(pending) + text)
        sys.stdout.flush()
        pending.clear()

    return write


def report(args, prompt_ids, samples, total: GenerationStats, comparison: dict | None) -> None:
    if args.json:
        out = {"prompt_token_ids": prompt_ids, "samples": samples, "stats": total.to_dict()}
        if comparison:
            out["comparison"] = comparison
        print(json.dumps(out))
        return
    s = total.to_dict()
    print(f"[{s['emitted']} tokens, {s['tokens_per_s']:.1f} tok/s, acceptance {s['acceptance_rate']:.2f}, "
          f"mean acceptance length {s['mean_acceptance_length']:.2f}]", file=sys.stderr)
    if comparison:
        print(f"[target-only: {comparison['target_only_tokens_per_s']:.1f} tok/s; speedup "
              f"{comparison['speedup']:.2f}x; identical output: {comparison['identical']}]", file=sys.stderr)


def compare_with_target_only(pair, prompt_ids, base: SamplingParams, args, samples, total: GenerationStats) -> dict:
    """Decode the same samples (same seeds) with the target alone, in the same process."""
    engine = make_engine(pair, "none", GammaSchedule(initial=0))
    baseline = GenerationStats()
    identical = True
    for seed, sample in zip(sample_seeds(args.seed, args.n), samples):
        result = engine.generate(prompt_ids, args.max_new_tokens, replace(base, seed=seed))
        baseline += result.stats
        identical &= result.token_ids == sample["token_ids"]
    return {"target_only_tokens_per_s": baseline.tokens_per_s, "speedup": total.tokens_per_s / baseline.tokens_per_s,
            # Only greedy output must match token for token; sampled output matches in distribution.
            "identical": identical}


class TextStreamer:
    """Prints decoded text as tokens arrive, after the prompt (up to a stop string)."""

    def __init__(self, tokenizer, echo: str = "", stops: list[str] = (), min_tokens: int = 0):
        self.text = StopScanner(tokenizer, tuple(stops), min_tokens)
        sys.stdout.write(echo)  # the prompt, so the continuation reads in context

    def __call__(self, new_ids: list[int]) -> None:
        self.text.feed(new_ids)
        sys.stdout.write(self.text.text_out())
        sys.stdout.flush()

    def finish(self) -> None:
        sys.stdout.write(self.text.text_out(final=True) + "\n")
        sys.stdout.flush()
