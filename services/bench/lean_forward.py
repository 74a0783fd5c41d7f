"""What the lean forward (models/lean.py) buys end to end: target-only and draft-model
speculative decoding with both models on their lean decoders, against the same with
transformers' forward, interleaved in one run (``python -m services.bench.lean_forward
[--prompts out_of_corpus.jsonl] [--gamma 8]``).

Each pass runs four arms over the same prompts: target-only and speculative, each with
the lean decoders attached (as ``load_model(lean=True)`` serves them) and detached
(``lean_decoder = None``: core/kv.py and the verifier then call the model). Ratios are
taken within a pass; every arm's tokens must equal lean target-only's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..cli.bench import DEFAULT_PROMPTS, load_prompts
from ..models.loading import bundled_paths
from ..models.pair import load_pair
from .runs import run_outrider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="", help="a .jsonl of {\"prompt\": ...}; default: the held-out prompts")
    parser.add_argument("--limit", type=int, default=8, help="prompts from the file")
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pair = load_pair(bundled_paths())
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
            for drafter in ("none", "draft"):
                runs[forward, drafter] = run_outrider(pair, drafter, args.gamma, prompts, args.max_new_tokens)
        for model, decoder in decoders.items():
            model.lean_decoder = decoder
        reference = runs["lean", "none"].outputs
        row = {"pass": index + 1, "same_tokens": all(run.outputs == reference for run in runs.values())}
        for forward in ("lean", "transformers"):
            plain, spec = runs[forward, "none"], runs[forward, "draft"]
            row[f"{forward}_target_only_tokens_per_s"] = plain.tokens_per_s
            row[f"{forward}_speculative_tokens_per_s"] = spec.tokens_per_s
            row[f"{forward}_speculative_vs_target_only"] = spec.tokens_per_s / plain.tokens_per_s
            row[f"{forward}_draft_ms_per_token"] = 1e3 * spec.stats.draft_time_s / max(spec.stats.drafted, 1)
        row["target_only_lean_over_transformers"] = (row["lean_target_only_tokens_per_s"]
                                                     / row["transformers_target_only_tokens_per_s"])
        row["speculative_lean_over_transformers"] = (row["lean_speculative_tokens_per_s"]
                                                     / row["transformers_speculative_tokens_per_s"])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
