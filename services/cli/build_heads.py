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
    parser = sub.add_parser(name, help="train Medusa heads for a target by self-distillation (resumable)")
    parser.add_argument("--kind", default="medusa", choices=["medusa"], help="head type")
    parser.add_argument("--target", default=str(BUNDLED_DIR / "target"), help="folder or Hub id (default: bundled)")
    parser.add_argument("--out", type=Path, default=None, help="where to save them (default: <target>-medusa beside it)")
    parser.add_argument("--work-dir", type=Path, default=Path(".outrider-cache/heads"), help="checkpoints and caches")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=d.num_heads)
    parser.add_argument("--num-layers", type=int, default=d.num_layers, help="residual blocks per head")
    parser.add_argument("--own-lm-heads", action="store_true", help="a trained LM head per head (bigger)")
    parser.add_argument("--sequences", type=int, default=d.sequences, help="self-distillation continuations")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--max-tree-nodes", type=int, default=d.max_tree_nodes)
    parser.add_argument("--seed", type=int, default=d.seed)


def run(args) -> int:
    from ..models.build.heads import HeadsBuild, build_heads, default_out_dir

    for flag in ("threads", "num_heads", "num_layers", "sequences", "steps", "max_tree_nodes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cfg = HeadsBuild(target=args.target, out_dir=args.out or default_out_dir(args.target), work_dir=args.work_dir,
                     device=device, num_heads=args.num_heads, num_layers=args.num_layers,
                     share_lm_head=not args.own_lm_heads, sequences=args.sequences, steps=args.steps,
                     max_tree_nodes=args.max_tree_nodes, seed=args.seed)
    print(json.dumps(build_heads(cfg), indent=2))
    return 0
