"""``outrider models``: which target, draft, Medusa heads, MTP modules and EAGLE drafter are in use."""

from __future__ import annotations

import json

from ..models.loading import resolve_paths


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="print the target, draft, Medusa heads, MTP modules and EAGLE drafter in use")
    parser.add_argument("--target", help="target model folder or hub id (default: bundled)")
    parser.add_argument("--draft", help="draft model folder or hub id (default: bundled)")
    parser.add_argument("--medusa", help="Medusa heads folder or hub id (default: <target>-medusa beside the target)")
    parser.add_argument("--mtp", help="MTP modules folder or hub id (default: <target>-mtp beside the target, "
                                      "else the target's own checkpoint if it ships them)")
    parser.add_argument("--eagle", help="EAGLE-3 drafter folder or hub id (default: <target>-eagle beside the target)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from ..models.mtp import ships_mtp

    paths = resolve_paths(args.target, args.draft, args.medusa, args.mtp, args.eagle)
    mtp = paths.mtp or (paths.target if ships_mtp(paths.target) else None)
    if args.json:
        print(json.dumps({"target": paths.target, "draft": paths.draft, "medusa": paths.medusa, "mtp": mtp,
                          "eagle": paths.eagle}))
    else:
        print(f"target: {paths.target}\ndraft:  {paths.draft}\nmedusa: {paths.medusa or '(none)'}\n"
              f"mtp:    {mtp or '(none)'}\neagle:  {paths.eagle or '(none)'}")
    return 0
