"""``outrider build-heads``: train drafting heads for a target (resumable)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.loading import BUNDLED_DIR
from .common import UsageError


def add_parser(sub, name: str) -> None:
    from ..models.build.heads import HeadsBuild

    d = HeadsBuild(target="", out_dir=Path(), work_dir=Path())
    parser = sub.add_parser(name, help="train Medusa heads, MTP modules or an EAGLE-3 drafter for a target by self-distillation (resumable)")
    parser.add_argument("--kind", default="medusa", choices=["medusa", "mtp", "eagle"], help="head type")
    parser.add_argument("--target", default=str(BUNDLED_DIR / "target"), help="folder or Hub id (default: bundled)")
    parser.add_argument("--out", type=Path, default=None, help="where to save them (default: <target>-<kind> beside it)")
    parser.add_argument("--work-dir", type=Path, default=Path(".outrider-cache/heads"), help="checkpoints and caches")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=None,
                        help="Medusa heads (default 4) or MTP modules (default 2)")
    parser.add_argument("--depths", type=int, default=d.depths,
                        help="MTP drafting depths trained and tuned (deeper than --num-heads reuse the last module); "
                             "EAGLE's training-time-test steps")
    parser.add_argument("--eagle-tree", default=d.eagle_tree,
                        help="EAGLE's dynamic tree saved with it, depth,top_k,nodes (default: the one measured fastest here)")
    parser.add_argument("--num-layers", type=int, default=d.num_layers, help="residual blocks per Medusa head")
    parser.add_argument("--own-lm-heads", action="store_true", help="a trained LM head per head (bigger)")
    parser.add_argument("--sequences", type=int, default=d.sequences, help="self-distillation continuations")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 Medusa, 1e-3 MTP and EAGLE)")
    parser.add_argument("--max-tree-nodes", type=int, default=d.max_tree_nodes)
    parser.add_argument("--draft-vocab", type=int, default=d.draft_vocab,
                        help="draw candidates from the target's K most frequent tokens (0 = the whole vocabulary; "
                             "default: a quarter of vocabularies of 8k tokens or more)")
    parser.add_argument("--seed", type=int, default=d.seed)


def run(args) -> int:
    from ..models.build.heads import HeadsBuild, build_heads, default_out_dir

    if args.num_heads is None:
        args.num_heads = 2 if args.kind == "mtp" else 4
    for flag in ("threads", "num_heads", "depths", "num_layers", "sequences", "steps", "max_tree_nodes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.kind == "eagle" and args.eagle_tree:
        from ..core.eagle_proposer import EagleTree

        try:
            EagleTree.parse(args.eagle_tree)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if args.kind == "mtp" and args.depths < args.num_heads:
        raise UsageError("--depths must be at least --num-heads (every MTP module drafts a depth)")
    cfg = HeadsBuild(target=args.target, out_dir=args.out or default_out_dir(args.target, args.kind),
                     work_dir=args.work_dir, device=device, kind=args.kind, num_heads=args.num_heads,
                     depths=args.depths, num_layers=args.num_layers,
                     share_lm_head=not args.own_lm_heads, sequences=args.sequences, steps=args.steps,
                     max_tree_nodes=args.max_tree_nodes, seed=args.seed,
                     lr=args.lr or (2e-3 if args.kind == "medusa" else 1e-3), draft_vocab=args.draft_vocab,
                     eagle_tree=args.eagle_tree)
    print(json.dumps(build_heads(cfg), indent=2))
    return 0
