"""``outrider models``: which target, draft and Medusa heads are in use."""

from __future__ import annotations

import json

from ..models.loading import resolve_paths


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="print the target, draft and Medusa heads in use")
    parser.add_argument("--target", help="target model folder or hub id (default: bundled)")
    parser.add_argument("--draft", help="draft model folder or hub id (default: bundled)")
    parser.add_argument("--medusa", help="Medusa heads folder or hub id (default: <target>-medusa beside the target)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    paths = resolve_paths(args.target, args.draft, args.medusa)
    if args.json:
        print(json.dumps({"target": paths.target, "draft": paths.draft, "medusa": paths.medusa}))
    else:
        print(f"target: {paths.target}\ndraft:  {paths.draft}\nmedusa: {paths.medusa or '(none)'}")
    return 0
