"""Draft-model speculation with the lean draft forward (models/lean.py) against the
same with transformers' forward, interleaved in one run
(``python -m services.bench.draft_forward [--prompts out_of_corpus.jsonl] [--gamma 8]``).

Each pass runs target-only decoding, then the draft model with its lean decoder, then
with the decoder detached (``lean_decoder = None``: core/kv.py then calls the model),
over the same prompts; ratios are taken within a pass, and every arm's tokens must
equal target-only's.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..models.loading import bundled_paths
from ..models.pair import load_pair
from .gpu import heldout_ids
from .runs import run_outrider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="", help="a .jsonl of {\"prompt\": ...}; default: 8 held-out prompts")
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pair = load_pair(bundled_paths())
    lean = pair.draft.lean_decoder
    if lean is None:
        raise SystemExit("this draft has no lean decoder: nothing to compare")
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [pair.tokenizer(json.loads(line)["prompt"])["input_ids"] for line in f if line.strip()]
    else:
        prompts = heldout_ids(pair, 8)
    for index in range(args.passes):
        plain = run_outrider(pair, "none", None, prompts, args.max_new_tokens)
        runs = {}
        for name, decoder in (("lean", lean), ("transformers", None)):
            pair.draft.lean_decoder = decoder
            runs[name] = run_outrider(pair, "draft", args.gamma, prompts, args.max_new_tokens)
        pair.draft.lean_decoder = lean
        row = {"pass": index + 1, "target_only_tokens_per_s": plain.tokens_per_s,
               "same_tokens": all(run.outputs == plain.outputs for run in runs.values())}
        for name, run in runs.items():
            row[f"{name}_vs_target_only"] = run.tokens_per_s / plain.tokens_per_s
            row[f"{name}_draft_ms_per_token"] = 1e3 * run.stats.draft_time_s / max(run.stats.drafted, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
