"""What packing a pass's real rows buys (models/lean.py ``_Packed``): verify passes
where a few sessions draft and the rest decode one token, padded against packed,
interleaved in one run (``python -m services.bench.ragged [--sessions 15] [--context
120] [--drafts 0,1,3,8] [--drafting 1] [--tree [CHOICES]] [--target PATH | --shape llama3]``).

A batch's chains are right-padded to its longest: with one session drafting 8 tokens
and 14 decoding one, the padded layout has 135 rows for 23 real ones, and where a pass
is compute-bound (a CPU; a GPU at large batch) every row costs what a real one does.
That is the batch the goodput controller makes under load, when it stops most
sessions and lets a few draft. With ``--tree``, the drafting sessions verify a token
tree instead (Medusa's default shape, or the given choices), pruned to each
``--drafts`` depth: the pass then has a 4-D mask. Medians over ``--repeats``
interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..core.target import Feed, TargetRunner
from ..core.tree import choice_tree, parse_choices
from ..models.heads import DEFAULT_CHOICES
from ..models.lean import use_lean_decoding
from ..models.loading import bundled_paths, load_model
from ..models.shapes import random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="", help="a model folder; default: the bundled target")
    parser.add_argument("--shape", default="",
                        help="a random-init real-shaped target instead (models/shapes.py: llama3, qwen2, mistral)")
    parser.add_argument("--sessions", type=int, default=15)
    parser.add_argument("--context", type=int, default=120)
    parser.add_argument("--drafts", default="0,1,3,8", help="drafts of each drafting session, comma-separated")
    parser.add_argument("--drafting", type=int, default=1, help="sessions that draft; the rest decode one token")
    parser.add_argument("--tree", nargs="?", const=DEFAULT_CHOICES, default=None, metavar="CHOICES",
                        help="drafting sessions verify a tree (default shape: Medusa's), pruned to each depth")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.shape:
        model = use_lean_decoding(random_model(args.shape).eval())
    else:
        model = load_model(args.target or bundled_paths().target, lean=True)
    runner = TargetRunner(model, kv_cache_bytes=512 << 20)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for i in range(args.sessions):
        runner.forward([Feed(str(i), 0, torch.randint(0, vocab, (args.context,), generator=g).tolist(), 1)])

    def one_pass(feeds: list[Feed], packed: bool) -> tuple[float, list[torch.Tensor]]:
        runner.pack_rows = packed
        start = time.perf_counter()
        logits = runner.forward(feeds)  # (each feed keeps the context: the drafts are rolled back)
        return time.perf_counter() - start, logits

    drafts = [int(d) for d in args.drafts.split(",")]
    # Each depth's drafted shape: the tree pruned to it (parents), or None for a chain of d.
    trees = {d: choice_tree(parse_choices(args.tree)).prune(d).shape.parents if args.tree and d else None
             for d in drafts}
    nodes = {d: len(trees[d]) if trees[d] else d for d in drafts}
    times = {(d, p): [] for d in drafts for p in (False, True)}
    same = True
    for _ in range(args.repeats):
        for d in drafts:
            fed = [1 + (nodes[d] if i < args.drafting else 0) for i in range(args.sessions)]
            feeds = [Feed(str(i), args.context, torch.randint(0, vocab, (n,), generator=g).tolist(), n,
                          trees[d] if n > 1 else None) for i, n in enumerate(fed)]
            (padded_s, padded), (packed_s, packed) = one_pass(feeds, False), one_pass(feeds, True)
            times[(d, False)].append(padded_s)
            times[(d, True)].append(packed_s)
            same &= all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(padded, packed))
    kind = f"a tree ({args.tree}) to each depth" if args.tree else "a chain"
    print(f"{args.sessions} sessions at context {args.context}, {args.drafting} drafting {kind}; medians of {args.repeats}")
    print("drafts  real rows  padded rows  padded ms  packed ms  packed/padded")
    for d in drafts:
        padded, packed = (statistics.median(times[(d, p)]) * 1e3 for p in (False, True))
        print(f"{d:6d}  {args.sessions + args.drafting * nodes[d]:9d}  {args.sessions * (nodes[d] + 1):11d}  {padded:9.1f}  "
              f"{packed:9.1f}  {packed / padded:13.2f}")
    print(f"same logits, packed and padded: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit("packed and padded passes gave different logits")


if __name__ == "__main__":
    main()
