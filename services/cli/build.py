"""``outrider build-models``: rebuild the bundled pair from the CPython stdlib."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.loading import BUNDLED_DIR
from .common import UsageError


def add_parser(sub, name: str) -> None:
    from ..models.build.pipeline import BuildConfig

    d = BuildConfig(out_dir=BUNDLED_DIR, work_dir=Path(".outrider-cache/build"))
    parser = sub.add_parser(name, help="build the bundled target/draft pair (resumable)")
    parser.add_argument("--out", type=Path, default=d.out_dir, help="where to save the pair")
    parser.add_argument("--work-dir", type=Path, default=d.work_dir, help="checkpoints and caches")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target-steps", type=int, default=d.target_steps)
    parser.add_argument("--draft-steps", type=int, default=d.draft_steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)


def run(args) -> int:
    from ..models.build.pipeline import BuildConfig, build_models

    if args.threads < 1 or args.target_steps < 1 or args.draft_steps < 1 or args.batch_size < 1:
        raise UsageError("--threads, --target-steps, --draft-steps and --batch-size must be >= 1")
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cfg = BuildConfig(out_dir=args.out, work_dir=args.work_dir, seed=args.seed, device=device,
                      target_steps=args.target_steps, draft_steps=args.draft_steps, batch_size=args.batch_size)
    print(json.dumps(build_models(cfg), indent=2))
    return 0
