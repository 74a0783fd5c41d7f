"""What the lean forward (models/lean.py) buys end to end: target-only and speculative
decoding with every model on its lean decoder, against the same with transformers'
forward, interleaved in one run (``python -m services.bench.lean_forward [--prompts
out_of_corpus.jsonl] [--gamma 8] [--drafters draft,medusa,mtp,eagle]``).

Each pass runs target-only and each drafter over the same prompts, each with the lean
decoders attached (as ``load_model(lean=True)`` serves them) and detached
(``lean_decoder = None``: core/kv.py and the verifier then call the model, and read
the hidden states that drafting heads need through hooks). Heads run their own tree
(``gamma`` is the draft model's). Ratios are taken within a pass; every arm's tokens
must equal lean target-only's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..cli.bench import DEFAULT_PROMPTS, load_prompts
from ..models.loading import bundled_paths
from ..models.pair import HEAD_KINDS, load_pair
from .runs import run_outrider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="", help="a .jsonl of {\"prompt\": ...}; default: the held-out prompts")
    parser.add_argument("--limit", type=int, default=8, help="prompts from the file")
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--drafters", default="draft", help="comma-separated, of draft, medusa, mtp, eagle")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    drafters = args.drafters.split(",")
    if unknown := set(drafters) - {"draft", *HEAD_KINDS}:
        raise SystemExit(f"unknown drafters {sorted(unknown)}: choose from draft, {', '.join(HEAD_KINDS)}")
    pair = load_pair(bundled_paths(), heads=tuple(d for d in drafters if d in HEAD_KINDS))
    decoders = {model: model.lean_decoder for model in (pair.target, pair.draft)}
    if None in decoders.values():
        raise SystemExit("the bundled pair has no lean decoders: nothing to compare")
    texts = load_prompts(Path(args.prompts) if args.prompts else DEFAULT_PROMPTS, args.limit)
    prompts = [pair.tokenizer(text)["input_ids"] for text in texts]
    for index in range(args.passes):
        runs = {}
        for forward in ("lean", "transformers"):
            for model, decoder in decoders.items():
                model.lean_decoder = decoder if forward == "lean" else None
            for drafter in ("none", *drafters):
                runs[forward, drafter] = run_outrider(pair, drafter, args.gamma, prompts, args.max_new_tokens)
        for model, decoder in decoders.items():
            model.lean_decoder = decoder
        reference = runs["lean", "none"].outputs
        row = {"pass": index + 1, "same_tokens": all(run.outputs == reference for run in runs.values())}
        for forward in ("lean", "transformers"):
            plain = runs[forward, "none"]
            row[f"{forward}_target_only_tokens_per_s"] = plain.tokens_per_s
            for drafter in drafters:
                spec, name = runs[forward, drafter], "speculative" if drafter == "draft" else drafter
                row[f"{forward}_{name}_tokens_per_s"] = spec.tokens_per_s
                row[f"{forward}_{name}_vs_target_only"] = spec.tokens_per_s / plain.tokens_per_s
                row[f"{forward}_{name}_draft_ms_per_token"] = 1e3 * spec.stats.draft_time_s / max(spec.stats.drafted, 1)
        for name in ["target_only"] + ["speculative" if d == "draft" else d for d in drafters]:
            row[f"{name}_lean_over_transformers"] = (row[f"lean_{name}_tokens_per_s"]
                                                     / row[f"transformers_{name}_tokens_per_s"])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
